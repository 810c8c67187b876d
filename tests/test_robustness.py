"""Faults, end to end through launch.py in subprocesses: kill -9, SIGTERM, damaged checkpoints, divergence,
failing writes and conflicting resumes (issue 7). Every run is a tiny GPT on a small text corpus.

Exact kill points come from a driver (``_DRIVER``) that runs launch.py unchanged after wrapping
``Checkpointer.save``/``wait`` and Orbax's commit (``finalize``) so that the process SIGKILLs itself at a
chosen step: before a save, with the arrays written but the step not committed, or after a save completed.
One more kill comes from outside, at whatever moment the test's poll notices the first checkpoint.
With a constant learning rate, runs of different ``train.steps`` follow the same trajectory, so every
resumed run is compared bitwise with one uninterrupted reference run.
"""

import glob
import json
import ast
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from child_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.max_len=32", "--config.data.seq_len=32", "--config.train.batch_size=4",
        "--config.train.log_every=2", "--config.train.eval_every=4", "--config.train.eval_batches=2",
        "--config.train.checkpoint_every=4", "--config.train.sample_length=8", "--config.data.tokenizer=bytes",
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0", "--config.model.dropout=0.1"]

_DRIVER = r'''
"""Runs launch.py with a fault planted at JAXLM_FAULT = "POINT:STEP" (test-only; launch.py is unchanged)."""
import json, os, runpy, signal, sys
sys.path.insert(0, os.environ["JAXLM_ROOT"])
from jaxlm import checkpoint
from jaxlm.train import loop
from orbax.checkpoint._src.path import atomicity

point, target = os.environ["JAXLM_FAULT"].split(":")
target = int(target)


def die(directory):
    with open(os.environ["JAXLM_FAULT_MARKER"], "w") as f:
        json.dump({"point": point, "listing": sorted(os.listdir(directory))}, f)
    os.kill(os.getpid(), signal.SIGKILL)


save, wait, finalize = checkpoint.Checkpointer.save, checkpoint.Checkpointer.wait, atomicity.AtomicRenameTemporaryPath.finalize
evaluate = loop.evaluate


def hooked_save(self, step, *args, **kwargs):
    if point == "before_save" and int(step) == target:
        wait(self)   # earlier saves complete: the kill lands between two saves
        die(self.directory)
    if point == "replace_dir" and int(step) == target:   # not a kill: the directory stops being writable
        wait(self)
        os.rename(self.directory, self.directory + ".moved")
        with open(self.directory, "w") as f:
            f.write("a file where the checkpoint directory was")
    return save(self, step, *args, **kwargs)


def hooked_wait(self):
    pending = self._pending
    wait(self)
    if point == "after_save" and pending == target:
        die(self.directory)


async def hooked_finalize(self):
    if point == "before_commit" and self._final_path.name == str(target):
        die(str(self._final_path.parent))   # arrays written, step directory not yet renamed into place
    return await finalize(self)


def hooked_evaluate(run, step, **kwargs):
    if point == "sigterm_in_eval" and step == target:
        os.kill(os.getpid(), signal.SIGTERM)   # handled at the next bytecode: during this evaluation
    if point == "ctrl_c_in_finaliser" and step == target:
        class Finalised:
            def __del__(self):   # as when a Ctrl-C lands while a GC callback or weakref finaliser runs
                raise KeyboardInterrupt
        Finalised()
    return evaluate(run, step, **kwargs)


checkpoint.Checkpointer.save, checkpoint.Checkpointer.wait = hooked_save, hooked_wait
loop.evaluate = hooked_evaluate
atomicity.AtomicRenameTemporaryPath.finalize = hooked_finalize
sys.argv = [os.path.join(os.environ["JAXLM_ROOT"], "launch.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _env(extra=None):
    return child_env(JAXLM_ROOT=ROOT, **(extra or {}))


def launch(*args, env=None, timeout=300, prefix=()):
    return subprocess.run([sys.executable, *prefix, os.path.join(ROOT, "launch.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=_env(env), timeout=timeout)


def launch_with_fault(tmp_path, fault, *args):
    """launch.py with a planted fault; returns (result, the marker a killed child wrote just before dying)."""
    driver = tmp_path / "fault_driver.py"
    driver.write_text(_DRIVER)
    marker = tmp_path / f"marker-{fault.replace(':', '-')}.json"
    r = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=_env({"JAXLM_FAULT": fault, "JAXLM_FAULT_MARKER": str(marker)}))
    return r, (json.loads(marker.read_text()) if marker.exists() else None)


def stderr_lines(r):
    return [line for line in r.stderr.splitlines() if line.strip()]


def params_of(workdir):
    from jaxlm import runs
    import jax
    trained = runs.load(str(workdir))
    return trained.step, [np.asarray(x) for x in jax.tree.leaves(trained.params)]


def assert_same_params(a, b):
    (step_a, leaves_a), (step_b, leaves_b) = a, b
    assert step_a == step_b
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def checkpoint_steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def train_losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out.setdefault(row["step"], []).append(row["train/loss"])
    return out


@pytest.fixture(scope="module")
def common(corpus):
    return [f"--config.data.source=text:{corpus}", *TINY]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common):
    """An uninterrupted 16-step run: (workdir, (step, params))."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    r = launch(f"--workdir={workdir}", "--config.train.steps=16", *common)
    assert r.returncode == 0, r.stderr
    return workdir, params_of(workdir)


@pytest.fixture(scope="module")
def base8(tmp_path_factory, common):
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8 (tests work on copies)."""
    workdir = str(tmp_path_factory.mktemp("base8") / "run")
    r = launch(f"--workdir={workdir}", "--config.train.steps=8", *common)
    assert r.returncode == 0, r.stderr
    assert checkpoint_steps(workdir) == [4, 8]
    return workdir


def copy_run(src, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------- kill -9

def test_kill9_before_during_and_after_saves_then_rerun_is_bitwise_identical(tmp_path, common, reference):
    """One workdir killed four times, each rerun being the same command, then a rerun that finishes."""
    workdir = str(tmp_path / "run")
    cmd = [f"--workdir={workdir}", "--config.train.steps=16", *common]

    # 1. mid-save: step 8's arrays are written but the step is not committed (only its tmp directory exists).
    r, marker = launch_with_fault(tmp_path, "before_commit:8", *cmd)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert marker and "8" not in marker["listing"], marker
    assert any(n.startswith("8.orbax-checkpoint-tmp") for n in marker["listing"]), marker
    # 2. rerun from step 4; killed as it is about to save step 12 (steps 9-12 trained and lost).
    r, marker = launch_with_fault(tmp_path, "before_save:12", *cmd)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resuming from step 4" in r.stdout, r.stdout
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))   # the leftover was cleaned up
    assert marker["listing"] == ["4", "8"], marker
    # 3. rerun from step 8; killed right after step 12 is complete on disk.
    r, marker = launch_with_fault(tmp_path, "after_save:12", *cmd)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resuming from step 8" in r.stdout, r.stdout
    assert "12" in marker["listing"], marker
    # 4. rerun from step 12; killed after the final step-16 save completed (before the process could exit).
    r, marker = launch_with_fault(tmp_path, "after_save:16", *cmd)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resuming from step 12" in r.stdout, r.stdout
    # 5. the same command once more: nothing left to train, exits 0.
    r = launch(*cmd)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 16" in r.stdout, r.stdout
    assert checkpoint_steps(workdir) == [12, 16]
    assert_same_params(params_of(workdir), reference[1])
    # Every (re)logged training loss equals the uninterrupted run's at that step.
    ref_losses = train_losses(reference[0])
    for step, losses in train_losses(workdir).items():
        assert all(loss == ref_losses[step][0] for loss in losses), (step, losses, ref_losses[step])


def test_kill9_from_outside_at_the_first_save_then_rerun_is_bitwise_identical(tmp_path, common, reference):
    workdir = str(tmp_path / "run")
    cmd = [f"--workdir={workdir}", "--config.train.steps=16", *common]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *cmd], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not glob.glob(os.path.join(workdir, "checkpoints", "4*")) and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        assert proc.wait(60) == -signal.SIGKILL   # it was still running: the kill landed mid-run
    r = launch(*cmd)
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stdout or "starting" in r.stdout
    assert_same_params(params_of(workdir), reference[1])


# ---------------------------------------------------------------------------------------------- SIGTERM

def _wait_for_training(proc, workdir, timeout=240):
    """Until metrics.jsonl has a training row (the loop and its signal handlers are live)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the run ended before it was signalled"
        assert time.time() < deadline, "training never started"
        if os.path.exists(path) and "train/loss" in pathlib.Path(path).read_text():
            return
        time.sleep(0.01)


def _signalled_run(cmd, workdir, *signals, gap=0.05):
    """launch.py `cmd`, sent `signals` (`gap` s apart) once training runs; returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *cmd], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_training(proc, workdir)
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_saves_a_checkpoint_exits_130_and_the_rerun_resumes(tmp_path, common):
    workdir = str(tmp_path / "run")
    cmd = [f"--workdir={workdir}", "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
           "--config.train.eval_every=100000", *common]
    returncode, err = _signalled_run(cmd, workdir, signal.SIGTERM)
    assert returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in err, err
    step = checkpoint_steps(workdir)[-1]
    assert f"at step {step}" in lines[0]    # saved where it stopped (a periodic save may precede it)
    rows = [json.loads(line) for line in pathlib.Path(os.path.join(workdir, "metrics.jsonl")).read_text().splitlines()]
    assert rows[-1]["step"] == step                                   # metrics flushed up to the last step
    assert glob.glob(os.path.join(workdir, "events.out.tfevents*"))
    r = launch(*cmd[:1], f"--config.train.steps={step + 4}", *cmd[2:])   # train.steps may change on resume
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {step}" in r.stdout
    assert checkpoint_steps(workdir)[-1] == step + 4


def test_sigterm_during_the_final_evaluation_lets_the_run_finish(tmp_path, common):
    workdir = str(tmp_path / "run")
    r, _ = launch_with_fault(tmp_path, "sigterm_in_eval:8", f"--workdir={workdir}", "--config.train.steps=8", *common)
    assert r.returncode == 0, r.stderr
    assert checkpoint_steps(workdir) == [4, 8]


def test_a_ctrl_c_that_lands_in_a_finaliser_still_stops_the_run_at_once(tmp_path, common):
    # Python would print it as "Exception ignored in ..." with a traceback, and train on
    workdir = str(tmp_path / "run")
    r, _ = launch_with_fault(tmp_path, "ctrl_c_in_finaliser:8", f"--workdir={workdir}", "--config.train.steps=12",
                             *common)
    assert r.returncode == 130, r.stderr
    assert stderr_lines(r) == ["launch.py: error: interrupted (Ctrl-C): stopped at once; the last complete "
                               "checkpoint is kept"], r.stderr
    assert checkpoint_steps(workdir) in ([], [4])   # stopped in step 8's evaluation, before its save


def test_two_sigints_stop_at_once_with_exit_130(tmp_path, common):
    workdir = str(tmp_path / "run")
    # 50 ms apart: two separate deliveries (back to back, Python may run the handler once)
    returncode, err = _signalled_run([f"--workdir={workdir}", *common, "--config.train.steps=100000"], workdir,
                                     signal.SIGINT, signal.SIGINT)
    assert returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    # Orbax may add a line of its own when the second Ctrl-C lands in a save (its writer thread is cut short).
    ours = [line for line in lines if not line.startswith(("ERROR:absl:", "WARNING:absl:"))]
    assert len(ours) == 1 and ours[0].startswith("launch.py: error: interrupted"), err
    assert "Traceback" not in err, err
    done = max(checkpoint_steps(workdir), default=0)   # whatever was complete is usable: the rerun resumes
    r = launch(f"--workdir={workdir}", *common, f"--config.train.steps={done + 2}")
    assert r.returncode == 0, r.stderr
    assert (f"resuming from step {done}" if done else "starting") in r.stdout


# ------------------------------------------------------------------------------------ damaged checkpoints

def _largest_data_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _garbage(step_dir):
    path = _largest_data_file(step_dir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(np.random.default_rng(0).bytes(size // 2))


@pytest.mark.parametrize("damage", [_truncate, _delete_metadata, _garbage], ids=["truncated", "deleted", "garbage"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, common, base8, damage):
    """Resume past a damaged step 8 from step 4; the re-trained step 8 replaces it and equals the original."""
    workdir = copy_run(base8, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "8"))
    r = launch(f"--workdir={workdir}", "--config.train.steps=8", *common)
    assert r.returncode == 0, r.stderr
    assert "checkpoint step 8" in r.stderr and "unusable" in r.stderr and "falling back to step 4" in r.stderr
    assert "resuming from step 4" in r.stdout
    assert "Traceback" not in r.stderr
    assert checkpoint_steps(workdir) == [4, 8]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.unusable"))   # kept for inspection
    assert_same_params(params_of(workdir), params_of(base8))


def test_all_checkpoints_unusable_is_exit_2_never_a_fresh_start(tmp_path, common, base8):
    workdir = copy_run(base8, tmp_path)
    _truncate(os.path.join(workdir, "checkpoints", "8"))
    _delete_metadata(os.path.join(workdir, "checkpoints", "4"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    metrics_before = pathlib.Path(os.path.join(workdir, "metrics.jsonl")).read_text()
    r = launch(f"--workdir={workdir}", "--config.train.steps=8", *common)
    assert r.returncode == 2, r.stderr
    last = stderr_lines(r)[-1]
    assert last.startswith("launch.py: error: no usable checkpoint") and "[4, 8]" in last, r.stderr
    assert "--restart" in last, last                                 # says how to start over deliberately
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert pathlib.Path(os.path.join(workdir, "metrics.jsonl")).read_text() == metrics_before
    # --restart is the explicit way out: the old run is set aside, not deleted.
    r = launch(f"--workdir={workdir}", "--config.train.steps=4", "--restart", *common)
    assert r.returncode == 0, r.stderr
    assert checkpoint_steps(workdir) == [4]
    (previous,) = glob.glob(os.path.join(workdir, "previous-*"))
    assert sorted(os.listdir(os.path.join(previous, "checkpoints"))) == before


# ---------------------------------------------------------------------------------------------- divergence

def test_divergence_exits_3_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, common, base8):
    """Resumed at step 8 with a learning rate of 1e30 (a real config): step 9 blows the parameters up to ~1e30,
    step 10's loss is NaN."""
    workdir = copy_run(base8, tmp_path)
    r = launch(f"--workdir={workdir}", *common, "--config.train.steps=16", "--config.optim.learning_rate=1e30")
    assert r.returncode == 3, r.stderr
    lines = stderr_lines(r)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "non-finite loss or gradients at step 10" in lines[0] and "last good checkpoint: step 8" in lines[0]
    assert checkpoint_steps(workdir) == [4, 8]
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    assert_same_params(params_of(workdir), params_of(base8))


def test_skip_nonfinite_counts_skipped_steps_and_keeps_the_parameters(tmp_path, common):
    """From step 2 on every step is non-finite: all 15 are skipped and the parameters stay those of step 1."""
    workdir = str(tmp_path / "run")
    r = launch(f"--workdir={workdir}", "--config.train.steps=16", "--config.optim.learning_rate=1e30",
               "--config.optim.grad_clip=0", "--config.train.skip_nonfinite=True",
               "--config.train.keep_checkpoints=4", *common)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in pathlib.Path(os.path.join(workdir, "metrics.jsonl")).read_text().splitlines()]
    skipped = {row["step"]: row["train/skipped_steps"] for row in rows if "train/skipped_steps" in row}
    assert skipped == {s: s - 1 for s in range(2, 17, 2)}
    step, final = params_of(workdir)
    assert step == 16 and all(np.isfinite(x).all() for x in final)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "16"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    assert_same_params((16, params_of(workdir)[1]), (16, final))     # step 4 holds the very same parameters


# ---------------------------------------------------------------------------------------- failing writes

# Runs the rest of the command line with files limited to 64 KiB: a simulated full disk (EFBIG), root or not.
_SMALL_FILES = ("-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def test_a_failing_checkpoint_write_is_a_clear_error_and_earlier_checkpoints_stay_readable(tmp_path, common, base8):
    workdir = copy_run(base8, tmp_path)
    # No compilation cache: writing a (> 64 KiB) cache entry would fail too, with a warning of its own.
    r = launch(f"--workdir={workdir}", "--config.train.steps=16", "--nocompilation_cache", *common,
               prefix=_SMALL_FILES)
    assert r.returncode == 2, r.stderr
    last = stderr_lines(r)[-1]
    assert last.startswith("launch.py: error: could not write checkpoint step 12") and "File too large" in last
    assert "Traceback" not in r.stderr, r.stderr
    assert checkpoint_steps(workdir) == [4, 8]
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    assert_same_params(params_of(workdir), params_of(base8))


def test_a_failing_metrics_write_is_one_line_and_checkpoints_stay_readable(tmp_path, common, base8):
    """The disk fills up under metrics.jsonl (grown to the 64 KiB limit) rather than under a checkpoint."""
    workdir = copy_run(base8, tmp_path)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 1, "padding": 0}\n' * 3000)   # rows before the restored step: kept on resume
    r = launch(f"--workdir={workdir}", "--config.train.steps=16", "--nocompilation_cache", *common,
               prefix=_SMALL_FILES)
    assert r.returncode == 2, r.stderr
    lines = stderr_lines(r)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("launch.py: error: I/O error") and "File too large" in lines[0], lines[0]
    assert checkpoint_steps(workdir) == [4, 8]
    assert_same_params(params_of(workdir), params_of(base8))


def test_checkpoint_directory_replaced_by_a_file_mid_run_is_a_clear_error(tmp_path, common, base8):
    workdir = copy_run(base8, tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    r, _ = launch_with_fault(tmp_path, "replace_dir:12", f"--workdir={workdir}", "--config.train.steps=16", *common)
    assert r.returncode == 2, r.stderr
    lines = stderr_lines(r)
    assert lines[-1] == f"launch.py: error: could not write checkpoint step 12 to {ckpt_dir}: Not a directory"
    assert "Traceback" not in r.stderr, r.stderr
    os.remove(ckpt_dir)
    os.rename(ckpt_dir + ".moved", ckpt_dir)   # the earlier checkpoints, untouched: the run resumes from them
    assert checkpoint_steps(workdir) == [4, 8]
    assert_same_params(params_of(workdir), params_of(base8))


# --------------------------------------------------------------------------------------- resume configs

def test_resume_with_a_conflicting_config_exits_2_naming_the_keys(tmp_path, common, base8):
    workdir = copy_run(base8, tmp_path)
    r = launch(f"--workdir={workdir}", *common, "--config.train.steps=12", "--config.model.d_model=64",
               "--config.data.tokenizer=chars", "--config.optim.grad_clip=0", "--config.optim.learning_rate=0.01")
    assert r.returncode == 2, r.stderr
    lines = stderr_lines(r)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "model.d_model: saved 32 vs 64" in lines[0] and "data.tokenizer: saved 'bytes' vs 'chars'" in lines[0]
    # Clipping on -> off changes the optimizer state's structure: no saved step could be restored.
    assert "optim.grad_clip: saved 1.0 vs 0.0" in lines[0]
    assert "train.steps" not in lines[0] and "learning_rate" not in lines[0]
    assert checkpoint_steps(workdir) == [4, 8]


def test_resume_with_harmless_changes_continues(tmp_path, common, base8):
    workdir = copy_run(base8, tmp_path)
    r = launch(f"--workdir={workdir}", *common, "--config.train.steps=12", "--config.train.eval_every=2",
               "--config.train.log_every=4")
    assert r.returncode == 0, r.stderr
    assert "resuming from step 8" in r.stdout
    assert checkpoint_steps(workdir) == [8, 12]
    (hint,) = [line for line in r.stdout.splitlines() if "tensorboard --logdir" in line]
    assert "--host 127.0.0.1" in hint, hint


# ----------------------------------------------------------------------------------------------- security

_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
_UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def _sources():
    paths = [os.path.join(ROOT, "launch.py")]
    for directory, _, files in os.walk(os.path.join(ROOT, "jaxlm")):
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(paths)


def test_nothing_is_unpickled_or_evaluated():
    """Static: no pickle-family module, no eval/exec, no np.load/yaml.load/torch.load that could unpickle."""
    problems = []
    for path in _sources():
        tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"), path)
        for node in ast.walk(tree):
            where = f"{os.path.relpath(path, ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                keywords = {k.arg: k.value for k in node.keywords}
                if isinstance(func, ast.Name) and name in _UNSAFE_CALLS:
                    problems.append(f"{where} calls {name}()")
                if name in ("unsafe_load", "full_load") or (name == "load" and isinstance(func, ast.Attribute)
                                                             and getattr(func.value, "id", "") in ("yaml", "torch")):
                    problems.append(f"{where} calls {ast.unparse(func)}()")
                if name == "load" and getattr(func.value if isinstance(func, ast.Attribute) else None, "id", "") in (
                        "np", "numpy"):
                    flag = keywords.get("allow_pickle")
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        problems.append(f"{where} calls np.load without allow_pickle=False")
                if isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value:
                    problems.append(f"{where} passes allow_pickle=True")
    assert not problems, problems


def test_documented_tensorboard_commands_bind_localhost():
    commands = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in ("runs", "node_modules")]
        for name in files:
            if name.endswith(".md"):
                text = pathlib.Path(os.path.join(directory, name)).read_text(encoding="utf-8")
                commands += re.findall(r"tensorboard --logdir[^\n`]*", text)
    assert commands, "README documents no TensorBoard command"
    for command in commands:
        assert "--host 127.0.0.1" in command and "bind_all" not in command, command


def test_a_pickle_planted_in_the_token_cache_is_never_loaded(tmp_path, corpus):
    """The BPE token cache is the one binary array file read from a workdir: a pickled object in it is ignored."""
    workdir = str(tmp_path / "run")
    cmd = [f"--workdir={workdir}", f"--config.data.source=text:{corpus}", *TINY, "--config.data.tokenizer=bpe",
           "--config.data.vocab_size=300", "--config.train.steps=2", "--config.train.eval_batches=1"]
    r = launch(*cmd)
    assert r.returncode == 0, r.stderr
    cache = os.path.join(workdir, "token_cache.npz")
    with np.load(cache) as real:
        key = real["key"]
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")   # unpickling this creates the marker file

    np.savez(cache, key=key, tokens=np.array([Payload()], dtype=object))
    r = launch(*cmd[:-2], "--config.train.steps=4", "--config.train.eval_batches=1")
    assert r.returncode == 0, r.stderr
    assert "resuming from step 2" in r.stdout
    assert not marker.exists()
    with np.load(cache, allow_pickle=False) as rebuilt:          # re-encoded and replaced by plain arrays
        assert rebuilt["tokens"].dtype != object
