"""--mode=bench: FLOP counts against closed forms, the report's fields, and the allocator re-exec (no timing asserts)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import bench, config as config_lib, models, perf
from jaxlm.models import attention
from jaxlm.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "scripts")]
import ab  # noqa: E402  (benchmarks/ab.py)
from launch_local import free_port  # noqa: E402  (scripts/launch_local.py)


def test_matmul_flops_counts_scan_bodies_length_times_and_the_larger_cond_branch():
    t, b, h = 7, 3, 5
    w, xs = jnp.ones((h, h)), jnp.ones((t, b, h))

    def f(w, xs, pred):
        def body(carry, x):
            return jnp.tanh(x + carry @ w), None
        last, _ = jax.lax.scan(body, jnp.zeros((b, h)), xs)
        return jax.lax.cond(pred, lambda v: (v @ w) @ w, lambda v: v @ w, last).sum()

    one = 2 * b * h * h   # one [b, h] @ [h, h]
    assert bench.matmul_flops(jax.make_jaxpr(f)(w, xs, True)) == (t + 2) * one
    assert bench.matmul_flops(jax.make_jaxpr(f)(w, xs, False)) == (t + 2) * one   # static count: the larger branch
    # reverse mode: each forward matmul adds two (d input, d weight)
    assert bench.matmul_flops(jax.make_jaxpr(jax.grad(lambda w: f(w, xs, True)))(w)) == 3 * (t + 2) * one


def test_matmul_flops_counts_a_counted_while_loop_trip_count_times_and_any_other_once():
    b, h, n = 3, 5, 6
    w, x0 = jnp.ones((h, h)), jnp.ones((b, h))
    one = 2 * b * h * h

    def counted(w, x):     # counter from 0, + 1, while below n: the fused LSTM's loops
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    def data_dependent(w, x):   # no static trip count: the body counts once
        return jax.lax.while_loop(lambda c: c.sum() < 1e6, lambda c: c @ w, x)

    def strided(w, x):     # stepped by 2: not a recognised counter, counts once
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 2, c[1] @ w), (0, x))[1]

    assert bench.matmul_flops(jax.make_jaxpr(counted)(w, x0)) == n * one
    assert bench.matmul_flops(jax.make_jaxpr(data_dependent)(w, x0)) == one
    assert bench.matmul_flops(jax.make_jaxpr(strided)(w, x0)) == one


def _step_flops(shape, seq_len=32, batch=2):
    config = bench.shape_config(shape)
    config.data.seq_len, config.train.batch_size = seq_len, batch
    tokenizer = bench.bench_tokenizer(config, None)
    dp, state, spec, _ = bench.build_step(config, tokenizer)
    tokens = dp.place_batch({"tokens": np.zeros((batch, seq_len + 1), np.int32)})
    train_fn = step_lib.bind(spec)[0]
    formula = models.FLOPS_PER_TOKEN[config.model.name](config.model, tokenizer.vocab_size, seq_len)
    jaxpr = bench.matmul_flops(jax.make_jaxpr(train_fn)(state, tokens)) / (batch * seq_len)
    return config, formula, jaxpr, train_fn, state, tokens


def test_lstm_step_matmul_flops_equal_the_formula_custom_vjp_backward_included():
    _, formula, jaxpr, *_ = _step_flops("lstm_tiny")
    assert jaxpr == pytest.approx(formula, rel=1e-9)


def test_lstm_step_flops_with_the_first_layer_projecting_the_vocabulary():
    # LSTM tiny as benchmarked: 2048 tokens per step >= 4 per entry of the 262-entry vocabulary, so the first
    # layer's input projection (forward and both gradients: 6 * d * 4H FLOPs per token) runs over the 262
    # vocabulary rows instead of the 2048 tokens; the formula keeps counting the model's FLOPs
    config, formula, jaxpr, *_ = _step_flops("lstm_tiny", seq_len=128, batch=16)
    m = config.model
    projection = 6 * m.d_model * 4 * m.hidden_size
    assert jaxpr == pytest.approx(formula - projection + projection * 262 / (16 * 128), rel=1e-9)


def test_gpt_step_flops_xla_cost_analysis_within_20_percent_of_formula_and_jaxpr_exact():
    config, formula, jaxpr, train_fn, state, tokens = _step_flops("gpt_tiny", seq_len=128)
    m = config.model
    # the formula counts the causal half of the attention scores (6*L*T*d); the step computes the lower
    # triangle in n query blocks, diagonal tiles in full: (n + 1) / 2n of the matrix, 6*L*T*d / n more
    n = len(attention.block_stops(128, m.attention_query_blocks))
    assert n == 2 and jaxpr == pytest.approx(formula + 6 * m.num_layers * 128 * m.d_model / n, rel=1e-9)
    cost = jax.jit(train_fn).lower(state, tokens).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / (2 * 128)   # batch 2 x 128 tokens
    assert formula <= xla <= 1.2 * formula, (xla, formula)


def test_shapes_validate_and_match_the_torch_reference_widths():
    for name in bench.SHAPES:
        config = bench.shape_config(name)
        config_lib.validate(config)
        assert config.train.batch_size == 16 and config.model.num_layers in (2, 4)
    assert bench.bench_tokenizer(bench.shape_config("gpt_small_v8192"), None).vocab_size == 8192
    with pytest.raises(Exception, match="unknown benchmark shape"):
        bench.shape_config("gpt_huge")


def _launch(args, env=None, timeout=600):
    full_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLM_NO_REEXEC")}
    full_env.update(JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


@pytest.mark.parametrize("extra, env, expect_hugetlb", [
    ([], {}, True), (["--nohugepages"], {}, False), (["--hugepages=false"], {}, False),
    ([], {"JAXLM_NO_REEXEC": "1"}, False)])
def test_launch_reexecs_with_hugetlb_malloc_unless_opted_out_and_keeps_exit_codes(tmp_path, extra, env,
                                                                                  expect_hugetlb):
    probe = tmp_path / "probe.py"   # a config file runs inside the launched process: report what it sees
    probe.write_text("import os, sys\nfrom jaxlm.config import default_config\n"
                     "def get_config():\n"
                     "    print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), file=sys.stderr)\n"
                     "    return default_config()\n")
    r = _launch([f"--config={probe}", "--mode=eval", *extra], env=env)   # eval without --workdir: exit 2
    assert r.returncode == 2, r.stderr
    assert "needs --workdir" in r.stderr
    tunables = [line for line in r.stderr.splitlines() if line.startswith("TUNABLES=")]
    assert len(tunables) == 1   # parsed once: after the exec only
    assert ("glibc.malloc.hugetlb=1" in tunables[0]) == expect_hugetlb


def test_bench_mode_writes_every_field_and_the_table(tmp_path):
    workdir = tmp_path / "bench"
    r = _launch(["--mode=bench", f"--config={ROOT}/benchmarks/shapes.py:gpt_tiny", f"--workdir={workdir}",
                 "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
                 "--config.model.max_len=16", "--config.data.seq_len=16", "--config.train.batch_size=2"],
                env={"JAXLM_CACHE_DIR": str(tmp_path / "cache"), "JAXLM_BENCH_SECONDS": "0.2"})
    assert r.returncode == 0, r.stderr
    assert "| model | params |" in r.stdout and "| gpt_1x32 |" in r.stdout
    report = json.loads((workdir / "bench.json").read_text())
    assert "glibc.malloc.hugetlb=1" in report["machine"]["GLIBC_TUNABLES"]
    assert set(report["peak_flops"]) == {"float32", "bfloat16"} and min(report["peak_flops"].values()) > 0
    (m,) = report["models"]
    for key in ("params", "flops_per_token", "flops_per_token_xla", "flops_per_token_jaxpr", "tokens_per_sec",
                "step_ms_median", "steps_timed", "peak_rss_mb", "minor_faults_per_step", "mfu", "first_loss",
                "last_loss", "other_cpu_frac"):
        assert np.isfinite(m[key]) and m[key] >= 0, key
    for which in ("compile_cold", "compile_cached"):
        for key in ("first_step_s", "trace_s", "lower_s", "xla_compile_s", "compile_s"):
            assert m[which][key] >= 0, (which, key)
    assert m["config"]["vocab_size"] == 262 and m["config"]["seq_len"] == 16
    # parallel.cpu_devices auto: a GPT of batch 2 gets one device per core, up to 2 ...
    assert m["config"]["devices"] == min(2, len(os.sched_getaffinity(0)))
    # ... and XLA's count is still the whole step's, not one device's share: at least the jaxpr's matmul FLOPs
    # (XLA also counts the elementwise work), which equal the formula + 6*L*T*d (see the in-process test above)
    assert m["flops_per_token_jaxpr"] == pytest.approx(m["flops_per_token"] + 6 * 1 * 16 * 32, rel=1e-9)
    assert m["flops_per_token_xla"] >= m["flops_per_token_jaxpr"]
    assert m["peak_flops"] > 0   # the child's device configuration, as training's train/mfu reads it
    assert m["mfu"] == pytest.approx(m["tokens_per_sec"] * m["flops_per_token"] / m["peak_flops"])
    assert m["mfu_executed"] == pytest.approx(m["tokens_per_sec"] * m["flops_per_token_jaxpr"] / m["peak_flops"])
    assert abs(m["first_loss"] - np.log(262)) < 0.5   # random tokens: the untrained model is near uniform


def test_vs_torch_skips_cleanly_without_the_peer_scripts(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"),
                        f"--torch_bench_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Skipping" in r.stdout


def test_vs_torch_judges_each_target_by_its_median_over_rounds(tmp_path):
    """--summarize re-renders a saved run; ratios are against torch's better allocator setting in each round."""
    def jaxlm(tps, mfu, cold, cached):
        return {"tokens_per_sec": tps, "mfu": mfu, "mfu_executed": mfu,
                "compile_cold": {"compile_s": cold, "first_step_s": cold + 1}, "compile_cached": {"compile_s": cached,
                                                                                                  "first_step_s": 1.0}}
    torch = lambda tps: {"tokens_per_sec": tps}   # noqa: E731
    runs = {"gpt_small": {"jaxlm": [jaxlm(130, 0.6, 2.0, 0.2), jaxlm(120, 0.4, 1.4, 0.2), jaxlm(100, 0.55, 2.5, 0.6)],
                          "torch": [torch(100), torch(100), torch(50)],
                          "torch+hugetlb": [torch(90), torch(100), torch(100)]},   # best: 100 / 100 / 100
            "lstm_tiny": {"jaxlm": [jaxlm(99, 0.3, 1.0, 0.1)] * 3, "torch": [torch(100)] * 3,
                          "torch+hugetlb": [torch(10)] * 3}}
    (tmp_path / "run.json").write_text(json.dumps(runs))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"),
                        f"--summarize={tmp_path / 'run.json'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:6]]
            for line in r.stdout.splitlines() if line.startswith("| ") and line.count("|") == 6}
    assert rows[(">= 1.25x torch", "gpt_small")] == ["1.30 / 1.20 / 1.00", "1.20x", "not met (1/3 rounds)"]
    assert rows[(">= 1.00x torch", "lstm_tiny")] == ["0.99 / 0.99 / 0.99", "0.99x", "not met (0/3 rounds)"]
    assert rows[("MFU >= 0.50", "gpt_small")] == ["0.60 / 0.40 / 0.55", "0.55", "**met** (2/3 rounds)"]
    assert not [k for k in rows if k[0].startswith("MFU") and k[1] == "lstm_tiny"]   # MFU targets: small shapes only
    assert rows[("compile cold < 1.5 s", "gpt_small")] == ["2.00 / 1.40 / 2.50", "2.00 s", "not met (1/3 rounds)"]
    assert rows[("compile cached < 0.5 s", "gpt_small")] == ["0.20 / 0.20 / 0.60", "0.20 s", "**met** (2/3 rounds)"]
    assert "| gpt_small | 120 | 100 | 100 | **1.20x** |" in r.stdout   # the per-shape table, from the same rounds
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"),
                        f"--summarize={tmp_path / 'bad.json'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bad.json" in r.stderr, r.stderr

