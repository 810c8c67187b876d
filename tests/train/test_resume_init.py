"""A resume (and runs.load) builds the model abstractly: the checkpoint supplies every value, so no parameter is
drawn and no optimizer state is initialised, and the state is exactly the checkpoint's."""

import jax
import numpy as np
from flax import nnx

from jaxlm import checkpoint, config as config_lib, models, runs
from jaxlm.train import loop, optim, state as state_lib


def _config(corpus: str, model: str):
    c = config_lib.default_config()
    c.model.name, c.model.num_layers, c.model.d_model, c.model.hidden_size = model, 1, 16, 16
    c.model.max_len = 16
    c.data.source, c.data.seq_len = "text:" + corpus, 8
    c.train.steps, c.train.batch_size, c.train.log_every = 3, 4, 1
    c.train.eval_every = c.train.checkpoint_every = 3
    c.train.eval_batches, c.train.sample_length = 1, 0
    c.train.stateful = model == "lstm"
    config_lib.validate(c)
    return c


def _reference_restore(config, workdir):
    """The checkpoint restored the way it was before: into a concretely initialised model and optimizer."""
    vocab = runs.load(workdir).tokenizer.vocab_size
    model = models.build_model(config.model, vocab, config.seed)
    tx = optim.from_config(config)
    carry = model.initial_carry(config.train.batch_size) if config.train.stateful else None
    host = jax.tree.map(np.asarray, state_lib.TrainState.create(nnx.state(model, nnx.Param), tx, config.seed, carry))
    with checkpoint.Checkpointer(f"{workdir}/checkpoints") as ckpt:
        step, state, _ = ckpt.restore_latest(tx.to_checkpoint(host))
    return step, tx.from_checkpoint(state)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_resume_initialises_nothing_and_restores_the_checkpoint(corpus, tmp_path, monkeypatch):
    for model_name in ("gpt", "lstm"):
        config, workdir = _config(corpus, model_name), str(tmp_path / model_name)
        loop.train(config, workdir)
        step, expected = _reference_restore(config, workdir)

        built = []
        build = models.build_model
        monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(k.get("abstract", False)) or build(*a, **k))
        run = loop.setup(config, workdir)
        try:
            state = run.dp.to_host(run.state)
        finally:
            run.checkpointer.close()
            run.writer.close()
        loaded = runs.load(workdir)
        monkeypatch.setattr(models, "build_model", build)

        assert built == [True, True], model_name           # setup, then runs.load: abstract models only
        assert run.start_step == loaded.step == step == 3
        got, want = _leaves(run.spec.optimizer.to_checkpoint(state)), _leaves(run.spec.optimizer.to_checkpoint(expected))
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
        assert all(np.array_equal(a, b) for a, b in zip(_leaves(loaded.params), _leaves(expected.params)))
        if model_name == "lstm":   # the stateful carry came from the checkpoint too, not from zeros
            assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(state.carry))
