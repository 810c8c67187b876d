#!/usr/bin/env python
"""jaxlm vs PyTorch eager, same shapes, same machine, alternating: jaxlm, torch, torch+hugetlb, jaxlm, ...

jaxlm runs exactly as a user runs it: ``python launch.py --mode=bench --config=benchmarks/shapes.py:SHAPE``
(which re-executes itself with the huge-page malloc setting, as every launch does).  The peer is
shared/bench/torch_gpt.py / torch_lstm.py (nanoGPT-style decoder / nn.LSTM with oneDNN, AdamW, random tokens)
at the same shape and vocabulary, under both allocator settings (glibc default, and
GLIBC_TUNABLES=glibc.malloc.hugetlb=1), counted at its best.  Each round runs every shape once per contender,
the order rotating between rounds; ratios are medians over rounds of jaxlm / (best torch setting that round).

  pip install torch==2.13.0            # the optional extra: pip install -e ".[torch]"
  python benchmarks/vs_torch.py                        # all shapes, 3 rounds (~15-25 min on 2 cores)
  python benchmarks/vs_torch.py --shapes=gpt_small --rounds=5 --out=benchmarks/out/vs_torch.json
  python benchmarks/vs_torch.py --summarize=benchmarks/out/vs_torch.json   # the tables again, nothing run

It prints two tables: per shape (tokens/s, ratio, MFU, compile and first-step times), and issue 8's targets
(RATIO_TARGETS, MFU_TARGETS, COMPILE_TARGETS_S: speed against torch's best setting, MFU, first-step compile cold
and cached), each with its value in every round and whether the median meets it.  Without torch it says so and
exits 0.  The torch scripts are looked up in <repo>/../shared/bench, or --torch_bench_dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
HUGETLB = "glibc.malloc.hugetlb=1"

# Issue 8's targets: jaxlm / (torch eager at its best setting), MFU of the model's FLOPs, first-step compile.
RATIO_TARGETS = {"gpt_tiny": 1.25, "gpt_small": 1.25, "gpt_small_v8192": 1.25, "lstm_tiny": 1.0, "lstm_small": 1.0}
MFU_TARGETS = {"gpt_small": 0.5, "lstm_small": 0.75}
COMPILE_TARGETS_S = {"cold": 1.5, "cached": 0.5}   # every shape: trace + lower + XLA compile (or cache load)


def torch_args(config, steps: int) -> tuple[str, list[str]]:
    """The torch script and its flags for the shape of a jaxlm config (same layers, widths, seq, batch, vocab)."""
    from jaxlm import bench
    m, vocab = config.model, bench.bench_tokenizer(config, None).vocab_size
    common = ["--seq", str(config.data.seq_len), "--batch", str(config.train.batch_size), "--vocab", str(vocab),
              "--steps", str(steps)]
    if m.name == "gpt":
        return "torch_gpt.py", ["--layers", str(m.num_layers), "--d-model", str(m.d_model), "--heads",
                                str(m.num_heads), *common] + (["--gelu", "tanh"] if m.gelu_approximate else [])
    if m.name == "lstm":
        return "torch_lstm.py", ["--layers", str(m.num_layers), "--hidden", str(m.hidden_size), "--emb",
                                 str(m.d_model), *common]
    raise SystemExit(f"no torch peer for model.name={m.name!r}")


def _env(hugetlb: bool | None) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("JAXLM_NO_REEXEC", None)
    if hugetlb:
        env["GLIBC_TUNABLES"] = HUGETLB
    return env


def _last_json(text: str) -> dict:
    return json.loads(next(line for line in reversed(text.strip().splitlines()) if line.startswith("{")))


def run_jaxlm(shape: str, workdir: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--mode=bench",
                           f"--config={os.path.join(ROOT, 'benchmarks', 'shapes.py')}:{shape}", f"--workdir={workdir}"],
                          capture_output=True, text=True, env=_env(None), cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"jaxlm bench failed on {shape}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "bench.json")) as f:
        report = json.load(f)
    return {**report["models"][0], "machine": report["machine"]}


def run_torch(script_dir: str, script: str, args: list[str], hugetlb: bool, peak: float) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(script_dir, script), *args, "--peak-gflops", str(peak / 1e9)],
                          capture_output=True, text=True, env=_env(hugetlb), cwd=script_dir)
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-3000:]}")
    return _last_json(proc.stdout)


def main():
    from jaxlm import bench
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(bench.SHAPES), help="comma-separated, from jaxlm/bench.py SHAPES")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch_steps", type=int, default=20, help="timed torch steps per run")
    p.add_argument("--torch_bench_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "bench"))
    p.add_argument("--out", default="", help="also write every run as JSON here")
    p.add_argument("--summarize", default="", help="print the tables of a run saved with --out; run nothing")
    a = p.parse_args()
    if a.summarize:
        return summarize(a.summarize)
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in bench.SHAPES]
    if unknown or not shapes or a.rounds < 1 or a.torch_steps < 1:
        problem = (f"unknown --shapes {', '.join(unknown)}; choose from {', '.join(bench.SHAPES)}" if unknown else
                   "--shapes names none" if not shapes else
                   f"invalid --rounds={a.rounds} / --torch_steps={a.torch_steps}: both must be at least 1")
        print(f"vs_torch: error: {problem}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("torch") is None:
        print("vs_torch: PyTorch is not installed, nothing to compare against "
              "(pip install torch==2.13.0, or pip install -e '.[torch]'). Skipping.")
        return 0
    if not os.path.isfile(os.path.join(a.torch_bench_dir, "torch_gpt.py")):
        print(f"vs_torch: no torch_gpt.py in --torch_bench_dir={a.torch_bench_dir!r}; nothing to compare. Skipping.")
        return 0
    contenders = ("jaxlm", "torch", "torch+hugetlb")
    runs = {s: {c: [] for c in contenders} for s in shapes}
    with tempfile.TemporaryDirectory(prefix="jaxlm-vs-torch-") as tmp:
        for r in range(a.rounds):
            for s in shapes:
                order = contenders[r % 3:] + contenders[:r % 3]
                for c in order:
                    if c == "jaxlm":
                        res = run_jaxlm(s, os.path.join(tmp, f"{s}-{r}"))
                    else:
                        peak = (runs[s]["jaxlm"] or [{"peak_flops": 0.0}])[-1]["peak_flops"]
                        script, args = torch_args(bench.shape_config(s), a.torch_steps)
                        res = run_torch(a.torch_bench_dir, script, args, c.endswith("hugetlb"), peak)
                    runs[s][c].append(res)
                    print(f"round {r + 1} {s:>16} {c:>14}: {res['tokens_per_sec']:9,.0f} tok/s", file=sys.stderr,
                          flush=True)
    print(table(runs, a.rounds) + "\n\n" + targets_table(runs))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


def summarize(path: str) -> int:
    """Print the tables of a saved run (--out); exit 2 on a file that is not one."""
    try:
        with open(path) as f:
            runs = json.load(f)
        text = table(runs, len(next(iter(runs.values()))["jaxlm"])) + "\n\n" + targets_table(runs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
        print(f"vs_torch: error: --summarize={path!r} is not a run saved with --out ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    print(text)
    return 0


def round_ratios(by: dict) -> list[float]:
    """Per round: jaxlm tokens/s over the better of torch's two allocator settings in that round."""
    j, t0, t1 = ([x["tokens_per_sec"] for x in by[c]] for c in ("jaxlm", "torch", "torch+hugetlb"))
    return [a / max(b, c) for a, b, c in zip(j, t0, t1)]