def test_the_table_shows_compile_and_first_step_times_apart():
    row = {"name": "m", "params": 1000, "flops_per_token": 2e6, "flops_per_token_xla": 3e6,
           "flops_per_token_jaxpr": 2.5e6, "tokens_per_sec": 5000.0, "step_ms_median": 40.0, "peak_rss_mb": 600.0,
           "minor_faults_per_step": 12.0, "mfu": 0.25, "mfu_executed": 0.3125,
           "compile_cold": {"compile_s": 1.25, "first_step_s": 1.75},
           "compile_cached": {"compile_s": 0.13, "first_step_s": 0.37}}
    header, _, line = bench.markdown_table([row]).splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["compile s cold / cached"] == "1.25 / 0.13"
    assert cells["first step s cold / cached"] == "1.75 / 0.37"
    assert cells["MFLOP/token formula / XLA / jaxpr"] == "2.00 / 3.00 / 2.50"
    assert cells["MFU model / executed"] == "0.25 / 0.31"


def test_ab_alternates_the_order_and_reports_each_rounds_paired_ratio():
    variants = [ab.parse_variant("base"), ab.parse_variant("new model.gelu_approximate=True"),
                ab.parse_variant("env XLA_FLAGS=--x")]
    assert variants[1] == ("new", {}, {"model.gelu_approximate": "True"}) and variants[2][1] == {"XLA_FLAGS": "--x"}
    assert [v[0] for v in ab.round_order(variants, 0)] == ["base", "new", "env"]
    assert [v[0] for v in ab.round_order(variants, 1)] == ["env", "new", "base"]   # reversed: drift cancels

    def run(tps, cpu):
        return {"tokens_per_sec": tps, "step_ms_median": 1e3 / tps, "cpu_ms_per_step": cpu,
                "minor_faults_per_step": 5.0, "peak_rss_mb": 100.0, "compile": {"first_step_s": 1.0}}
    runs = {"base": [run(100, 10), run(200, 10), run(100, 10)],
            "new": [run(110, 8), run(180, 10), run(130, 5)],
            "env": [run(100, 10), run(200, 10), run(100, 10)]}
    header, _, base_row, new_row, env_row = ab.summary_table(variants, runs)
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in new_row.split("|")]))
    assert cells["per round"] == "1.10 / 0.90 / 1.30" and cells["ratio"] == "1.100"   # median of the paired ratios
    assert cells["faster in"] == "2/3" and cells["CPU-time ratio"] == "1.250"       # median of 10/8, 10/10, 10/5
    assert cells["tokens/s"] == "130" and cells["settings"] == "`model.gelu_approximate=True`"
    assert "| 1.000 | 1.00 / 1.00 / 1.00 | 0/3 |" in env_row


