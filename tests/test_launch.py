"""End-to-end through launch.py, as a user runs it: training, resume, TensorBoard files, sampling, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from child_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.max_len=32", "--config.data.seq_len=32", "--config.train.batch_size=4",
        "--config.train.log_every=2", "--config.train.eval_every=4", "--config.train.eval_batches=2",
        "--config.train.checkpoint_every=4", "--config.train.sample_length=8", "--config.data.tokenizer=bytes"]


def launch(*args, cwd=None, env=None, timeout=240):
    full_env = child_env(**(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout)


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def _params(workdir):
    sys.path.insert(0, ROOT)
    from jaxlm import runs
    import jax
    trained = runs.load(workdir)
    return trained.step, [np.asarray(x) for x in jax.tree.leaves(trained.params)]


@pytest.mark.parametrize("model", [["--config.model.name=gpt"],
                                   ["--config.model.name=lstm", "--config.model.hidden_size=32",
                                    "--config.train.stateful=True"]], ids=["gpt", "stateful_lstm"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, corpus, model):
    """2N steps straight vs N steps, a fresh process, N more: identical parameters and logged losses
    (for the stateful LSTM this also checks that the carried (h, c) survives the restart)."""
    common = [f"--config.data.source=text:{corpus}", "--config.optim.schedule=constant",
              "--config.optim.warmup_steps=0", "--config.model.dropout=0.1", *TINY, *model]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    r = launch(f"--workdir={straight}", "--config.train.steps=16", *common)
    assert r.returncode == 0, r.stderr
    r = launch(f"--workdir={resumed}", "--config.train.steps=8", *common)
    assert r.returncode == 0, r.stderr
    r = launch(f"--workdir={resumed}", "--config.train.steps=16", *common)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 8" in r.stdout + r.stderr
    step_a, params_a = _params(straight)
    step_b, params_b = _params(resumed)
    assert step_a == step_b == 16
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    losses_a, losses_b = _losses(straight), _losses(resumed)
    assert sorted(losses_a) == sorted(losses_b) and len(losses_a) == 8
    assert losses_a == losses_b


def test_training_writes_tensorboard_metrics_config_and_samples(tmp_path, corpus):
    workdir = str(tmp_path / "run")
    r = launch(f"--workdir={workdir}", "--config.train.steps=40", f"--config.data.source=text:{corpus}",
               "--config.optim.warmup_steps=5", "--config.optim.learning_rate=3e-3", *TINY)
    assert r.returncode == 0, r.stderr
    assert "tensorboard --logdir" in r.stdout
    one_per_core = max(n for n in range(1, len(os.sched_getaffinity(0)) + 1) if 4 % n == 0)   # batch 4 split
    assert f"{one_per_core} device(s)" in r.stdout + r.stderr   # parallel.cpu_devices=0: a GPT gets a device per core
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 32
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    acc = pea.EventAccumulator(workdir, size_guidance={pea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    for tag in ("train/loss", "eval/loss", "eval/perplexity", "eval/bits_per_char", "train/tokens_per_sec",
                "train/learning_rate", "train/grad_norm", "samples/text"):
        assert tag in tags, tag
    assert "hparams" in acc.PluginAssets("hparams") or acc.summary_metadata  # hparams plugin present
    assert any(md.plugin_data.plugin_name == "hparams" for md in acc.summary_metadata.values())
    losses = _losses(workdir)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 0.5, (first, last)   # it learns: ~ln(256) -> word statistics
    r = launch("--mode=sample", f"--workdir={workdir}", "--prompt=the ", "--num_tokens=20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the ") and len(r.stdout.strip()) >= 4
    r = launch("--mode=sample", f"--workdir={workdir}", "--prompt=the ca", "--top_next=5")
    assert r.returncode == 0, r.stderr
    probs = [float(line.split()[-2]) for line in r.stdout.splitlines()[1:]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    r = launch("--mode=eval", f"--workdir={workdir}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 40


def test_a_closed_stdout_ends_quietly():
    # `launch.py --helpfull | head -1`: the reader goes away after one line; no BrokenPipeError traceback
    pipe = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--helpfull"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=child_env())
    pipe.stdout.readline()
    pipe.stdout.close()
    stderr = pipe.communicate(timeout=60)[1].decode()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert pipe.returncode in (0, -13, 141)    # done, or ended by SIGPIPE like any Unix tool


def test_flax_is_imported_with_ipython_hidden_and_ipython_stays_importable():
    """launch.py imports Flax without letting it import IPython (0.7-1.0 s of every launch); afterwards
    `import IPython` works as before (where it is installed)."""
    code = ("import importlib.util, sys; import launch; launch._import_flax_without_ipython(); "
            "print('flax.nnx' in sys.modules, 'IPython' in sys.modules); "
            "print(importlib.util.find_spec('IPython') is None or __import__('IPython').__name__ == 'IPython')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True"], out.stdout
