"""Parallelism tests (issue 5), all on CPU: multi-device ones in subprocesses with simulated devices.

* the same 5 AdamW steps under 1 device, jit over 8, fsdp=4 (2 x 4 mesh), pmap over 8 and 2-way accumulation:
  same losses, gradient norms and parameters (relative 1e-5), and fsdp really splits params + optimizer state;
* a stateful LSTM's carry (rows split like the batch) under 1 device, jit 8 and pmap 8;
* 4 accumulated micro-batches of B/4 == one step of B;
* through launch.py: 8 devices == 1 device; a checkpoint written on 8 devices resumes on 1 and vice versa
  and the continued run matches the uninterrupted one;
* 2 processes x 2 devices on 127.0.0.1 (scripts/launch_local.py, fsdp=2 across processes) == 1 process;
* killing one of 2 processes makes the survivor exit 4 with a clear message, not hang; Ctrl-C reaching 2
  processes at different steps stops both at one agreed step with one checkpoint;
* bf16 compute trains (loss falls) with float32 params and optimizer state; remat gives the same gradients.

Parameters are compared as max|a - b| / max|a| over the whole model: Adam turns the float rounding noise of
gradients that are exactly zero in exact arithmetic (attention's key bias) into +-lr steps, so a per-element
relative test would fail for reasons unrelated to parallelism; the gradient norms catch a wrong reduction.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_worker as worker
from child_env import child_env
from jaxlm import config as config_lib
from jaxlm import parallel
from jaxlm.errors import UserError
from jaxlm.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.py")
LAUNCH_LOCAL = os.path.join(ROOT, "scripts", "launch_local.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import launch_local  # noqa: E402

RTOL = 1e-5


def _env(devices: int, tmp_path, **extra) -> dict:
    """Environment of a launch.py child: CPU with `devices` simulated devices, and one compilation cache for
    the whole session (a resumed run reuses the programs the uninterrupted run compiled)."""
    cache = os.path.join(os.path.dirname(str(tmp_path)), "jaxlm-compilation-cache")   # tmp_path: BASETEMP/x
    env = child_env(xla_flags=f"--xla_force_host_platform_device_count={devices}", JAXLM_NO_REEXEC="1",
                    JAXLM_CACHE_DIR=cache, PYTHONPATH=ROOT)
    env.update(extra)
    return env


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


# ---- in this process (1 device) ----------------------------------------------------------------------------

def test_grad_accumulation_equals_full_batch():
    """4 micro-batches of B/4, summed then divided, == one step on B (3 steps, same data)."""
    data = worker.batches(worker.tiny_config(), steps=3)
    full, full_state, _, _ = worker.train(worker.tiny_config(), data)
    accum, accum_state, _, _ = worker.train(worker.tiny_config(**{"train.grad_accum_steps": 4}), data)
    assert _rel(full[:, 0], accum[:, 0]) < RTOL and _rel(full[:, 1], accum[:, 1]) < RTOL, (full, accum)
    a = np.concatenate([x.ravel() for x in jax.tree.leaves(full_state.params)])
    b = np.concatenate([x.ravel() for x in jax.tree.leaves(accum_state.params)])
    assert _rel(a, b) < RTOL


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_bfloat16_trains_with_float32_params_and_optimizer(model):
    config = worker.tiny_config(**{"model.name": model, "model.dtype": "bfloat16", "model.hidden_size": 32,
                                   "optim.learning_rate": 1e-2, "train.batch_size": 8})
    pattern = (np.arange(config.data.seq_len + 1)[None] * 3 + np.arange(8)[:, None]) % 7   # learnable sequences
    data = [{"tokens": pattern.astype(np.int32)}] * 25
    losses, host, _, _ = worker.train(config, data)
    assert np.all(np.isfinite(losses[:, 0]))
    assert losses[-1, 0] < 0.6 * losses[0, 0], losses[:, 0]   # ln 40 -> below ln 7
    leaves = jax.tree.leaves((host.params, host.opt_state))
    assert all(x.dtype in (np.float32, np.int32) for x in leaves), {x.dtype for x in leaves}


def test_remat_gives_the_same_gradients():
    batch = worker.batches(worker.tiny_config(), steps=1)[0]
    grads, jaxprs = {}, {}
    for remat in (False, True):
        config = worker.tiny_config(**{"model.remat": remat, "model.dropout": 0.1})
        dp, host, _ = worker.build(config)
        spec = dp._train_step.keywords["spec"]
        key = jax.random.key(3)

        def loss(p, spec=spec):
            return step_lib.objective_sums(spec, p, batch, None, dropout_key=key)[0]["loss"]

        grads[remat] = jax.jit(jax.grad(loss))(jax.tree.map(jnp.asarray, host.params))
        jaxprs[remat] = str(jax.make_jaxpr(jax.grad(loss))(host.params))
    assert "remat" in jaxprs[True] or "checkpoint" in jaxprs[True]
    assert "remat" not in jaxprs[False] and "checkpoint" not in jaxprs[False]
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[False])])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[True])])
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


# ---- in one process with 8 simulated devices ---------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _strategies_worker(tmp_path_factory):
    """Started with the first test of the file, so it runs on the second core while the 1-device tests run."""
    out = str(tmp_path_factory.mktemp("strategies") / "out.npz")
    log = open(out + ".log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "parallel_worker.py"), "strategies", out],
                            env=_env(8, os.path.dirname(out)), stdout=log, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def strategies(_strategies_worker):
    proc, out = _strategies_worker
    proc.wait(timeout=400)
    assert proc.returncode == 0, pathlib.Path(out + ".log").read_text()[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("name", ["jit8", "fsdp4", "pmap8", "accum8"])
def test_strategies_match_one_device(strategies, name):
    ref = strategies["one/losses"]
    got = strategies[f"{name}/losses"]
    assert ref.shape == (worker.STEPS, 2)
    assert _rel(ref[:, 0], got[:, 0]) < RTOL, (ref, got)       # losses
    assert _rel(ref[:, 1], got[:, 1]) < RTOL, (ref, got)       # gradient norms (a missing/extra psum shows here)
    keys = sorted(k.split("/", 1)[1] for k in strategies if k.startswith("one/params"))
    assert keys and all(f"{name}/{k}" in strategies for k in keys)
    ref_p = np.concatenate([strategies[f"one/{k}"].ravel() for k in keys])
    got_p = np.concatenate([strategies[f"{name}/{k}"].ravel() for k in keys])
    assert _rel(ref_p, got_p) < RTOL
    assert not np.array_equal(ref_p, np.concatenate([strategies[f"one/{k}"].ravel() * 0 for k in keys]))


def test_fsdp_splits_params_and_optimizer_state(strategies):
    ref_keys = sorted(k.split("/", 1)[1] for k in strategies if k.startswith("one/opt"))
    ref = np.concatenate([strategies[f"one/{k}"].ravel() for k in ref_keys])
    got = np.concatenate([strategies[f"fsdp4/{k}"].ravel() for k in ref_keys])
    assert _rel(ref, got) < RTOL   # Adam moments gathered back match too
    for part in ("params", "opt_state"):
        local, total = int(strategies[f"fsdp4/{part}_local_elems"]), int(strategies[f"fsdp4/{part}_elems"])
        assert local <= total / 4 + 16, (part, local, total)   # only scalars (Adam's count) are replicated


@pytest.mark.parametrize("name", ["lstm_jit8", "lstm_pmap8"])
def test_stateful_carry_follows_batch_rows(strategies, name):
    assert _rel(strategies["lstm_one/losses"], strategies[f"{name}/losses"]) < RTOL
    assert _rel(strategies["lstm_one/carry"], strategies[f"{name}/carry"]) < RTOL   # gathered in row order
    assert np.abs(strategies["lstm_one/carry"]).max() > 0
    assert _rel(strategies["lstm_one/after_restore"], strategies[f"{name}/after_restore"]) < RTOL


@pytest.mark.parametrize("model", ["gpt", "gpt_query_blocks", "bert", "rnn", "lstm", "elmo"])
def test_data_parallel_step_never_gathers_the_batch(strategies, model):
    """Each device computes only its rows: no all-gather in the jit-8 train step (the LSTM's time-major input
    projections once made XLA gather the whole batch onto every device), and the gradients are all-reduced."""
    gathers, reduces = strategies[f"gathers/{model}"]
    assert gathers == 0
    assert reduces >= 1


def test_dropout_draws(strategies):
    """jit over 8 reproduces the 1-device dropout masks exactly; pmap draws its own per device (close, not equal)."""
    one, jit8, pmap8 = (strategies[f"{n}/losses"][:, 0] for n in ("drop_one", "drop_jit8", "drop_pmap8"))
    assert _rel(one, jit8) < RTOL
    assert _rel(one, pmap8) > 1e-5 and _rel(one, pmap8) < 1e-2


def test_fsdp_spec_picks_largest_divisible_axis():
    P = jax.sharding.PartitionSpec
    assert parallel.fsdp_spec((32, 96), 4) == P(None, "fsdp")
    assert parallel.fsdp_spec((96, 32), 4) == P("fsdp", None)
    assert parallel.fsdp_spec((6, 40), 4) == P(None, "fsdp")
    assert parallel.fsdp_spec((6, 7), 4) == P()      # nothing divisible: replicated
    assert parallel.fsdp_spec((), 4) == P()
    assert parallel.fsdp_spec((64, 64), 1) == P()
    assert parallel.fsdp_spec((64, 64), 2) == P("fsdp", None)   # ties: the first axis


def _cpu_config(name="gpt", batch=16, accum=1, cpu_devices=0, study=False):
    c = config_lib.default_config()
    c.model.name, c.train.batch_size, c.train.grad_accum_steps, c.parallel.cpu_devices = name, batch, accum, cpu_devices
    if study:
        c.study = {"models": "lstm,gpt"}
    return c


def test_cpu_devices_auto_is_one_per_core():
    assert parallel.cpu_device_count(_cpu_config("gpt"), cores=2) == 2
    assert parallel.cpu_device_count(_cpu_config("bert"), cores=8) == 8
    assert parallel.cpu_device_count(_cpu_config("gpt", batch=12), cores=8) == 6    # largest count splitting the batch
    assert parallel.cpu_device_count(_cpu_config("gpt", batch=3), cores=2) == 1
    # 2 devices would leave 4 rows each: too few for 8 micro-batches
    assert parallel.cpu_device_count(_cpu_config("gpt", batch=8, accum=8), cores=2) == 1
    for name in ("rnn", "lstm", "elmo"):
        assert parallel.cpu_device_count(_cpu_config(name), cores=2) == 2
    assert parallel.cpu_device_count(_cpu_config("gpt", study=True), cores=2) == 1   # a study: models too small to gain
    assert parallel.cpu_device_count(_cpu_config("lstm", cpu_devices=3), cores=2) == 3   # explicit wins


def test_cpu_devices_is_left_alone_once_chosen():
    """A count forced by XLA_FLAGS (tests, launch_local) and started backends are not overridden."""
    jax.devices()   # this process's backends are running
    assert parallel.configure_cpu_devices(_cpu_config("gpt")) is None
    code = ("from jaxlm import config, parallel; import jax; c = config.default_config(); "
            "print(parallel.configure_cpu_devices(c), jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3"))
    assert out.stdout.split() == ["None", "3"], out.stderr[-2000:]


def test_cpu_devices_explicit_count_splits_a_fresh_process():
    code = ("from jaxlm import config, parallel; import jax; c = config.default_config(); "
            "c.parallel.cpu_devices = 4; print(parallel.configure_cpu_devices(c), jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.stdout.split() == ["4", "4"], out.stderr[-2000:]
    c = _cpu_config("gpt", batch=8, cpu_devices=3)
    with pytest.raises(UserError, match="parallel.cpu_devices=3"):
        config_lib.validate(c)


# ---- through launch.py: device counts, checkpoints across them, processes ------------------------------------

STEPS = 6


def _launch_args(corpus: str, workdir: str, steps: int = STEPS, log_every: int = 1) -> list[str]:
    return ["--config=" + os.path.join(ROOT, "experiments", "gpt_char.py"), f"--config.data.source=text:{corpus}",
            "--config.data.tokenizer=bytes", "--config.model.num_layers=1", "--config.model.d_model=32",
            "--config.model.num_heads=2", "--config.model.max_len=16", "--config.data.seq_len=16",
            f"--config.train.steps={steps}", "--config.train.batch_size=8", f"--config.train.log_every={log_every}",
            "--config.train.eval_every=3", "--config.train.checkpoint_every=3", "--config.train.eval_batches=1",
            "--config.train.sample_length=0", "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
            f"--workdir={workdir}"]


def _start(args, env, log: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, LAUNCH, *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT)


def _finish(procs_and_logs, timeout: float = 300):
    for proc, log in procs_and_logs:
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, pathlib.Path(log).read_text()[-3000:]


def _metrics(workdir: str) -> dict:
    """{step: {train/...: v, eval/...: v}} from metrics.jsonl (later lines win)."""
    out: dict = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row)
    return out


def _assert_same_run(a: dict, b: dict, steps):
    for step in steps:
        for key in ("train/loss", "train/grad_norm", "train/param_norm"):
            assert abs(a[step][key] - b[step][key]) <= RTOL * abs(a[step][key]), (step, key, a[step][key], b[step][key])
    assert abs(a[STEPS]["eval/loss"] - b[STEPS]["eval/loss"]) <= RTOL * a[STEPS]["eval/loss"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, 6000)))
    return str(path)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, corpus):
    """Uninterrupted 6-step runs on 1 and on 8 devices (started together: 2 cores)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {n: str(root / f"dev{n}") for n in (1, 8)}
    started = [(_start(_launch_args(corpus, runs[n]), _env(n, root), runs[n] + ".log"), runs[n] + ".log")
               for n in (1, 8)]
    _finish(started)
    return runs


