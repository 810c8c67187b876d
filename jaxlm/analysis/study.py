"""The long-range study: train rnn, lstm (two initialisations), elmo, gpt (three position encodings) and bert at
matched parameter counts, measure how each uses distant context, and write a report that checks the classic claims
against the numbers.

``python launch.py --config=experiments/long_range.py:quick --workdir=W`` (a config with a ``study`` section,
routed here by ``jaxlm.modes.train``) runs two tasks:

- ``lm``: character LM on the built-in corpus (windows of ``study.lm_seq_len``, every model from a zero state
  on the same windows, so all see the same context), then per run :func:`jaxlm.analysis.hooks.analyze_run`:
  gradient sensitivity by distance, context ablation (effective context), attention maps (transformers);
- ``recall``: delayed recall (``synthetic:recall``, random-symbol fillers) trained at each distance d of
  ``study.distances``; accuracy at d on held-out examples (``jaxlm.analysis.tasks``).

Each run lives in ``W/<task>/<variant>/seed<k>`` and is a normal jaxlm run (``--mode=analyze`` and
TensorBoard work on it).  A finished run (its ``study_run.json`` records the config it was trained with)
is reused, not retrained; an interrupted one resumes from its checkpoint.

Outputs in W: ``results.json`` (:data:`RESULT_FIELDS`), ``report.md`` (tables mean ± std over seeds, the
plots, and for each literature claim the verdict computed from this run's numbers), the PNGs, and
TensorBoard images/scalars under ``study/*``.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from jaxlm import config as config_lib, metric_writer, models, runs
from jaxlm.analysis import context, hooks, plots, tasks
from jaxlm.analysis import study_report
from jaxlm.data import synthetic
from jaxlm.errors import UserError
from jaxlm.train import loop

# variant -> model-config changes; the long-range LSTM initialisations after Tallec & Ollivier (2018) and
# Gers et al. (2000) / Jozefowicz et al. (2015); the GPT's position encodings (models/positions.py)
VARIANTS = {
    "rnn": {"name": "rnn"},
    "lstm": {"name": "lstm", "forget_bias": 1.0, "lstm_init": "default"},
    "lstm_fb3": {"name": "lstm", "forget_bias": 3.0, "lstm_init": "default"},
    "lstm_chrono": {"name": "lstm", "lstm_init": "chrono"},
    "elmo": {"name": "elmo"},
    "gpt": {"name": "gpt", "position_encoding": "learned"},
    "gpt_rope": {"name": "gpt", "position_encoding": "rope"},   # relative positions only (Su et al. 2021)
    "gpt_nope": {"name": "gpt", "position_encoding": "none"},   # none: order from the causal mask alone
    "bert": {"name": "bert"},
}
# sizes matched within ~12% of each other's parameter count (tests/analysis/test_study.py checks it; gpt_rope and
# gpt_nope are the smallest: they have no position table)
SIZES = {
    "tiny": {   # ~0.11M parameters: the quick preset
        "rnn": {"num_layers": 2, "d_model": 64, "hidden_size": 170},
        "lstm": {"num_layers": 2, "d_model": 64, "hidden_size": 84},
        "elmo": {"num_layers": 2, "d_model": 48, "hidden_size": 64},
        "gpt": {"num_layers": 2, "d_model": 64, "num_heads": 4},
        "bert": {"num_layers": 2, "d_model": 64, "num_heads": 4},
    },
    "char": {   # ~0.43M parameters: experiments/*_char.py
        "rnn": {"num_layers": 2, "d_model": 128, "hidden_size": 330},
        "lstm": {"num_layers": 2, "d_model": 128, "hidden_size": 160},
        "elmo": {"num_layers": 2, "d_model": 96, "hidden_size": 120},
        "gpt": {"num_layers": 2, "d_model": 128, "num_heads": 4},
        "bert": {"num_layers": 2, "d_model": 128, "num_heads": 4},
    },
}
TASKS = ("lm", "recall")
RESULT_FIELDS = {
    "lm": ("params", "eval_loss", "effective_context", "sensitivity", "ablation", "ablation_increase"),
    "recall": ("params", "eval_loss", "accuracy", "stderr", "distance", "steps_trained"),
}
MARKER = "study_run.json"


def _csv(value, kind=str) -> list:
    """"a,b" or a list/tuple -> [a, b]."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [kind(str(v).strip()) for v in items if str(v).strip()]


