"""MetricWriter: what is written reads back exactly (TensorBoard without TensorFlow, metrics.jsonl, console)."""

import io
import json
import math
import os

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from jaxlm import metric_writer


def _accumulator(workdir):
    acc = plugin_event_accumulator.EventAccumulator(workdir, size_guidance={plugin_event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def _values(acc, tag):
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def test_scalars_round_trip_as_float32_and_jsonl(tmp_path):
    workdir = str(tmp_path)
    with metric_writer.MetricWriter(workdir, console=False) as w:
        w.write_scalars(1, {"train/loss": 2.3456789, "train/accuracy": np.float64(0.1)})
        w.write_scalars(2, {"train/loss": 1.0 / 3.0})
        assert len(metric_writer.read_metrics_jsonl(workdir)) == 2  # flushed per line, before close
    assert [os.path.basename(f)[:20] for f in os.listdir(workdir) if "tfevents" in f] == ["events.out.tfevents."]
    scalars = metric_writer.read_scalars(workdir)
    assert scalars["train/loss"] == [(1, float(np.float32(2.3456789))), (2, float(np.float32(1.0 / 3.0)))]
    assert scalars["train/accuracy"] == [(1, float(np.float32(0.1)))]
    assert metric_writer.read_metrics_jsonl(workdir) == [
        {"step": 1, "train/loss": 2.3456789, "train/accuracy": 0.1}, {"step": 2, "train/loss": 1.0 / 3.0}]


def test_nan_and_inf_keep_each_line_valid_json(tmp_path):
    workdir = str(tmp_path)
    with metric_writer.MetricWriter(workdir, console=False) as w:
        w.write_scalars(5, {"train/loss": math.nan, "train/grad_norm": math.inf, "x": -math.inf, "ok": 1.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    json.loads(lines[0], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict JSON
    row = metric_writer.read_metrics_jsonl(workdir)[0]
    assert math.isnan(row["train/loss"]) and row["train/grad_norm"] == math.inf and row["x"] == -math.inf
    assert row["ok"] == 1.5
    assert math.isnan(metric_writer.read_scalars(workdir)["train/loss"][0][1])


def test_text_image_histogram(tmp_path):
    workdir = str(tmp_path)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(4, 3, 4), dtype=np.uint8)
    values = rng.normal(size=1000)
    with metric_writer.MetricWriter(workdir, console=False) as w:
        w.write_text(3, "samples/text", "# To be\n\nor **not** é")
        w.write_image(4, "analysis/map", rgb)
        w.write_image(5, "analysis/map", rgba)
        w.write_histogram(6, "params/w", np.append(values, [np.nan, np.inf]))
    acc = _accumulator(workdir)
    plugins = acc.ActivePlugins()
    assert {"text", "images", "histograms"} <= set(plugins)
    assert "samples/text" in acc.PluginTagToContent("text")
    [(step, text)] = _values(acc, "samples/text")
    assert step == 3 and text.item().decode() == "# To be\n\nor **not** é"

    assert "analysis/map" in acc.PluginTagToContent("images")
    images = _values(acc, "analysis/map")
    assert [s for s, _ in images] == [4, 5]
    for (_, tensor), expected in zip(images, (rgb, rgba)):
        width, height, png = tensor.tolist()
        assert (int(width), int(height)) == (expected.shape[1], expected.shape[0])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)

    [(step, buckets)] = _values(acc, "params/w")
    counts, edges = np.histogram(values, bins=30)  # the non-finite entries are dropped
    assert step == 6 and buckets.shape == (30, 3)
    np.testing.assert_array_equal(buckets[:, 2], counts)
    np.testing.assert_allclose(buckets[:, 0], edges[:-1])
    np.testing.assert_allclose(buckets[:, 1], edges[1:])


def test_hparams_plugin_values(tmp_path):
    workdir = str(tmp_path)
    hparams = {"model": {"name": "gpt", "num_layers": 4, "dropout": 0.1}, "amp": False, "shape": (2, 3), "x": None}
    with metric_writer.MetricWriter(workdir, console=False) as w:
        w.write_hparams(hparams, ["eval/loss", "train/loss"])
    content = _accumulator(workdir).PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}
    experiment = next(d.experiment for d in data.values() if d.HasField("experiment"))
    assert {h.name for h in experiment.hparam_infos} == {"model.name", "model.num_layers", "model.dropout",
                                                         "amp", "shape", "x"}
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/loss", "train/loss"]
    start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    assert start.hparams["model.name"].string_value == "gpt"
    assert start.hparams["model.num_layers"].number_value == 4
    assert start.hparams["model.dropout"].number_value == 0.1
    assert start.hparams["amp"].WhichOneof("kind") == "bool_value" and not start.hparams["amp"].bool_value
    assert start.hparams["shape"].string_value == "(2, 3)"
    assert start.hparams["x"].string_value == "None"


def test_reopen_appends(tmp_path):
    workdir = str(tmp_path)
    with metric_writer.MetricWriter(workdir, console=False) as w:
        w.write_scalars(1, {"train/loss": 3.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # a run killed mid-line
    with metric_writer.MetricWriter(workdir, console=False) as w:
        w.write_scalars(3, {"train/loss": 2.0})
    assert metric_writer.read_metrics_jsonl(workdir) == [{"step": 1, "train/loss": 3.0}, {"step": 3, "train/loss": 2.0}]
    assert metric_writer.read_scalars(workdir)["train/loss"] == [(1, 3.0), (3, 2.0)]


def test_disabled_writes_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    w = metric_writer.MetricWriter(workdir, enabled=False, total_steps=10)
    w.write_scalars(1, {"train/loss": 1.0})
    w.write_text(1, "config", "x")
    w.write_image(1, "img", np.zeros((2, 2, 3), np.uint8))
    w.write_histogram(1, "h", np.ones(3))
    w.write_hparams({"a": 1}, ["eval/loss"])
    w.progress(1, loss=1.0)
    w.log("hello")
    w.flush()
    w.close()
    assert not os.path.exists(workdir)
    assert capsys.readouterr().out == ""


def test_progress_and_log_plain_lines_when_not_a_tty(tmp_path, capsys):
    with metric_writer.MetricWriter(str(tmp_path), total_steps=600) as w:
        w.progress(100, loss=2.3114, tokens_per_sec=12345.0)
        w.log("eval [PAD] ok")
        w.progress(200, loss=2.0, tokens_per_sec=1.5e6)
        w.close()
        w.close()  # idempotent
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 100/600  loss 2.311  tok/s 12.3k"
    assert lines[1] == "eval [PAD] ok"
    assert lines[2].startswith("step 200/600  loss 2  tok/s 1.5M  eta 0:")
    assert "\x1b" not in "".join(lines)


def test_bad_image_is_rejected(tmp_path):
    with metric_writer.MetricWriter(str(tmp_path), console=False) as w:
        try:
            w.write_image(0, "img", np.zeros((2, 2, 3), np.float32))
        except ValueError as e:
            assert "uint8" in str(e)
        else:
            raise AssertionError("float image accepted")


def test_resume_forgets_rows_after_the_checkpoint_step(tmp_path):
    """A run killed at step 30 after a checkpoint at 20 replays 21..30: their old rows must not stay twice."""
    w = metric_writer.MetricWriter(str(tmp_path), console=False)
    for step in (10, 20, 30):
        w.write_scalars(step, {"train/loss": float(step)})
    w.close()
    with open(tmp_path / metric_writer.METRICS_FILE, "a") as f:
        f.write('{"step": 40, "train/lo')           # a line cut by kill -9
    w = metric_writer.MetricWriter(str(tmp_path), console=False, resume_step=20)
    w.write_scalars(30, {"train/loss": 3.0})
    w.close()
    rows = metric_writer.read_metrics_jsonl(str(tmp_path))
    assert [(r["step"], r["train/loss"]) for r in rows] == [(10, 10.0), (20, 20.0), (30, 3.0)]