def test_eight_devices_match_one_through_launch(full_runs):
    one, eight = _metrics(full_runs[1]), _metrics(full_runs[8])
    _assert_same_run(one, eight, range(1, STEPS + 1))
    assert one[STEPS]["train/loss"] < one[1]["train/loss"]


def test_checkpoint_resumes_across_device_counts(full_runs, tmp_path):
    """Step-3 checkpoint of the 8-device run continued on 1 device (and vice versa) == the uninterrupted run."""
    started = []
    for saved_on, resume_on in ((8, 1), (1, 8)):
        workdir = str(tmp_path / f"from{saved_on}on{resume_on}")
        shutil.copytree(full_runs[saved_on], workdir)
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
        os.remove(os.path.join(workdir, "metrics.jsonl"))
        started.append((_start(_launch_args(_corpus_of(workdir), workdir), _env(resume_on, str(tmp_path)),
                               workdir + ".log"), workdir + ".log"))
    _finish(started)
    for saved_on, resume_on in ((8, 1), (1, 8)):
        resumed = _metrics(str(tmp_path / f"from{saved_on}on{resume_on}"))
        assert min(resumed) == 4, sorted(resumed)   # it really resumed from step 3
        _assert_same_run(_metrics(full_runs[saved_on]), resumed, range(4, STEPS + 1))


