#!/usr/bin/env python
"""A/B speed levers on one benchmark shape, alternating variants in fresh processes
(A B C, then C B A, A B C, ...: a machine drifting during the rounds favours no variant).

Each run is the timing child of `--mode=bench` (``python -m jaxlm.bench measure``: the real train step,
medians after warm-up) on a fresh compilation cache.  A variant is a name and settings: KEY=VALUE with a
dot in KEY is a config override, otherwise an environment variable (an empty value unsets it).  Every run
starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as launch.py gives users, unless a variant sets it.

  python benchmarks/ab.py --shape=gpt_small --rounds=4 \\
      --variant='base' \\
      --variant='ynn XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_dot' \\
      --variant='tanh model.gelu_approximate=True' \\
      --variant="dev2 'XLA_FLAGS=--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false'"

Settings are split like a shell command line (shlex), so quote a value that has spaces.  To time another
version of the code against this one, give it as a variant's PYTHONPATH and run from outside the repo (the
timing child is ``python -m jaxlm.bench``, which would otherwise import jaxlm from the current directory):

  git worktree add /tmp/candidate && (edit it) && cd /tmp && \
      python /path/to/jaxlm/benchmarks/ab.py --shape=lstm_small --rounds=4 --variant=base \
      --variant='candidate PYTHONPATH=/tmp/candidate'

Prints per-round tokens/s and, per variant, the median over rounds of (variant / first variant) in the
same round, each round's ratio and in how many rounds the variant was faster: on a shared, noisy machine only
such paired ratios mean something, and only when most rounds agree (this VM has shown six pairs in a row
agreeing on a difference that the next pairs reversed).  The CPU-time ratio (the
process's own CPU seconds per step, first variant / variant) is steadier when other processes load the
machine, but misses time lost to waiting (e.g. thread hand-offs).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HUGETLB = "glibc.malloc.hugetlb=1"


def parse_variant(spec: str):
    name, *settings = shlex.split(spec)
    env, overrides = {}, {}
    for setting in settings:
        key, _, value = setting.partition("=")
        (overrides if "." in key else env)[key] = value
    return name, env, overrides


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def variant_config(shape: str, overrides: dict):
    """The config of `shape` with a variant's overrides, validated; UserError (one line) for a bad key or value."""
    from jaxlm import bench, config as config_lib
    from jaxlm.errors import UserError
    config = bench.shape_config(shape)
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if section not in config or "." in leaf or leaf not in config[section]:
            raise UserError(f"unknown config key {key!r} in a --variant; use SECTION.KEY from jaxlm/config.py")
        default = config[section][leaf]
        try:
            config[section][leaf] = type(default)(_literal(value))
        except (TypeError, ValueError):
            raise UserError(f"invalid {key}={value!r} in a --variant: must be a {type(default).__name__}") from None
    config_lib.validate(config)
    return config


def run_variant(shape: str, env_changes: dict, overrides: dict, workdir: str) -> dict:
    """One timing child for `shape` with the variant's config overrides and environment."""
    from jaxlm import config as config_lib
    config_lib.save(variant_config(shape, overrides), workdir)
    env = dict(os.environ, GLIBC_TUNABLES=HUGETLB, PYTHONPATH=ROOT)
    for key, value in env_changes.items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="jaxlm-ab-cache-") as cache:
        proc = subprocess.run([sys.executable, "-m", "jaxlm.bench", "measure", workdir, cache],
                              capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"variant failed: {env_changes} {overrides}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_order(variants: list, r: int) -> list:
    """The run order of round r: as given in even rounds, reversed in odd ones (A B C, C B A, ...), so a machine
    that speeds up or slows down during the rounds favours no variant in the paired ratios."""
    return list(variants) if r % 2 == 0 else list(variants)[::-1]


def summary_table(variants: list, runs: dict) -> list[str]:
    """Markdown rows: per variant the medians over rounds, the paired ratio to the first variant (median of the
    per-round ratios, which are listed too) and in how many rounds it was faster than the first."""
    base = runs[variants[0][0]]
    rows = ["| variant | settings | tokens/s | step ms | CPU ms/step | faults/step | peak RSS MB | first step s (cold) "
            "| ratio | per round | faster in | CPU-time ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, env, overrides in variants:
        mine = runs[name]
        ratios = [x["tokens_per_sec"] / y["tokens_per_sec"] for x, y in zip(mine, base)]
        cpu_ratio = statistics.median(y["cpu_ms_per_step"] / x["cpu_ms_per_step"] for x, y in zip(mine, base))
        settings = " ".join(f"{k}={v}" for k, v in {**env, **overrides}.items()) or "-"

        def med(key):
            return statistics.median(x[key] for x in mine)
        rows.append(f"| {name} | `{settings}` | {med('tokens_per_sec'):,.0f} | {med('step_ms_median'):.1f} | "
                    f"{med('cpu_ms_per_step'):.0f} | {med('minor_faults_per_step'):,.0f} | {med('peak_rss_mb'):,.0f} | "
                    f"{statistics.median(x['compile']['first_step_s'] for x in mine):.2f} | "
                    f"{statistics.median(ratios):.3f} | {' / '.join(f'{q:.2f}' for q in ratios)} | "
                    f"{sum(q > 1 for q in ratios)}/{len(ratios)} | {cpu_ratio:.3f} |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gpt_small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variant", action="append", required=True, help="'NAME [KEY=VALUE ...]' (repeatable)")
    p.add_argument("--out", default="", help="also write all runs as JSON here")
    a = p.parse_args()
    from jaxlm.errors import UserError
    variants = [parse_variant(v) for v in a.variant]
    try:   # every variant's config is checked before the first (minutes-long) run
        if a.rounds < 1:
            raise UserError(f"invalid --rounds={a.rounds}: must be at least 1")
        if len({name for name, _, _ in variants}) < len(variants):
            raise UserError(f"variant names must differ: {[name for name, _, _ in variants]}")
        for _, _, overrides in variants:
            variant_config(a.shape, overrides)
    except UserError as e:
        print(f"ab.py: error: {e}", file=sys.stderr)
        return 2
    runs = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="jaxlm-ab-") as tmp:
        for r in range(a.rounds):
            for name, env, overrides in round_order(variants, r):
                res = run_variant(a.shape, env, overrides, os.path.join(tmp, name))
                runs[name].append(res)
                print(f"round {r + 1} {name:>12}: {res['tokens_per_sec']:9,.0f} tok/s  "
                      f"{res['step_ms_median']:7.1f} ms  faults/step {res['minor_faults_per_step']:8,.0f}  "
                      f"other load {res['other_cpu_frac']:.2f}", file=sys.stderr, flush=True)
    print(f"\n{a.shape}, {a.rounds} rounds (median tokens/s; ratio = median over rounds of variant/"
          f"{variants[0][0]} in the same round)\n")
    print("\n".join(summary_table(variants, runs)))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