def table(runs: dict, rounds: int) -> str:
    med = lambda xs: statistics.median(xs)   # noqa: E731
    lines = [f"Medians of {rounds} alternating rounds; ratio = median over rounds of jaxlm / best torch setting.\n",
             "| shape | jaxlm tok/s | torch eager | torch eager + hugetlb | jaxlm / torch best "
             "| jaxlm MFU model / executed | jaxlm compile s cold / cached | jaxlm first step s cold / cached |",
             "|---|---|---|---|---|---|---|---|"]
    for s, by in runs.items():
        j, t0, t1 = ([x["tokens_per_sec"] for x in by[c]] for c in ("jaxlm", "torch", "torch+hugetlb"))
        ratio = med(round_ratios(by))
        # compile: trace + lower + XLA compile (or cache load); first step: that plus the first execution
        compile_s, first = ({k: med(x[f"compile_{k}"][field] for x in by["jaxlm"]) for k in ("cold", "cached")}
                            for field in ("compile_s", "first_step_s"))
        lines.append(f"| {s} | {med(j):,.0f} | {med(t0):,.0f} | {med(t1):,.0f} | **{ratio:.2f}x** | "
                     f"{med(x['mfu'] for x in by['jaxlm']):.2f} / {med(x['mfu_executed'] for x in by['jaxlm']):.2f} | "
                     f"{compile_s['cold']:.2f} / {compile_s['cached']:.2f} | "
                     f"{first['cold']:.2f} / {first['cached']:.2f} |")
    return "\n".join(lines)


def targets_table(runs: dict) -> str:
    """Issue 8's targets for the shapes in `runs`: each value per round, its median, and whether that meets the
    target (with how many rounds did)."""
    rows = ["| target | shape | per round | median | status |", "|---|---|---|---|---|"]

    def row(target: str, shape: str, values: list, unit: str, limit: float, at_least: bool) -> None:
        hits = sum(v >= limit if at_least else v < limit for v in values)
        median = statistics.median(values)
        met = median >= limit if at_least else median < limit
        rows.append(f"| {target} | {shape} | {' / '.join(f'{v:.2f}' for v in values)} | {median:.2f}{unit} | "
                    f"{'**met**' if met else 'not met'} ({hits}/{len(values)} rounds) |")

    for s, by in runs.items():
        if s in RATIO_TARGETS:
            row(f">= {RATIO_TARGETS[s]:.2f}x torch", s, round_ratios(by), "x", RATIO_TARGETS[s], True)
    for s, by in runs.items():
        if s in MFU_TARGETS:
            row(f"MFU >= {MFU_TARGETS[s]:.2f}", s, [x["mfu"] for x in by["jaxlm"]], "", MFU_TARGETS[s], True)
    for kind, limit in COMPILE_TARGETS_S.items():
        for s, by in runs.items():
            row(f"compile {kind} < {limit:g} s", s, [x[f"compile_{kind}"]["compile_s"] for x in by["jaxlm"]], " s",
                limit, False)
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
