"""Run metrics to TensorBoard event files, WORKDIR/metrics.jsonl and a console progress line.

TensorBoard summaries are built as tensor protos with each plugin's metadata and written with
tensorboard's own EventFileWriter, so nothing here needs TensorFlow (JAX-NOTES.md section 5).
"""

import datetime
import io
import json
import math
import os
import sys
import time

import numpy as np
import rich.console
import rich.progress
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer import event_file_writer
from tensorboard.util import tensor_util

METRICS_FILE = "metrics.jsonl"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # JSON has no NaN/inf literals
_PLUGIN_METADATA = {
    "scalars": scalar_metadata.create_summary_metadata("", ""),
    "text": text_metadata.create_summary_metadata("", ""),
    "images": image_metadata.create_summary_metadata("", ""),
    "histograms": histogram_metadata.create_summary_metadata("", ""),
}
_SHORT_NAMES = {"tokens_per_sec": "tok/s"}


class MetricWriter:
    """Writes one run's metrics; with enabled=False (non-zero processes) every method is a no-op.

    Resuming in a workdir appends to its metrics.jsonl and adds a new event file beside the old ones
    (TensorBoard reads them all as one run).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, total_steps: int = 0, console: bool = True,
                 resume_step: int | None = None):
        self._enabled = enabled
        self._console_on = enabled and console
        self._total = int(total_steps)
        self._closed = not enabled
        self._seen_tags = set()  # plugin metadata goes only on a tag's first event in each file
        self._bar = self._task = None
        self._eta_origin = None  # (time, step) of the first progress call: the ETA counts only this session
        self._tty = sys.stdout.isatty()
        self._console = rich.console.Console() if self._console_on and self._tty else None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        if resume_step is not None and os.path.exists(path):
            _drop_rows_after(path, resume_step)
        needs_newline = os.path.exists(path) and os.path.getsize(path) > 0 and _last_byte(path) != b"\n"
        self._jsonl = open(path, "a", encoding="utf-8")
        if needs_newline:  # a run killed mid-line: start our lines on a fresh one
            self._jsonl.write("\n")
        self._events = event_file_writer.EventFileWriter(workdir, flush_secs=10)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._closed:
            return
        values = {tag: float(v) for tag, v in scalars.items()}
        for tag, v in values.items():
            self._emit(step, tag, "scalars", tensor_util.make_tensor_proto(np.float32(v)))
        row = {"step": int(step), **{t: v if math.isfinite(v) else str(v) for t, v in values.items()}}
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Markdown text (TensorBoard's text plugin renders it), e.g. tag "samples/text" or "config"."""
        if not self._closed:
            tensor = tensor_util.make_tensor_proto(np.array(text.encode("utf-8"), dtype=object))
            self._emit(step, tag, "text", tensor)

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 [height, width, 3 or 4], stored as PNG."""
        if self._closed:
            return
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"write_image({tag!r}) needs uint8 [H, W, 3|4], got {image.dtype} {image.shape}")
        png = _encode_png(image)
        height, width = image.shape[:2]
        tensor = tensor_util.make_tensor_proto(np.array([str(width).encode(), str(height).encode(), png], dtype=object))
        self._emit(step, tag, "images", tensor)

    def write_histogram(self, step: int, tag: str, values: np.ndarray, bins: int = 30) -> None:
        """Histogram of the finite entries of values (NaN/inf dropped: np.histogram rejects them)."""
        if self._closed:
            return
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size:
            counts, edges = np.histogram(values, bins=bins)
            buckets = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
        else:
            buckets = np.zeros((0, 3), np.float64)
        self._emit(step, tag, "histograms", tensor_util.make_tensor_proto(buckets))

    def write_hparams(self, hparams: dict, metric_names: list[str]) -> None:
        """hparams: flat or nested dict (nested keys joined with "."); non bool/int/float/str values -> str."""
        if self._closed:
            return
        flat = {k: _hparam_value(v) for k, v in _flatten(hparams).items()}
        config = hparams_summary.hparams_config_pb(
            [hparams_summary.HParam(k) for k in flat], [hparams_summary.Metric(m) for m in metric_names])
        for summary in (config, hparams_summary.hparams_pb(flat)):
            self._events.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

    def progress(self, step: int, **fields) -> None:
        """Shows step/total, the given fields (loss=..., tokens_per_sec=...) and the ETA.

        A rich progress bar on a terminal; otherwise one plain line per call (no control codes).
        """
        if not self._console_on:
            return
        now = time.monotonic()
        if self._eta_origin is None:
            self._eta_origin = (now, step)
        line = self._progress_line(step, fields, now)
        if self._console is None:
            print(line, flush=True)
            return
        if self._bar is None:
            self._bar = rich.progress.Progress(
                rich.progress.BarColumn(), rich.progress.TextColumn("{task.description}", markup=False),
                console=self._console)
            self._task = self._bar.add_task("", total=self._total or None)
            self._bar.start()
        self._bar.update(self._task, completed=step, description=line)

    def log(self, message: str) -> None:
        """A console line; on a terminal it is printed above the progress bar without breaking it."""
        if not self._console_on:
            return
        if self._console is None:
            print(message, flush=True)
        else:
            self._console.print(message, markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        if not self._closed:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._closed:
            return
        self._closed = True
        self._jsonl.close()
        self._events.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _emit(self, step, tag, plugin, tensor):
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        if tag not in self._seen_tags:
            self._seen_tags.add(tag)
            value.metadata.CopyFrom(_PLUGIN_METADATA[plugin])
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value]))
        self._events.add_event(event)

    def _progress_line(self, step, fields, now):
        step = int(step)
        parts = [f"step {step}/{self._total}" if self._total else f"step {step}"]
        parts += [f"{_SHORT_NAMES.get(k, k)} {_format_number(v)}" for k, v in fields.items()]
        start_time, start_step = self._eta_origin
        if self._total and step > start_step:
            seconds = (self._total - step) * (now - start_time) / (step - start_step)
            parts.append(f"eta {datetime.timedelta(seconds=max(0, round(seconds)))}")
        return "  ".join(parts)


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalar summaries in workdir's event files: {tag: [(step, value), ...]} in file order."""
    from tensorboard.backend.event_processing import plugin_event_accumulator   # ~0.5 s: only readers pay
    acc = plugin_event_accumulator.EventAccumulator(workdir, size_guidance={plugin_event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.PluginTagToContent("scalars")}


def read_metrics_jsonl(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl, with "nan"/"inf"/"-inf" back as floats; a line cut by a kill is skipped."""
    rows = []
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()})
    return rows


def _drop_rows_after(path: str, step: int) -> None:
    """Resume from a checkpoint at `step`: forget rows logged after it (the steps are about to be replayed),
    and any line a kill cut short, so metrics.jsonl reads like the log of an uninterrupted run."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step", 0), (int, float)) and row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _last_byte(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _encode_png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if hasattr(v, "items"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hparam_value(v):
    if isinstance(v, np.generic):
        v = v.item()
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def _format_number(v):
    if isinstance(v, str):
        return v
    v = float(v)
    if not math.isfinite(v) or abs(v) < 1e3:
        return f"{v:.4g}"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{suffix}"
