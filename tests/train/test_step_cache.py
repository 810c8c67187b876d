"""The jax.export cache of the train step: loaded entries skip tracing and give the plain jit step's results."""

import logging
import os

import jax
import numpy as np
import pytest

from jaxlm import models, step_cache
from tests import parallel_worker as worker


def _setup(**overrides):
    config = worker.tiny_config(**overrides)
    dp, host_state, _ = worker.build(config, devices=jax.devices()[:1])
    batches = [dp.place_batch(b) for b in worker.batches(config, steps=3)]
    return config, dp, host_state, batches


def _run(step, dp, host_state, batches):
    state, losses = dp.place_state(host_state), []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    return losses, jax.tree.map(np.asarray, jax.tree.leaves(state))


def _cached(dp, state, batch, directory, key, traces):
    def counting_step(s, b):
        traces.append(1)
        return dp._train_step(s, b)
    return step_cache.cached_train_step(counting_step, state, batch, key=key, directory=directory,
                                        state_shardings=dp.state_shardings(state), replicated=dp.replicated)


def _plain(dp, state):
    return jax.jit(dp._train_step, out_shardings=(dp.state_shardings(state), dp.replicated))


def test_a_stored_step_is_loaded_without_tracing_and_matches_plain_jit(tmp_path):
    _, dp, host_state, batches = _setup()
    state0 = dp.place_state(host_state)
    ref_losses, ref_state = _run(_plain(dp, state0), dp, host_state, batches)
    traces = []
    first = _cached(dp, state0, batches[0], str(tmp_path), "k", traces)
    assert traces == [1] and len(os.listdir(tmp_path)) == 1     # traced once, stored
    losses, state = _run(first, dp, host_state, batches)
    again = _cached(dp, dp.place_state(host_state), batches[0], str(tmp_path), "k", traces)
    assert traces == [1]                                        # loaded: the Python step was not traced
    losses2, state2 = _run(again, dp, host_state, batches)
    assert ref_losses[-1] < ref_losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(losses2, ref_losses, rtol=1e-6)
    for a, b, c in zip(ref_state, state, state2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(c, b)                     # stored and loaded: one program


def _cached_eval(dp, directory, key, traces):
    def counting_eval(params, batch, carry):
        traces.append(1)
        return dp._eval_step(params, batch, carry)
    return step_cache.cached_eval_step(counting_eval, key=key, directory=directory,
                                       out_shardings=(dp.replicated, dp.sharded))


@pytest.mark.parametrize("overrides", [{}, {"model.name": "lstm", "model.hidden_size": 16, "model.d_model": 8,
                                            "train.stateful": True}], ids=["gpt", "stateful_lstm"])
def test_a_stored_eval_step_is_loaded_without_tracing_and_matches_plain_jit(tmp_path, overrides):
    config, dp, host_state, batches = _setup(**overrides)
    state = dp.place_state(host_state)
    carry0 = None
    if config.train.stateful:   # evaluation carries the recurrent state from batch to batch
        model = models.build_model(config.model, worker.VOCAB, 0)
        carry0 = dp.place_carry(jax.tree.map(np.asarray, model.initial_carry(config.train.batch_size)))

    def evaluate(eval_step):
        carry, out = carry0, []
        for batch in batches:
            sums, carry = eval_step(state.params, batch, carry)
            out.append(jax.tree.map(np.asarray, (sums, carry)))
        return out

    ref = evaluate(jax.jit(dp._eval_step))
    traces = []
    first = evaluate(_cached_eval(dp, str(tmp_path), "k", traces))
    stored = sorted(os.listdir(tmp_path))
    assert traces == [1] and len(stored) == 1 and stored[0].startswith("eval_step-")   # one signature: the carry
    # comes back with the sharding it went in with, so the next batch's call loads no second program
    again = evaluate(_cached_eval(dp, str(tmp_path), "k", traces))
    assert traces == [1]                                        # loaded: the Python step was not traced
    assert (carry0 is None) == (ref[-1][1] is None)
    for want, got, got_again in zip(ref, first, again):
        for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(got_again)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(c, b)
    assert not np.allclose(first[0][0]["loss"], first[1][0]["loss"])  # two batches, two sums


def test_key_shapes_and_config_select_the_entry(tmp_path):
    _, dp, host_state, batches = _setup()
    state = dp.place_state(host_state)
    k = step_cache.entry_key("k", state, batches[0])
    assert k == step_cache.entry_key("k", dp.place_state(host_state), batches[0])   # deterministic
    assert k != step_cache.entry_key("other config", state, batches[0])
    shorter = {"tokens": batches[0]["tokens"][:, :-1]}
    assert k != step_cache.entry_key("k", state, shorter)
    c1, c2 = worker.tiny_config(), worker.tiny_config(**{"optim.learning_rate": 1e-4})
    spec = dp._train_step.keywords["spec"]
    assert step_cache.run_key(c1, spec) != step_cache.run_key(c2, spec)


def _programs(config):
    """The lowered train and eval steps of `config` (StableHLO text, no source locations)."""
    dp, host_state, _ = worker.build(config, devices=jax.devices()[:1])
    state, batch = dp.place_state(host_state), dp.place_batch(worker.batches(config, steps=1)[0])
    return (jax.jit(dp._train_step).lower(state, batch).as_text(),
            jax.jit(dp._eval_step).lower(state.params, batch, None).as_text())


def test_the_keys_left_out_of_the_key_cannot_change_the_traced_steps():
    """Runs that differ only in UNTRACED_KEYS share stored steps; that is safe only if those keys cannot change
    what is traced, so each is changed here and the lowered train and eval steps must stay the same."""
    changed = {"seed": 7, "train.log_every": 3, "train.eval_every": 5, "train.eval_batches": 2,
               "train.sample_length": 9, "train.checkpoint_every": 4, "train.keep_checkpoints": 1,
               "train.stop_at_accuracy": 0.5, "analysis.attention_text": "the cat", "analysis.num_sequences": 3,
               "analysis.num_windows": 8, "analysis.tolerance": 0.5, "analysis.seq_len": 32}
    analysis = [f"analysis.{k}" for k in worker.tiny_config().analysis]
    untraced = [k for k in step_cache.UNTRACED_KEYS if k != "analysis"] + analysis
    assert sorted(changed) == sorted(untraced)   # every key left out is checked
    base, base_key = _programs(worker.tiny_config()), step_cache.run_key(worker.tiny_config(), worker.tokenizer())
    for key, value in changed.items():
        config = _tiny_config_with(key, value)
        assert _programs(config) == base, key
        assert step_cache.run_key(config, worker.tokenizer()) == base_key, key   # so they share the entry
    # the comparison can fail: keys that are traced change the program (and the key)
    for key, value in {"optim.learning_rate": 1e-4, "train.steps": 50, "model.dropout": 0.1}.items():
        config = _tiny_config_with(key, value)
        assert _programs(config)[0] != base[0], key
        assert step_cache.run_key(config, worker.tokenizer()) != base_key, key


def _tiny_config_with(key: str, value):
    config = worker.tiny_config()
    *path, leaf = key.split(".")
    section = config[path[0]] if path else config
    section[leaf] = value
    return config


def test_an_unreadable_entry_is_traced_again_and_rewritten(tmp_path, caplog):
    _, dp, host_state, batches = _setup()
    state = dp.place_state(host_state)
    traces = []
    _cached(dp, state, batches[0], str(tmp_path), "k", traces)
    (entry,) = os.listdir(tmp_path)
    with open(tmp_path / entry, "wb") as f:
        f.write(b"not an exported program")
    with caplog.at_level(logging.WARNING):
        step = _cached(dp, state, batches[0], str(tmp_path), "k", traces)
    assert traces == [1, 1] and "unreadable step cache entry" in caplog.text
    ref_losses, _ = _run(_plain(dp, state), dp, host_state, batches)
    np.testing.assert_allclose(_run(step, dp, host_state, batches)[0], ref_losses, rtol=1e-6)
    _cached(dp, state, batches[0], str(tmp_path), "k", traces)
    assert traces == [1, 1]                                     # the rewritten entry loads


def test_on_only_with_a_local_persistent_cache():
    assert step_cache.steps_dir(None) is None and step_cache.steps_dir("") is None
    assert step_cache.steps_dir("gs://bucket/xla") is None      # a URL: no local file I/O
    assert step_cache.steps_dir("/tmp/xla") == "/tmp/xla/jaxlm-steps"


def test_only_the_most_recently_used_entries_are_kept(tmp_path, monkeypatch):
    _, dp, host_state, batches = _setup()
    state = dp.place_state(host_state)
    monkeypatch.setattr(step_cache, "MAX_ENTRIES", 2)
    traces = []
    for i, key in enumerate(("a", "b")):
        _cached(dp, state, batches[0], str(tmp_path), key, traces)
        path = tmp_path / f"train_step-{step_cache.entry_key(key, state, batches[0])}.jaxexport"
        os.utime(path, (1000 + i, 1000 + i))      # a used before b
    _cached(dp, state, batches[0], str(tmp_path), "a", traces)   # a loaded: now the most recent
    assert traces == [1, 1]
    _cached(dp, state, batches[0], str(tmp_path), "c", traces)   # a third entry: b, the least recent, goes
    kept = sorted(os.listdir(tmp_path))
    assert kept == sorted(f"train_step-{step_cache.entry_key(k, state, batches[0])}.jaxexport" for k in "ac")


def test_linear_algebra_bindings_load_only_for_programs_that_call_them():
    """Lowering a stored step skips loading LAPACK (0.2 s) only if the program calls none; a cholesky does.
    (The name avoids that word: source locations are in the module, and a match only means no skipping.)"""
    import jax.numpy as jnp
    from jax._src.export import _export

    x = jax.ShapeDtypeStruct((3, 3), jnp.float32)
    with_lapack = jax.export.export(jax.jit(lambda a: jnp.linalg.cholesky(a @ a.T + 3 * jnp.eye(3))))(x)
    without = jax.export.export(jax.jit(lambda a: a @ a))(x)
    hook = _export._ensure_backends_initialized
    with step_cache._lapack_only_if_called(with_lapack):
        assert _export._ensure_backends_initialized is hook
    with step_cache._lapack_only_if_called(without):
        assert _export._ensure_backends_initialized is not hook
    assert _export._ensure_backends_initialized is hook
    a = np.array([[4.0, 2.0, 0.0], [2.0, 5.0, 1.0], [0.0, 1.0, 3.0]], np.float32)
    with step_cache._lapack_only_if_called(with_lapack):   # and the LAPACK program still runs
        got = jax.jit(with_lapack.call)(a)
    np.testing.assert_allclose(got, np.linalg.cholesky(a.astype(np.float64) @ a.T + 3 * np.eye(3)), rtol=1e-5)


def test_user_code_outside_installed_packages_is_part_of_the_key(tmp_path, monkeypatch):
    """An experiment file or user module (imported, not an installed package) can change the step: editing it
    must change the key, so a stale stored step is never loaded."""
    import importlib
    import sys

    before = step_cache.source_digest()
    (tmp_path / "my_experiment_module.py").write_text("WIDTH = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("my_experiment_module")
        imported = step_cache.source_digest()
        (tmp_path / "my_experiment_module.py").write_text("WIDTH = 2\n")
        edited = step_cache.source_digest()
    finally:
        sys.modules.pop("my_experiment_module", None)
    assert len({before, imported, edited}) == 3
    assert step_cache.source_digest() == before
