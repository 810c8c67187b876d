"""--mode=bench: how fast jaxlm trains on this machine, measured the way a user runs it.

For each model (the reference SHAPES below, or only the --config's model) bench reports parameters,
training FLOPs per token three ways, tokens/s and step time (medians after warm-up), first-step compile
time cold (empty persistent cache) and from the persistent cache, peak memory, page faults per step and
MFU, of the model's FLOPs (the formula below, as training's train/mfu and PyTorch's 6N count) and of the FLOPs
the step executes (the jaxpr count: fewer where a recurrent LM projects its vocabulary instead of its tokens,
`lstm.projects_by_vocabulary`; more for the causal attention's diagonal tiles).  The MFU denominator is what
training's train/mfu divides by: the matmul peak through XLA of the run's device configuration with every
device busy (perf.measure_matmul_peak), measured again in the model's child and kept at its highest.  It
writes WORKDIR/bench.json and prints a markdown table.

What is timed is what `--mode=train` runs: the real train step (StepSpec + parallel.DataParallel, AdamW
with clipping from config.optim, stateful truncated BPTT for recurrent models as torch_lstm.py does) on
uniformly random tokens, blocking on every step.  Each model runs in two fresh child processes
(``python -m jaxlm.bench``) sharing a new temporary compilation cache: the first compiles cold and then
times the steps, the second only measures the first step again, now from the cache.  Child processes
also keep each model's peak RSS and allocator state its own.

FLOPs per token:
  * formula: models.FLOPS_PER_TOKEN (6N + attention; the MFU numerator, as in training's train/mfu);
  * xla: the compiled step's cost analysis.  XLA counts every op (elementwise too, and the attention
    scores as computed: whole diagonal tiles of the causal query blocks), but counts the body of a while
    loop ONCE, so for recurrent models (a loop over time) it misses all but one step of the recurrence
    (LSTM small: 0.68x the formula): read it for transformers only;
  * jaxpr: matrix-multiply FLOPs of the step's jaxpr, with scan bodies counted `length` times (and while
    loops with a static trip count that many times).  Work that every data-parallel device repeats counts
    once: the recurrent LMs' vocabulary projection (~2% of LSTM small's step on 2 devices), so the executed
    MFU reads that much low there.

The allocator matters as much as the code (shared/bench/README.md): launch.py re-executes itself with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 unless --nohugepages; bench.json records the setting.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from jaxlm import config as config_lib
from jaxlm import data, models, parallel, perf
from jaxlm.data import tokenizers
from jaxlm.errors import UserError
from jaxlm.train import loop, optim, step as step_lib

# The shapes of shared/bench/README.md.  "vocab 256" is jaxlm's byte tokenizer: 256 bytes + 6 specials.
_GPT = {"model.name": "gpt", "model.num_heads": 4, "train.batch_size": 16, "data.tokenizer": "bytes"}
_LSTM = {"model.name": "lstm", "model.num_layers": 2, "train.batch_size": 16, "data.tokenizer": "bytes",
         "train.stateful": True}
SHAPES = {
    "gpt_tiny": ("GPT tiny: 2 layers, d 128, seq 128, batch 16, vocab 262",
                 {**_GPT, "model.num_layers": 2, "model.d_model": 128, "model.max_len": 128, "data.seq_len": 128}),
    "gpt_small": ("GPT small: 4 layers, d 256, seq 256, batch 16, vocab 262",
                  {**_GPT, "model.num_layers": 4, "model.d_model": 256, "model.max_len": 256, "data.seq_len": 256}),
    "gpt_small_v8192": ("GPT small, vocab 8192",
                        {**_GPT, "model.num_layers": 4, "model.d_model": 256, "model.max_len": 256,
                         "data.seq_len": 256, "data.tokenizer": "bpe", "data.vocab_size": 8192}),
    "lstm_tiny": ("LSTM tiny: 2 layers, hidden 128, seq 128, batch 16, vocab 262",
                  {**_LSTM, "model.d_model": 128, "model.hidden_size": 128, "model.max_len": 128,
                   "data.seq_len": 128}),
    "lstm_small": ("LSTM small: 2 layers, hidden 512, seq 256, batch 16, vocab 262",
                   {**_LSTM, "model.d_model": 512, "model.hidden_size": 512, "model.max_len": 256,
                    "data.seq_len": 256}),
}

# Time steps for about this long (env JAXLM_BENCH_SECONDS overrides; medians are robust, more costs minutes).
TIMED_SECONDS = float(os.environ.get("JAXLM_BENCH_SECONDS", 8.0))
MIN_STEPS, MAX_STEPS, WARMUP_STEPS = 10, 200, 3
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "xla_compile_s"}


def shape_config(name: str):
    """default_config() with the overrides of SHAPES[name] (the reference benchmark shapes)."""
    if name not in SHAPES:
        raise UserError(f"unknown benchmark shape {name!r}; choose from {', '.join(SHAPES)}")
    config = config_lib.default_config()
    for key, value in SHAPES[name][1].items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    config_lib.validate(config)
    return config


# ---------------------------------------------------------------------------------------------------
# The parent: --mode=bench
# ---------------------------------------------------------------------------------------------------


def run_bench(config, workdir: str, *, config_given: bool = False, **_) -> dict:
    """Measure the matmul peaks, then every reference shape (or only `config` if it was given)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    peaks = {dtype: measure_peak(dtype) for dtype in ("float32", "bfloat16")}
    if config_given:
        name = f"{config.model.name}_{config.model.num_layers}x{config.model.d_model}"
        todo = {name: (f"--config model ({config.model.name})", config)}
    else:
        todo = {name: (desc, shape_config(name)) for name, (desc, _) in SHAPES.items()}
    results = []
    for name, (desc, cfg) in todo.items():
        _say(f"{name}: measuring ({desc})")
        results.append(measure_model(name, desc, cfg, os.path.join(workdir, name)))
        _say(markdown_table(results[-1:]).splitlines()[-1])
    report = {"machine": machine_info(), "peak_flops": peaks, "models": results}
    path = os.path.join(workdir, "bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    print(markdown_table(results))
    print(f"\nwrote {path}")
    return report


def measure_peak(dtype: str, tries: int = 3) -> float:
    """The matmul peak now (best of `tries` measurements) or the cached one if higher; raises the cache.

    A peak is a maximum: other processes on the machine only ever lower a measurement, so the cache that
    training's train/mfu reads (perf.peak_flops) keeps the highest value seen, never a noisy low one.
    """
    best, now = perf.measure_peak(dtype, tries)
    _say(f"matmul peak {dtype}: {best / 1e9:.0f} GFLOP/s through XLA on {jax.local_device_count()} device(s) "
         f"(now {now / 1e9:.0f})")
    return best


def measure_model(name: str, description: str, config, model_dir: str) -> dict:
    """Two child processes on one fresh compilation cache: cold compile + timing, then cached compile."""
    config_lib.save(config, model_dir)
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-cache-") as cache:
        timed = _child(model_dir, cache, "measure")
        cached = _child(model_dir, cache, "first_step")
    result = {"name": name, "description": description, **timed, "compile_cached": cached["compile"],
              "mfu": timed["tokens_per_sec"] * timed["flops_per_token"] / timed["peak_flops"],
              "mfu_executed": timed["tokens_per_sec"] * timed["flops_per_token_jaxpr"] / timed["peak_flops"]}
    result["compile_cold"] = result.pop("compile")
    return result


def _child(model_dir: str, cache_dir: str, what: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "jaxlm.bench", what, model_dir, cache_dir],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child ({what}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "n_cpus": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def markdown_table(results: list[dict]) -> str:
    """One row per model; compile = trace + lower + XLA compile (or cache load), first step = that + running it."""
    rows = ["| model | params | MFLOP/token formula / XLA / jaxpr | tokens/s | step ms | compile s cold / cached "
            "| first step s cold / cached | peak RSS MB | page faults/step | MFU model / executed |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["flops_per_token"]
        cold, cached = r["compile_cold"], r["compile_cached"]
        rows.append(
            f"| {r['name']} | {r['params']:,} | {f / 1e6:.2f} / {r['flops_per_token_xla'] / 1e6:.2f} / "
            f"{r['flops_per_token_jaxpr'] / 1e6:.2f} | {r['tokens_per_sec']:,.0f} | {r['step_ms_median']:.1f} | "
            f"{cold['compile_s']:.2f} / {cached['compile_s']:.2f} | "
            f"{cold['first_step_s']:.2f} / {cached['first_step_s']:.2f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['minor_faults_per_step']:,.0f} | {r['mfu']:.2f} / "
            f"{r['mfu_executed']:.2f} |")
    return "\n".join(rows)


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# The children: python -m jaxlm.bench {measure,first_step} MODEL_DIR CACHE_DIR
# ---------------------------------------------------------------------------------------------------


def bench_tokenizer(config, workdir: str):
    """The vocabulary random tokens are drawn from: the configured tokenizer's (bpe: data.vocab_size)."""
    if config.data.tokenizer == "bytes":
        return tokenizers.ByteTokenizer()
    if config.data.tokenizer == "bpe":   # no need to train merges to time a step: ids are random anyway
        v = config.data.vocab_size
        return types.SimpleNamespace(vocab_size=v, mask_id=v - 5, special_ids=tuple(range(v - 6, v)))
    return data.build_dataset(config, workdir).tokenizer


def build_step(config, tokenizer):
    """(DataParallel, placed TrainState, StepSpec, num_params): what loop.setup builds for a fresh run, minus
    data and checkpoints."""
    model, params, carry = loop.model_and_params(config, tokenizer.vocab_size, abstract=False)
    tx = optim.from_config(config)
    spec, dp = loop.make_steps(config, nnx.graphdef(model), tx, tokenizer)
    return dp, dp.place_state(loop.fresh_state(params, tx, config, carry)), spec, models.count_params(params)


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general in a (Closed)Jaxpr, 2 per multiply-add; scan bodies x their length.

    while_loop bodies count x their trip count where it is static (a counter from a literal, stepped by 1, while
    below a literal: the fused LSTM's loops), once otherwise; of a cond's branches the largest counts.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            continue
        subs = []
        for value in eqn.params.values():
            for v in (value if isinstance(value, (tuple, list)) else (value,)):
                if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
                    subs.append(matmul_flops(v))
        if not subs:
            continue
        inner = max(subs) if eqn.primitive.name == "cond" else sum(subs)
        repeats = {"scan": lambda: eqn.params["length"], "while": lambda: _while_trip_count(eqn)}
        total += inner * repeats.get(eqn.primitive.name, lambda: 1)()
    return total


def _while_trip_count(eqn) -> int:
    """Trip count of `while` carry[0] < N with carry[0] starting at a literal and stepped by 1; 1 if not so."""
    cond_n, body_n = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    cond, body = eqn.params["cond_jaxpr"].jaxpr, eqn.params["body_jaxpr"].jaxpr
    init = eqn.invars[cond_n + body_n]
    if len(cond.eqns) != 1 or not isinstance(init, jex_core.Literal):
        return 1
    test = cond.eqns[0]
    step = next((e for e in body.eqns if e.outvars[0] is body.outvars[0]), None)
    if (test.primitive.name != "lt" or test.invars[0] is not cond.invars[cond_n]
            or not isinstance(test.invars[1], jex_core.Literal) or step is None or step.primitive.name != "add"
            or step.invars[0] is not body.invars[body_n] or not isinstance(step.invars[1], jex_core.Literal)
            or int(step.invars[1].val) != 1):
        return 1
    return max(int(test.invars[1].val) - int(init.val), 1)


class _CompileTimes:
    """Sums JAX's compile-duration events (trace, lower to MLIR, XLA compile or cache load) while active."""

    def __init__(self):
        self.totals = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)

    def __call__(self, event, duration_secs, **_):
        if event in COMPILE_EVENTS:
            self.totals[COMPILE_EVENTS[event]] += duration_secs

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _other_cpu_seconds() -> float:
    """Machine-wide busy CPU seconds (from /proc/stat); minus our own process time = other processes' load."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")   # user nice system irq softirq


def child_main(what: str, model_dir: str, cache_dir: str) -> dict:
    """Build the step, time the first call (compile); for `measure` also time steps and count FLOPs."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    config = config_lib.load(model_dir)
    parallel.configure_cpu_devices(config)   # as launch.py does for a training run
    tokenizer = bench_tokenizer(config, model_dir)
    dp, state, spec, num_params = build_step(config, tokenizer)
    b, t, v = config.train.batch_size, config.data.seq_len, tokenizer.vocab_size
    pool = np.random.default_rng(config.seed).integers(0, v, (8, b, t + 1), dtype=np.int32)
    batch = lambda i: dp.place_batch({"tokens": pool[i % len(pool)]})   # noqa: E731
    with _CompileTimes() as compile_times:
        start = time.perf_counter()
        state, metrics = dp.train_step(state, batch(0))
        first_loss = float(metrics["train/loss"])
        first_step_s = time.perf_counter() - start
    compile_info = {"first_step_s": first_step_s, **compile_times.totals,
                    "compile_s": sum(compile_times.totals.values())}
    if what == "first_step":
        return {"compile": compile_info}
    for i in range(1, WARMUP_STEPS):
        state, metrics = dp.train_step(state, batch(i))
        jax.block_until_ready(metrics)
    times, i = [], WARMUP_STEPS
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu0, busy0 = time.process_time(), _other_cpu_seconds()
    while len(times) < MIN_STEPS or (sum(times) < TIMED_SECONDS and len(times) < MAX_STEPS):
        start = time.perf_counter()
        state, metrics = dp.train_step(state, batch(i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        i += 1
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    wall, own_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    other = max(0.0, _other_cpu_seconds() - busy0 - own_cpu)
    last_loss = float(metrics["train/loss"])
    train_fn = step_lib.bind(spec)[0]
    # Unsharded shapes: XLA's cost analysis of a program split over devices counts one device's share.
    state, one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch(0)))
    compiled = jax.jit(train_fn).lower(state, one).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = b * t
    med = statistics.median(times)
    return {
        "config": {"model": config.model.to_dict(), "seq_len": t, "batch_size": b, "vocab_size": v,
                   "stateful": config.train.stateful, "strategy": config.parallel.strategy,
                   "devices": jax.device_count()},
        "params": num_params,
        "flops_per_token": models.FLOPS_PER_TOKEN[config.model.name](config.model, v, t),
        "flops_per_token_xla": float(cost.get("flops", float("nan"))) / tokens,
        "flops_per_token_jaxpr": matmul_flops(jax.make_jaxpr(train_fn)(state, one)) / tokens,
        "tokens_per_step": tokens, "steps_timed": len(times),
        "tokens_per_sec": tokens / med, "step_ms_median": 1e3 * med, "step_ms_mean": 1e3 * statistics.fmean(times),
        "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        "compile": compile_info,
        "peak_rss_mb": usage1.ru_maxrss / 1024,
        "minor_faults_per_step": (usage1.ru_minflt - usage0.ru_minflt) / len(times),
        "major_faults_per_step": (usage1.ru_majflt - usage0.ru_majflt) / len(times),
        "cpu_ms_per_step": 1e3 * own_cpu / len(times),   # this process's CPU time: steadier than wall under load
        "other_cpu_frac": other / (wall * len(os.sched_getaffinity(0))),
        "first_loss": first_loss, "last_loss": last_loss,
        # the MFU denominator, as training's train/mfu: this device configuration's peak (all devices busy)
        "peak_flops": perf.peak_flops(config.model.dtype, remeasure=True),
        "env": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
    }


if __name__ == "__main__":
    print(json.dumps(child_main(*sys.argv[1:4])))
