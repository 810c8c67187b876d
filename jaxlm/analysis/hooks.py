"""``--mode=analyze --workdir=RUN``: the long-range analyses of ONE trained run, written beside it.

:func:`analyze_run` loads the run's latest checkpoint, rebuilds its dataset (same config, same tokenizer)
and runs on its validation split:

1. gradient sensitivity (``analysis.sensitivity``): S over ``analysis.num_sequences`` validation windows at
   16 target positions (the last ones for causal models, the middle ones for bert/elmo, so both sides are
   seen), folded by distance; plus the full inputs x outputs map on the first 16 windows (Graves' heat map);
2. context ablation (``analysis.context``): loss at the last token with the context beyond d dropped,
   shuffled and randomised (transformers also: hidden from attention in place, the ``mask`` mode), d on a log
   grid, over ``analysis.num_windows`` windows; the effective context at ``analysis.tolerance`` for each mode;
3. loss by position (``analysis.position_loss``; left-to-right models): the next-token loss at every position of
   the same windows, i.e. against the context available in unaltered text;
4. attention maps (``analysis.attention_maps``, gpt and bert only) of ``analysis.attention_text`` (or the
   first tokens of the validation split): a layers x heads PNG grid and the offline HTML head view.

Outputs: RUN/analysis/{results.json, sensitivity.png, sensitivity_heatmap.png, ablation.png,
ablation_increase.png, loss_by_position.png, attention.png, head_view.html, report.md}, and TensorBoard
images/scalars under ``analysis/*`` in RUN (at the checkpoint's step).  Synthetic-task runs use the task's
held-out examples, cut to end at the answer: the ablation's target and the sensitivity's row are the answer, so
the curves show how far back the answer's evidence is read (and loss by position is skipped: filler positions
carry nothing to learn).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from jaxlm import config as config_lib, data, metric_writer, models, runs
from jaxlm.analysis import apply, attention_maps, context, plots, position_loss, sensitivity
from jaxlm.errors import UserError

ABLATION_MODES = context.MODES
SENSITIVITY_ROWS = 16          # target positions averaged per distance (x num_sequences windows)
HEATMAP_SEQUENCES = 16         # windows averaged for the inputs x outputs map
ATTENTION_TOKENS = 48          # tokens of the attention text shown (the head view is unreadable beyond)
REPORT_DISTANCES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _apply_overrides(config, overrides) -> None:
    """{"analysis.num_windows": 1024, ...} -> set on the ConfigDict (unknown keys are an error)."""
    for key, value in (overrides or {}).items():
        section = config
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                section = section[p]
            if leaf not in section:
                raise KeyError(key)
        except (KeyError, TypeError):
            raise UserError(f"unknown config key {key!r} in analysis overrides: see jaxlm/config.py") from None
        section[leaf] = value


def validation_windows(dataset, count: int, length: int, *, synthetic: bool = False) -> np.ndarray:
    """``count`` windows int32 [count, length] evenly spread over the validation split, the same on every call.

    synthetic=True: held-out task examples cut so that the LAST token is the (last) answer (the closing
    [EOS] is dropped), so "the last token" of the ablation and the sensitivity rows score the answer."""
    batch = min(count, 256)
    batches = dataset.eval_batches(batch, math.ceil(count / batch))
    windows = np.concatenate([b["tokens"] for b in batches])[:count]
    if synthetic:
        windows = windows[:, :-1]
    return windows[:, -length:]


def sensitivity_positions(kind: str, length: int, rows: int = SENSITIVITY_ROWS, *,
                          answer_last: bool = False) -> np.ndarray:
    """Target rows for the distance curve: the last ``rows`` scorable positions (causal) or the middle ones;
    answer_last (synthetic tasks): only the row that scores the answer, the window's last token."""
    if answer_last:
        return np.array([length - 2 if kind == "causal" else length - 1])
    if kind == "causal":
        return np.arange(max(0, length - 1 - rows), length - 1)
    start = max(1, length // 2 - rows // 2)
    return np.arange(start, min(length - 1, start + rows))


def run_sensitivity(graphdef, params, windows, *, objective: str, mask_id, out_dir: str | None,
                    answer_last: bool = False) -> tuple[dict, np.ndarray]:
    """Sensitivity by distance over ``windows`` [N, L] (tokens) and the heat map of the first ones, for a model
    trained with `objective`."""
    kind = apply.kind_of(graphdef, params, objective)
    length = windows.shape[1]
    positions = sensitivity_positions(kind, length, answer_last=answer_last)
    each = sensitivity.gradient_sensitivity(graphdef, params, windows, target_positions=positions,
                                            objective=objective, mask_id=mask_id, per_sequence=True)
    two_sided = kind != "causal"
    dist, mean, std = sensitivity.sensitivity_by_distance(each.mean(axis=0), target_positions=positions,
                                                          bidirectional=two_sided)
    # each sequence's own curve (the fold is linear: their mean is `mean`), for error bars over sequences
    curves = np.stack([sensitivity.sensitivity_by_distance(e, target_positions=positions, bidirectional=two_sided)[1]
                       for e in each])
    result = {"distances": dist.tolist(), "mean": mean.tolist(), "std": std.tolist(),
              "target_positions": positions.tolist(), "num_sequences": int(len(windows))}
    for side, key in ((1, "relative"), (-1, "relative_right")) if two_sided else ((1, "relative"),):
        result[key] = relative_at(dist, mean, side=side)
        result[key + "_stderr"] = relative_stderr_at(dist, curves, side=side)
    heat = sensitivity.gradient_sensitivity(graphdef, params, windows[:HEATMAP_SEQUENCES], mask_id=mask_id)
    result["heatmap_shape"] = list(heat.shape)
    if out_dir:
        np.save(os.path.join(out_dir, "sensitivity_map.npy"), heat)
    return result, heat


def relative_stderr_at(distances, curves, *, side: int = 1) -> dict:
    """{d: jackknife standard error over sequences of S(d)/S(1)} at the distances `relative_at` reports;
    curves: [N, K], each sequence's S by distance."""
    distances = np.asarray(distances)
    if not np.any(distances == side) or curves.mean(axis=0)[distances == side][0] <= 0:
        return {}
    err = sensitivity.ratio_stderr(curves, int(np.flatnonzero(distances == side)[0]))
    return {str(d): float(err[distances == side * d][0]) for d in REPORT_DISTANCES if np.any(distances == side * d)}


def relative_at(distances, mean, *, side: int = 1) -> dict:
    """{d: S(d)/S(1)} at the report distances present (side=-1: inputs after the target, d = -1, -2, ...)."""
    distances, mean = np.asarray(distances), np.asarray(mean)
    ref = mean[distances == side]
    if not ref.size or ref[0] <= 0:
        return {}
    return {str(d): float(mean[distances == side * d][0] / ref[0])
            for d in REPORT_DISTANCES if np.any(distances == side * d)}


def run_ablation(graphdef, params, windows, *, tokenizer, modes, tolerance: float, seed: int,
                 objective: str | None = None) -> dict:
    """{"grid", "losses": {mode: {d: [mean, stderr]}}, "increase": {mode: {d: [mean, paired stderr]}} (loss at d
    minus the full-context loss, window by window), "effective_context": {mode: d}, "effective_context_interval":
    {mode: [lo, hi]} (its 90% bootstrap interval over the windows)} over windows [N, L+1];
    objective: the one the model was trained with (None: the model class's own)."""
    grid = context.distance_grid(windows.shape[1] - 1)
    losses, increase, effective, interval = {}, {}, {}, {}
    for mode in modes:
        per_window = context.context_ablation_losses(graphdef, params, windows, distances=grid, mode=mode,
                                                     objective=objective, tokenizer=tokenizer, seed=seed)
        res = context.summarize(per_window)
        losses[mode] = {str(d): [m, e] for d, (m, e) in res.items()}
        increase[mode] = {str(d): [m, e] for d, (m, e) in context.paired_increase(per_window, grid[-1]).items()}
        effective[mode] = context.effective_context(res, tolerance)
        interval[mode] = list(context.effective_context_interval(per_window, tolerance, seed=seed))
    return {"grid": grid, "losses": losses, "increase": increase, "effective_context": effective,
            "effective_context_interval": interval, "tolerance": tolerance, "num_windows": int(len(windows)),
            "full_context_loss": losses[modes[0]][str(grid[-1])][0]}


def attention_text_tokens(config, tokenizer, dataset, max_len: int) -> np.ndarray:
    """The tokens whose attention is drawn: analysis.attention_text, else the start of the valid split."""
    text = config.analysis.attention_text
    ids = tokenizer.encode(text) if text else np.asarray(dataset.valid_tokens)
    ids = np.asarray(ids, np.int32)[:min(ATTENTION_TOKENS, max_len)]
    if len(ids) < 2:
        raise UserError(f"invalid analysis.attention_text={text!r}: needs at least 2 tokens")
    return ids


def _learned_positions(model_cfg) -> bool:
    """A transformer with a learned position table: it has no position past model.max_len."""
    return model_cfg.name in ("gpt", "bert") and model_cfg.position_encoding == "learned"


def analysis_length(config) -> int:
    """The windows' length: ``analysis.seq_len``, or the run's ``data.seq_len`` (0).  Longer windows test a model
    beyond its training length, which a learned position table cannot represent: a UserError then."""
    length, m = int(config.analysis.seq_len) or config.data.seq_len, config.model
    if length == config.data.seq_len:
        return length
    if config.data.source.startswith("synthetic:"):
        raise UserError(f"invalid analysis.seq_len={length}: a synthetic task's examples have their own length "
                        f"(data.seq_len={config.data.seq_len}); use 0")
    learned = _learned_positions(m)
    limit = m.max_len - (m.name == "bert")   # bert's ablation appends a [MASK] after the context
    if learned and length > limit:
        raise UserError(f"invalid analysis.seq_len={length}: this {m.name} has learned positions for "
                        f"{m.max_len} tokens{' (one is for the appended [MASK])' if m.name == 'bert' else ''}, "
                        f"so at most {limit}; rope, none and recurrent models run at any length")
    return length


def analyze_run(workdir: str, config_overrides: dict | None = None, *, modes=ABLATION_MODES,
                attention: bool = True, write_tensorboard: bool = True) -> dict:
    """Run sensitivity, context ablation and attention maps on the trained run in ``workdir``.

    Args:
      workdir: a run directory with a checkpoint (``jaxlm.runs.load``).
      config_overrides: flat {"analysis.num_windows": 1024, ...} applied to the run's saved config.
      modes: the context-ablation modes every model runs; a transformer also runs context.TRANSFORMER_MODES.
      attention: draw attention maps (transformers).
    Returns:
      the dict written to RUN/analysis/results.json.
    """
    start = time.time()
    trained = runs.load(workdir)
    config = trained.config
    _apply_overrides(config, config_overrides)
    trained_len = config.data.seq_len
    config.data.seq_len = analysis_length(config)
    dataset = data.build_dataset(config, workdir)
    tokenizer = trained.tokenizer
    objective = config_lib.objective_name(config)
    kind = apply.kind_of(trained.graphdef, trained.params, objective)
    out_dir = os.path.join(workdir, "analysis")
    os.makedirs(out_dir, exist_ok=True)
    a = config.analysis
    seq_len = config.data.seq_len
    # bert predicts the ablation target from a [MASK] appended after the context: keep a learned table's length
    learned = _learned_positions(config.model)
    context_len = min(seq_len, config.model.max_len - 1) if kind == "masked" and learned else seq_len
    results = {"workdir": workdir, "model": config.model.name, "kind": kind, "step": trained.step,
               "params": models.count_params(trained.params),
               "data_source": config.data.source, "seq_len": seq_len, "trained_seq_len": trained_len}

    task = config.data.source.startswith("synthetic:")   # score the answer, not the closing [EOS]
    windows = validation_windows(dataset, a.num_sequences, seq_len, synthetic=task)
    results["sensitivity"], heat = run_sensitivity(trained.graphdef, trained.params, windows, objective=objective,
                                                   mask_id=tokenizer.mask_id, out_dir=out_dir, answer_last=task)
    if context.is_transformer(trained.graphdef, trained.params):
        modes = tuple(modes) + tuple(m for m in context.TRANSFORMER_MODES if m not in modes)
    ablation_windows = validation_windows(dataset, a.num_windows, min(context_len + 1, seq_len) if task
                                          else context_len + 1, synthetic=task)
    results["ablation"] = run_ablation(trained.graphdef, trained.params, ablation_windows, tokenizer=tokenizer,
                                       modes=tuple(modes), tolerance=a.tolerance, seed=config.seed,
                                       objective=objective)
    if kind in position_loss.KINDS and not task:   # a task's filler positions carry nothing to learn
        results["position_loss"] = position_loss.summarize(position_loss.losses_by_position(
            trained.graphdef, trained.params, ablation_windows, kind=kind, vocab_size=tokenizer.vocab_size))
    images = _figures(results, heat, out_dir)
    if attention and config.model.name in ("gpt", "bert"):
        ids = attention_text_tokens(config, tokenizer, dataset, config.model.max_len)
        weights = attention_maps.attention_weights(trained.graphdef, trained.params, ids)
        strings = attention_maps.token_strings(tokenizer, ids)
        png = plots.attention_grid(weights, strings, path=os.path.join(out_dir, "attention.png"))
        images["attention"] = png
        attention_maps.save_head_view(os.path.join(out_dir, "head_view.html"), strings, weights,
                                      title=f"{config.model.name} ({workdir}), step {trained.step}")
        results["attention"] = {"tokens": strings, "shape": list(weights.shape),
                                "mean_distance": _mean_attention_distance(weights).tolist()}
    results["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(run_report(results, sorted(images)))
    if write_tensorboard:
        _write_tensorboard(workdir, trained.step, results, images)
    return results


def _mean_attention_distance(weights) -> np.ndarray:
    """[L, H]: the attention-weighted mean |query - key| distance (how far each head looks)."""
    w = np.asarray(weights, np.float64)
    t = w.shape[-1]
    dist = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :])
    return np.einsum("lhqk,qk->lh", w, dist) / t