@pytest.mark.parametrize("script, args, named", [
    ("ab.py", ["--shape=gpt_tiny", "--variant=base", "--variant=x model.d_modl=64"], "'model.d_modl'"),
    ("ab.py", ["--shape=gpt_tiny", "--variant=base", "--variant=x model.d_model=wide"], "model.d_model='wide'"),
    ("ab.py", ["--shape=gpt_huge", "--variant=base"], "'gpt_huge'"),
    ("vs_torch.py", ["--shapes=gpt_tiny,lstm_huge"], "lstm_huge"),
    ("levers.py", ["--shape=gpt_tiny", "--variants=base,tanh_gelue"], "tanh_gelue"),
    ("levers.py", ["--shape=experiments/no_such.py"], "no_such.py"),
    ("levers.py", ["--shape=launch.py"], "get_config"),
    ("levers.py", ["--shape=experiments/bert_bpe.py", "--variants=base,bogus"], "bogus"),
    ("levers.py", ["--shape={tmp}/broken.py"], "not valid Python"),
    ("levers.py", ["--shape={tmp}/raises.py"], "ModuleNotFoundError: No module named 'no_such_module'"),
], ids=["ab_key", "ab_value", "ab_shape", "vs_torch_shape", "levers_variant", "levers_no_file", "levers_not_config",
        "levers_file_variant", "levers_syntax_error", "levers_import_error"])
