"""What each --mode does: train, eval, sample, bench, analyze. Each takes the validated config and a workdir.

A mode imports what only it needs (matplotlib for analyze, the bench harness, the study) when it runs, so
`launch.py` in train mode, and every early error, does not wait for them (about a second of start-up).
"""

from __future__ import annotations

import json

from jaxlm import config as config_lib, generate, runs
from jaxlm.errors import UserError
from jaxlm.train import loop


def train(config, workdir: str, *, restart: bool = False, **_) -> dict:
    if "study" in config:   # experiments/long_range.py: many runs + the report (jaxlm/analysis/study.py)
        from jaxlm.analysis import study
        return study.run_study(config, workdir)
    return loop.train(config, workdir, restart=restart)


def analyze(config, workdir: str, **_) -> dict:
    """Sensitivity, context ablation and attention maps of the run in workdir -> WORKDIR/analysis/.

    ``--config.analysis.KEY=VALUE`` overrides (values differing from the defaults) apply to the run's config."""
    from jaxlm.analysis import hooks
    defaults = config_lib.flatten(config_lib.default_config())
    overrides = {k: v for k, v in config_lib.flatten(config).items()
                 if k.startswith("analysis.") and defaults.get(k) != v}
    results = hooks.analyze_run(workdir, overrides)
    print(f"analysis of {workdir} written to {workdir}/analysis/ (report.md, results.json, PNGs) "
          f"in {results['seconds']:.0f} s; effective context: {results['ablation']['effective_context']}")
    return results


def evaluate(config, workdir: str, **_) -> dict:
    """Evaluate the latest checkpoint on the validation batches; prints and returns the eval metrics."""
    saved = config_lib.load(workdir)
    saved.train.eval_batches = config.train.eval_batches
    run = loop.setup(saved, workdir, for_training=False)
    try:
        metrics = loop.evaluate(run, run.start_step, write=False)
    finally:
        run.checkpointer.close()
        run.writer.close()
    print(json.dumps({"step": run.start_step, **metrics}, indent=2))
    return metrics


def sample(config, workdir: str, *, prompt: str = "", num_tokens: int = 200, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, top_next: int = 0, num_samples: int = 1, seed: int = 0, **_) -> list:
    """Continue `prompt` with the trained causal model; with top_next=K print the K likeliest next tokens."""
    trained = runs.load(workdir)
    objective = config_lib.objective_name(trained.config)
    if objective == "masked_lm":
        return _fill_mask(trained, prompt, top_next or 5)
    if objective != "causal_lm":
        raise UserError(f"--mode=sample continues a prompt with a causal_lm run (gpt, lstm, rnn) or fills [MASK]s "
                        f"with a masked_lm run (bert); the run in {workdir!r} is {trained.config.model.name!r} "
                        f"trained with {objective}")
    tok = trained.tokenizer
    ids = tok.encode(prompt) if prompt else [tok.eos_id]
    if len(ids) == 0:
        ids = [tok.eos_id]
    if top_next:
        rows = generate.next_token_table(trained.graphdef, trained.params, ids[-trained.config.model.max_len:], top_next)
        print(f"next-token probabilities after {prompt!r} (step {trained.step}):")
        for rank, (token, p) in enumerate(rows, 1):
            print(f"{rank:3d}  {tok.token_str(token)!r:>14}  {p:8.4f}  {'#' * int(round(p * 50))}")
        return rows
    texts = []
    for i in range(num_samples):
        out = generate.sample(trained.graphdef, trained.params, ids, max_len=trained.config.model.max_len,
                              num_tokens=num_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + i)
        texts.append(prompt + tok.decode(out))
        print(texts[-1] + ("\n" + "-" * 40 if num_samples > 1 else ""))
    return texts


def _fill_mask(trained, prompt: str, top_k: int) -> list:
    """A masked-LM run: for each [MASK] in the prompt, the top_k fillers with probabilities."""
    from jaxlm import features
    tables = features.fill_mask(trained, prompt, top_k)
    for i, rows in enumerate(tables, 1):
        print(f"[MASK] #{i} in {prompt!r} (step {trained.step}):")
        for rank, (token, p) in enumerate(rows, 1):
            print(f"{rank:3d}  {token!r:>14}  {p:8.4f}  {'#' * int(round(p * 50))}")
    return tables


def bench(config, workdir: str, **options) -> dict:
    """Training speed of the reference shapes (or of --config's model) -> WORKDIR/bench.json."""
    from jaxlm import bench as bench_lib
    return bench_lib.run_bench(config, workdir, **options)


MODE_FUNCTIONS = {"train": train, "eval": evaluate, "sample": sample, "bench": bench, "analyze": analyze}