def _figures(results: dict, heat: np.ndarray, out_dir: str) -> dict:
    """PNG files in out_dir; returns {name: png bytes}."""
    s = results["sensitivity"]
    name = results["model"]
    images = {
        "sensitivity": plots.sensitivity_vs_distance({name: (np.array(s["distances"]), np.array(s["mean"]),
                                                             np.array(s["std"]))},
                                                     path=os.path.join(out_dir, "sensitivity.png")),
        "sensitivity_heatmap": plots.sensitivity_heatmap(heat, path=os.path.join(out_dir, "sensitivity_heatmap.png"),
                                                         title=f"{name}: sensitivity of outputs to inputs"),
    }
    curves = {mode: {int(d): tuple(v) for d, v in pts.items()} for mode, pts in results["ablation"]["losses"].items()}
    images["ablation"] = plots.ablation_curves(curves, title=f"{name}: context ablation",
                                               path=os.path.join(out_dir, "ablation.png"))
    increase = {mode: {int(d): tuple(v) for d, v in pts.items()}
                for mode, pts in results["ablation"]["increase"].items()}
    images["ablation_increase"] = plots.ablation_curves(
        increase, reference={"full context": 0.0}, title=f"{name}: loss increase over the full context",
        ylabel="loss(d) - full-context loss, paired (nats)", path=os.path.join(out_dir, "ablation_increase.png"))
    if "position_loss" in results:
        p = results["position_loss"]
        points = {t + 1: (m, e) for t, (m, e) in enumerate(zip(p["mean"], p["stderr"]))}
        images["loss_by_position"] = plots.ablation_curves(
            {name: points}, title=f"{name}: loss by position", ylabel="next-token loss (nats)",
            xlabel="context available: tokens up to and including the position",
            path=os.path.join(out_dir, "loss_by_position.png"))
    return images