def test_benchmark_scripts_reject_bad_input_in_one_line_before_running(script, args, named, tmp_path):
    # checked before the first run: an unknown levers variant used to be timed silently as the base code
    (tmp_path / "broken.py").write_text("def get_config(:\n")   # an experiment file with a syntax error
    (tmp_path / "raises.py").write_text("import no_such_module\n")   # ... and one that fails to import
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "round 1" not in r.stderr + r.stdout    # nothing was run


def test_the_cached_peak_only_ever_rises(tmp_path, monkeypatch):
    # a measurement taken while other jobs load the machine must not lower the MFU denominator
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(perf, "_PEAK_CACHE", {})
    assert perf.record_peak("float32", 300e9) == 300e9
    assert perf.record_peak("float32", 120e9) == 300e9
    assert perf.record_peak("float32", 330e9) == 330e9
    monkeypatch.setattr(perf, "_PEAK_CACHE", {})
    assert perf.peak_flops("float32") == 330e9          # read back from the file, not re-measured
    with open(tmp_path / "peak_flops.json") as f:
        (key, value), = json.load(f).items()
    assert value == 330e9 and key.endswith(":float32") and perf._cpu_model() in key


_PEAK_WORKER = """
import itertools
import jax
from jaxlm import perf
f, x, a, flops = perf.matmul_chain("float32", n=64, chain=4)
assert len(x.sharding.device_set) == jax.local_device_count() == 4, x.sharding
assert len(f(x, a).sharding.device_set) == 4
clock = itertools.count(0.0, 0.5)                  # every perf_counter() call: +0.5 s, so every timed call: 0.5 s
perf.time.perf_counter = lambda: next(clock)
print(flops, perf.measure_matmul_peak("float32", n=64, repeats=3))
"""