def check_study(s) -> None:
    """One-line UserError for a bad ``study`` section."""
    for key in ("models", "lm_models"):
        bad = [v for v in _csv(s[key]) if v not in VARIANTS]
        if bad:
            raise UserError(f"invalid study.{key}={s[key]!r}: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if s.size not in SIZES:
        raise UserError(f"invalid study.size={s.size!r}: choose from {', '.join(SIZES)}")
    for key in ("seeds", "lm_seeds"):
        if not isinstance(s[key], int) or s[key] < 0:
            raise UserError(f"invalid study.{key}={s[key]!r}: must be an integer >= 0")
    distances = _csv(s.distances, int)
    if s.seeds and (not distances or min(distances) < 1):
        raise UserError(f"invalid study.distances={s.distances!r}: comma-separated integers >= 1")
    stop = s.get("stop_at_accuracy", 0.0)   # study configs written before the key existed train every step
    if not isinstance(stop, (int, float)) or not 0.0 <= stop <= 1.0:
        raise UserError(f"invalid study.stop_at_accuracy={stop!r}: must be in [0, 1] (0 = always train "
                        "study.recall_steps)")
    bad = [m for m in _csv(s.ablation_modes) if m not in hooks.ABLATION_MODES]
    if bad:
        raise UserError(f"invalid study.ablation_modes={s.ablation_modes!r}: choose from "
                        f"{', '.join(hooks.ABLATION_MODES)} (the transformers also run "
                        f"{', '.join(context.TRANSFORMER_MODES)} on their own)")


def _model_config(base, variant: str, size: str):
    """The base config WITHOUT the study section (so extending the study leaves finished runs reusable)."""
    out = ml_collections.ConfigDict({k: v for k, v in base.to_dict().items() if k != "study"})
    changes = dict(VARIANTS[variant])
    name = changes["name"]
    out.model.name = name
    for key, value in {**SIZES[size][name], **changes}.items():
        out.model[key] = value
    return out


def _common(config, s, seed: int, steps: int, batch_size: int):
    """Training settings shared by both tasks: no periodic eval/samples, one checkpoint at the end."""
    config.seed = int(seed)
    config.train.steps = int(steps)
    config.train.batch_size = int(batch_size)
    config.train.eval_every = config.train.checkpoint_every = int(steps)
    config.train.log_every = min(25, int(steps))
    config.train.sample_length = 0
    config.train.stateful = False
    config.train.eval_batches = int(s.eval_batches)
    config.train.keep_checkpoints = 1
    config.optim.learning_rate = float(s.learning_rate)
    config.optim.warmup_steps = min(int(s.warmup_steps), int(steps) // 2)
    config.model.dropout = 0.0
    return config


def lm_config(base, s, variant: str, seed: int):
    """The character-LM run of ``variant`` (built-in corpus, windows of study.lm_seq_len)."""
    c = _model_config(base, variant, s.size)
    c.data.source, c.data.tokenizer = "builtin", "chars"
    c.data.seq_len = c.model.max_len = int(s.lm_seq_len)
    c.data.max_corpus_bytes = int(s.lm_corpus_bytes)
    c.objective.name = ""
    c = _common(c, s, seed, s.lm_steps, s.lm_batch_size)
    c.analysis.num_sequences, c.analysis.num_windows = int(s.num_sequences), int(s.num_windows)
    c.analysis.tolerance = float(s.tolerance)
    if c.model.name == "bert":
        c.model.max_len = c.data.seq_len + 1   # the ablation appends a [MASK] after a full context
    return c


def recall_config(base, s, variant: str, seed: int, distance: int):
    """Delayed recall at dependency distance ``distance`` (random-symbol fillers, seq_len = d + 3)."""
    c = _model_config(base, variant, s.size)
    c.data.source = "synthetic:recall"
    c.data.distance, c.data.num_symbols, c.data.filler = int(distance), int(s.num_symbols), s.filler
    c.data.seq_len = c.model.max_len = synthetic.min_seq_len("recall", int(distance))
    c.objective.name = ""
    c = _common(c, s, seed, s.recall_steps, s.recall_batch_size)
    c.train.stop_at_accuracy = float(s.get("stop_at_accuracy", 0.0))   # a solved task needs no more steps
    return c


def _finished(workdir: str, config) -> dict | None:
    """The recorded result of a finished run trained with exactly ``config``, else None."""
    path = os.path.join(workdir, MARKER)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved["result"] if _same_config(saved.get("config"), config) else None


def _same_config(saved, config) -> bool:
    """Whether a recorded config is ``config``, keys added to jaxlm since taking their defaults (so a new option
    does not make every finished run look stale)."""
    as_json = lambda c: json.loads(json.dumps(c.to_dict()))   # noqa: E731  (tuples and lists alike)
    return isinstance(saved, dict) and as_json(config_lib.from_dict(saved)) == as_json(config)


def _record(workdir: str, config, result: dict) -> None:
    with open(os.path.join(workdir, MARKER + ".tmp"), "w") as f:
        json.dump({"config": config.to_dict(), "result": result}, f, indent=2)
    os.replace(os.path.join(workdir, MARKER + ".tmp"), os.path.join(workdir, MARKER))


def _stale(workdir: str, config) -> bool:
    """Whether ``workdir`` holds a run of any other config (finished or not): set it aside and retrain.

    Exact comparison: a study run is only resumed under the very config it started with (another learning
    rate, budget or initialisation would make the result a mixture of two runs)."""
    if os.path.exists(os.path.join(workdir, MARKER)):
        return True   # finished, but _finished() found another config
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return os.path.isdir(os.path.join(workdir, "checkpoints"))   # unreadable: only a fresh start is safe
    return not _same_config(saved, config)


def run_lm(config, workdir: str, s, *, attention: bool, restart: bool = False) -> dict:
    """Train (or resume) one LM run and analyse it."""
    start = time.time()
    metrics = loop.train(config, workdir, restart=restart)
    trained_s = time.time() - start
    analysis = hooks.analyze_run(workdir, modes=_csv(s.ablation_modes), attention=attention)
    sens = analysis["sensitivity"]
    return {"params": analysis["params"], "eval_loss": metrics["eval/loss"],
            "effective_context": analysis["ablation"]["effective_context"],
            "effective_context_interval": analysis["ablation"]["effective_context_interval"],   # 90% bootstrap
            "sensitivity": {"distances": sens["distances"], "mean": sens["mean"],
                            **{k: sens[k] for k in ("relative", "relative_stderr", "relative_right",
                                                    "relative_right_stderr") if k in sens}},
            "ablation": analysis["ablation"]["losses"], "ablation_grid": analysis["ablation"]["grid"],
            "ablation_increase": analysis["ablation"]["increase"],   # paired over windows: hooks.run_ablation
            **({"position_loss": analysis["position_loss"]} if "position_loss" in analysis else {}),   # not bert
            "train_seconds": round(trained_s, 1), "analysis_seconds": analysis["seconds"]}


def run_recall(config, workdir: str, s, *, restart: bool = False) -> dict:
    """Train (or resume) one recall run; answer accuracy on held-out examples at its distance."""
    start = time.time()
    metrics = loop.train(config, workdir, restart=restart)
    trained = runs.load(workdir)
    d = int(config.data.distance)
    acc = tasks.run_accuracy_at_distance(trained, [d], num_batches=int(s.probe_batches), batch_size=64)[d]
    return {"params": models.count_params(trained.params), "eval_loss": metrics["eval/loss"], "distance": d,
            "accuracy": acc["accuracy"], "stderr": acc["stderr"], "num_answers": acc["num_answers"],
            "steps_trained": int(metrics["train/steps_trained"]), "train_seconds": round(time.time() - start, 1)}


def plan(config) -> list[tuple[str, str, int, int | None, object]]:
    """Every run of the study: (task, variant, seed, distance or None, run config)."""
    s = config.study
    out = []
    for variant in _csv(s.lm_models):
        for seed in range(s.lm_seeds):
            out.append(("lm", variant, seed, None, lm_config(config, s, variant, seed)))
    for d in _csv(s.distances, int):
        for variant in _csv(s.models):
            for seed in range(s.seeds):
                out.append(("recall", variant, seed, d, recall_config(config, s, variant, seed, d)))
    return out


def run_dir(root: str, task: str, variant: str, seed: int, distance: int | None) -> str:
    sub = f"{task}_d{distance}" if distance is not None else task
    return os.path.join(root, sub, variant, f"seed{seed}")


def run_study(config, workdir: str) -> dict:
    """Run (or reuse) every run of the plan, then write W/results.json, W/report.md, plots and TensorBoard."""
    s = config.study
    check_study(s)
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    results = {"lm": {}, "recall": {}}
    todo = plan(config)
    for i, (task, variant, seed, d, run_cfg) in enumerate(todo, 1):
        config_lib.validate(run_cfg)
        path = run_dir(workdir, task, variant, seed, d)
        result = _finished(path, run_cfg)
        what = f"[study {i}/{len(todo)}] {task}{'' if d is None else f' d={d}'} {variant} seed {seed}"
        if result is None:
            restart = _stale(path, run_cfg)
            print(f"{what}: {'retraining (the run there had another config; set aside in previous-*/)' if restart else 'training'}"
                  f" in {path}", flush=True)
            result = (run_lm(run_cfg, path, s, attention=bool(s.attention) and seed == 0, restart=restart)
                      if task == "lm" else run_recall(run_cfg, path, s, restart=restart))
            _record(path, run_cfg, result)
        else:
            print(f"{what}: reusing the finished run in {path}", flush=True)
        result["workdir"] = os.path.relpath(path, workdir)
        bucket = results[task].setdefault(variant, {})
        if task == "lm":
            bucket[f"seed{seed}"] = result
        else:
            bucket.setdefault(f"seed{seed}", {})[str(d)] = result
    summary = study_report.summarize(results, config)
    out = {"config": config.study.to_dict(), "tolerance": float(s.tolerance),
           "chance": 1.0 / int(s.num_symbols), "runs": results, "summary": summary,
           "seconds": round(time.time() - start, 1), "run_seconds": round(_run_seconds(results), 1)}
    images = study_report.figures(results, summary, out, workdir)
    out["seconds"] = round(time.time() - start, 1)
    out["findings"] = study_report.findings(summary, out)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(study_report.report(out, images))
    _tensorboard(workdir, out, images)
    print(f"study done in {out['seconds']:.0f} s: {workdir}/report.md, {workdir}/results.json", flush=True)
    return out


def _run_seconds(results: dict) -> float:
    """Wall seconds the runs took when they were trained and analysed (recorded, so reuse does not reset it)."""
    total = 0.0
    for task in results.values():
        for seeds in task.values():
            for run in seeds.values():
                for r in (run.values() if "train_seconds" not in run else [run]):
                    total += r.get("train_seconds", 0.0) + r.get("analysis_seconds", 0.0)
    return total


def _tensorboard(workdir: str, out: dict, images: dict) -> None:
    writer = metric_writer.MetricWriter(workdir, console=False)
    try:
        for name, png in images.items():
            writer.write_image(0, f"study/{name}", plots.png_to_array(png))
        scalars = {}
        for variant, row in out["summary"]["lm"].items():
            for mode, (mean, _) in row["effective_context"].items():
                scalars[f"study/effective_context_{mode}/{variant}"] = mean
            scalars[f"study/lm_eval_loss/{variant}"] = row["eval_loss"][0]
        for variant, row in out["summary"]["recall"].items():
            for d, (mean, _) in row["accuracy"].items():
                scalars[f"study/recall_accuracy_d{d}/{variant}"] = mean
        writer.write_scalars(0, scalars)
        writer.write_text(0, "study/report", study_report.report(out, images))
    finally:
        writer.close()


def mean_std(values) -> tuple[float, float]:
    """(mean, std over seeds; 0 for one seed)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