def _write_tensorboard(workdir: str, step: int, results: dict, images: dict) -> None:
    writer = metric_writer.MetricWriter(workdir, console=False)
    try:
        for tag, png in images.items():
            writer.write_image(step, f"analysis/{tag}", plots.png_to_array(png))
        scalars = {f"analysis/effective_context_{m}": v for m, v in results["ablation"]["effective_context"].items()}
        scalars.update({f"analysis/sensitivity_rel_d{d}": v for d, v in results["sensitivity"]["relative"].items()})
        scalars["analysis/full_context_loss"] = results["ablation"]["full_context_loss"]
        if "position_loss" in results:
            scalars["analysis/last_position_excess"] = results["position_loss"]["last_excess"][0]
        writer.write_scalars(step, scalars)
        writer.write_text(step, "analysis/report", run_report(results, sorted(images)))
    finally:
        writer.close()


def run_report(results: dict, images) -> str:
    """A short Markdown summary of one run's analysis."""
    s, ab = results["sensitivity"], results["ablation"]
    lines = [f"# Long-range analysis of {results['workdir']}", "",
             f"Model **{results['model']}** ({results['kind']}), step {results['step']}, data {results['data_source']}, "
             f"seq_len {results['seq_len']}" + (f" (trained on {results['trained_seq_len']}: beyond its training "
                                                "length)" if results.get("trained_seq_len", results["seq_len"])
                                               != results["seq_len"] else "") + ".", "",
             f"## Gradient sensitivity ({s['num_sequences']} sequences, {len(s['target_positions'])} target positions)",
             "", "± is the jackknife standard error over the sequences.", "",
             "| d | S(d)/S(1) |" + (" S(-d)/S(-1) |" if "relative_right" in s else ""),
             "|---|---|" + ("---|" if "relative_right" in s else "")]

    def cell(key: str, d: str) -> str:   # the ratio ± its jackknife error over sequences (where recorded)
        value, err = s.get(key, {}).get(d), s.get(key + "_stderr", {}).get(d)
        return "" if value is None else f"{value:.3g}" + ("" if err is None else f" ± {err:.2g}")

    for d in s["relative"]:
        lines.append(f"| {d} | {cell('relative', d)} |" + (f" {cell('relative_right', d)} |"
                                                          if "relative_right" in s else ""))
    lines += ["", f"## Context ablation ({ab['num_windows']} windows; effective context = smallest d within "
              f"{100 * ab['tolerance']:g}% of the best loss, with its 90% bootstrap interval over the windows)", "",
              "| mode | effective context | " + " | ".join(f"d={d}" for d in ab["grid"]) + " |",
              "|---|---|" + "---|" * len(ab["grid"])]
    for mode, pts in ab["losses"].items():
        cells = " | ".join(f"{pts[str(d)][0]:.3f} ± {pts[str(d)][1]:.3f}" for d in ab["grid"])
        lo, hi = ab.get("effective_context_interval", {}).get(mode, (None, None))
        span = "" if lo is None else f" ({lo}-{hi})"
        lines.append(f"| {mode} | {ab['effective_context'][mode]}{span} | {cells} |")
    lines += ["", f"Loss at d minus the full-context loss (d={ab['grid'][-1]}), window by window: the mean and its "
              "paired standard error, the error to compare distances by (the ± above include how much the windows "
              "differ from each other).", "",
              "| mode | " + " | ".join(f"d={d}" for d in ab["grid"][:-1]) + " |",
              "|---|" + "---|" * (len(ab["grid"]) - 1)]
    for mode, pts in ab["increase"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{pts[str(d)][0]:+.3f} ± {pts[str(d)][1]:.3f}"
                                                 for d in ab["grid"][:-1]) + " |")
    if "position_loss" in results:
        p = results["position_loss"]
        length = len(p["mean"])
        marks = [c for c in REPORT_DISTANCES if c < length] + [length]
        lines += ["", f"## Loss by position ({p['num_windows']} windows)", "",
                  "Next-token loss with c tokens of context (position c - 1 of the window; ± the standard error over "
                  "the windows). Last-position excess: the last position's loss minus the window's mean over its "
                  f"second half, paired: {p['last_excess'][0]:+.3f} ± {p['last_excess'][1]:.3f}.", "",
                  "| c | " + " | ".join(str(c) for c in marks) + " |", "|---|" + "---|" * len(marks),
                  "| loss | " + " | ".join(f"{p['mean'][c - 1]:.3f} ± {p['stderr'][c - 1]:.3f}" for c in marks) + " |"]
    lines += [""] + [f"![{name}]({name}.png)" for name in images]
    if "attention" in results:
        lines += ["", "Attention head view (offline): [head_view.html](head_view.html)"]
    return "\n".join(lines) + "\n"