def _corpus_of(workdir: str) -> str:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)["data"]["source"].split(":", 1)[1]


def test_two_processes_match_one(full_runs, corpus, tmp_path):
    """2 processes x 2 devices on 127.0.0.1 via scripts/launch_local.py (fsdp=2 across them) == 1 process."""
    workdir = str(tmp_path / "mp")
    proc = subprocess.run([sys.executable, LAUNCH_LOCAL, "--num_processes=2", "--devices_per_process=2", "--",
                           *_launch_args(corpus, workdir), "--config.parallel.fsdp=2"],
                          env=_env(1, str(tmp_path)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "4 device(s)" in proc.stdout
    _assert_same_run(_metrics(full_runs[1]), _metrics(workdir), range(1, STEPS + 1))
    assert len([n for n in os.listdir(workdir) if n.startswith("events.out")]) == 1   # only process 0 writes
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert len([json.loads(line)["step"] for line in f if '"train/loss"' in line]) == STEPS
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_peer_makes_survivor_exit_with_a_clear_message(corpus, tmp_path, victim):
    """Process 1 killed: process 0 exits 4 with a clear line (its failed collective or, if that blocks, its
    watchdog after JAXLM_PEER_TIMEOUT).  Process 0 (the coordinator) killed: JAX aborts process 1 at once
    with its own 'another task died' message, unless gloo's failed collective reaches jaxlm's handler first."""
    workdir = str(tmp_path / "kill")
    env = _env(1, str(tmp_path), JAXLM_PEER_TIMEOUT="10")
    address = f"127.0.0.1:{launch_local.free_port()}"
    args = _launch_args(corpus, workdir, steps=100000, log_every=4)
    procs = [subprocess.Popen([sys.executable, LAUNCH, *args, f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={i}"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    survivor = procs[1 - victim]
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.monotonic() + 240
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 500):   # both are training
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[victim].kill()
        killed = time.monotonic()
        _, err = survivor.communicate(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()
    assert elapsed < 120
    if victim == 1:
        assert survivor.returncode == parallel.EXIT_PEER_LOST, err[-2000:]
        # the watchdog's line, or (when gloo notices the closed connection first) the failed collective's
        assert ("process 0 of 2: process 1 stopped responding" in err
                or "process 0 of 2: a collective with the other processes failed" in err), err[-2000:]
        assert "restart all processes" in err, err[-2000:]
    else:
        assert survivor.returncode != 0, err[-2000:]
        # jax's coordination-service message, the watchdog's, or (gloo noticing the reset connection first) the
        # failed collective's, which also tells the user how to resume
        assert ("another task died" in err or "stopped responding" in err or "coordination service" in err
                or ("process 1 of 2: a collective with the other processes failed" in err
                    and "restart all processes" in err)), err[-2000:]


@pytest.mark.parametrize("what", ["corpus", "config"])
def test_a_check_failing_on_one_host_stops_every_process_with_its_message(corpus, tmp_path, what):
    """Process 1's corpus does not exist, or its config is invalid (an experiment file edited on its host only):
    both processes exit 2 at once, process 0 naming process 1 and the problem, instead of waiting for a peer
    that has gone (initialize's 120 s timeout)."""
    missing = str(tmp_path / "not_on_this_host.txt")
    needle = missing if what == "corpus" else "batch_size=0"
    address = f"127.0.0.1:{launch_local.free_port()}"

    def args(i):
        if not i:
            return _launch_args(corpus, str(tmp_path / "run"))
        if what == "corpus":
            return _launch_args(missing, str(tmp_path / "run"))
        return [*_launch_args(corpus, str(tmp_path / "run")), "--config.train.batch_size=0"]

    procs = [subprocess.Popen([sys.executable, LAUNCH, *args(i),
                               f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                              env=_env(1, str(tmp_path)), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=100)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "process 1 of 2: " in errs[0] and needle in errs[0], errs[0][-2000:]
    assert needle in errs[1] and "Traceback" not in errs[0] + errs[1], errs[1][-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_interrupt_stops_every_process_at_the_same_step(corpus, tmp_path):
    """Ctrl-C reaching the 2 processes 0.5 s apart: they agree on the step, checkpoint it once and exit 130."""
    workdir = str(tmp_path / "sigint")
    address = f"127.0.0.1:{launch_local.free_port()}"
    args = _launch_args(corpus, workdir, steps=100000, log_every=4)
    procs = [subprocess.Popen([sys.executable, LAUNCH, *args, f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={i}"], env=_env(1, str(tmp_path)), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.monotonic() + 240
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 1000):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGINT)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGINT)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [130, 130], [e[-1500:] for e in errs]
    assert all("interrupted by SIGINT at step " in e for e in errs), [e[-1500:] for e in errs]
    steps = [int(e.split("interrupted by SIGINT at step ")[1].split(";")[0]) for e in errs]
    assert steps[0] == steps[1] and steps[0] % 4 == 0, steps   # agreed at a log_every boundary
    assert str(steps[0]) in os.listdir(os.path.join(workdir, "checkpoints"))


def test_initialize_distributed_rejects_partial_flags():
    with pytest.raises(UserError, match="need all of"):
        parallel.initialize_distributed("127.0.0.1:1234", None, None)
    with pytest.raises(UserError, match="process_id"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 5)
    with pytest.raises(UserError, match="HOST:PORT"):
        parallel.initialize_distributed("localhost", 2, 0)
    assert parallel.initialize_distributed(None, None, None) is False
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False