def test_the_matmul_peak_counts_every_local_device(tmp_path):
    # the MFU numerator counts the whole batch over all devices, so the peak must be all devices' together
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAXLM_CACHE_DIR=str(tmp_path),
               PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", _PEAK_WORKER], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    flops, peak = map(float, r.stdout.split())
    assert flops == 4 * 4 * 2 * 64 ** 3                 # 4 devices x a chain of 4 matmuls of 64^3 multiply-adds
    assert peak == pytest.approx(flops / 0.5)


def test_a_machine_counts_once_and_every_accelerator_process_counts():
    # CPU ids: processes on one machine (same id) share its cores; accelerator ids are unique per process
    assert perf.peak_holders(["m/0,1", "m/0,1"]) == [0]
    assert perf.peak_holders(["a/0-7", "b/0-7", "a/0-7", "b/0-7"]) == [0, 1]
    assert perf.peak_holders(["m/0", "m/1"]) == [0, 1]            # pinned to disjoint cores: not shared
    assert perf.peak_holders([f"process {p}" for p in range(4)]) == [0, 1, 2, 3]


_RUN_PEAK_WORKER = """
import sys
import jax
from jaxlm import perf
me, port, machines = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=me)
if machines == "two":
    perf.machine_id = lambda: f"host{me}/0,1"
perf.record_peak("float32", (300e9, 100e9)[me])   # each process's own cache (JAXLM_CACHE_DIR) holds its peak
print(perf.global_peak_flops("float32"))
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("machines, expected", [("one", 300e9), ("two", 400e9)])
def test_a_multi_process_run_sums_the_peak_of_each_machine(tmp_path, machines, expected):
    # two processes on this host share its cores: the run's peak is the machine's (process 0's), not the sum
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _RUN_PEAK_WORKER, str(me), port, machines],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                                       JAXLM_CACHE_DIR=str(tmp_path / str(me))))
             for me in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert float(out.split()[-1]) == expected
