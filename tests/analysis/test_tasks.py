"""Synthetic-task accuracy: an oracle that copies the token exactly d back scores 1 at d and chance elsewhere,
so the answer positions, the masking and the objectives' conventions line up."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.analysis import tasks
from jaxlm.data import synthetic


class ShiftOracle(nnx.Module):
    """One-hot embeddings; logits at t = 10 * onehot(token at t - shift) (a causal 'look back by shift')."""

    def __init__(self, vocab: int, shift: int):
        self.vocab, self.shift = vocab, shift
        self.dummy = nnx.Param(jnp.zeros(()))

    def embed(self, tokens):
        return jax.nn.one_hot(tokens, self.vocab)

    def forward_from_embeddings(self, x, carry=None, *, mask=None, dropout_key=None):
        shifted = jnp.pad(x, ((0, 0), (self.shift, 0), (0, 0)))[:, :x.shape[1]]
        return 10.0 * shifted + self.dummy[...], None

    def __call__(self, tokens, carry=None, *, mask=None, dropout_key=None):
        return self.forward_from_embeddings(self.embed(tokens))


def make_config(task, distance, objective=""):
    c = config_lib.default_config()
    c.data.source, c.data.distance, c.data.seq_len, c.data.num_symbols = f"synthetic:{task}", distance, 24, 4
    c.train.batch_size, c.train.eval_batches = 64, 4
    c.objective.name = objective
    return c


@pytest.mark.parametrize("task", ["recall", "copy"])
def test_causal_oracle_solves_exactly_its_distance(task):
    config = make_config(task, 6)
    vocab = synthetic.build_tokenizer(config.data).vocab_size
    graphdef, params = nnx.split(ShiftOracle(vocab, 6), nnx.Param)
    results = tasks.accuracy_at_distance(graphdef, params, config, [6, 9], objective="causal_lm")
    assert results[6]["accuracy"] == 1.0 and results[6]["sequence_accuracy"] == 1.0
    assert results[6]["num_answers"] == 256 * (4 if task == "copy" else 1) and results[6]["num_examples"] == 256
    assert abs(results[9]["accuracy"] - tasks.chance_accuracy(config)) < 0.1     # random fillers: ~1/4
    assert results[9]["stderr"] > 0


def test_masked_oracle_and_elmo_forward_convention():
    config = make_config("recall", 5, objective="masked_lm")
    tok = synthetic.build_tokenizer(config.data)
    # bert predicts the answer AT its position (the [MASK]), so its source is d + 1 back
    graphdef, params = nnx.split(ShiftOracle(tok.vocab_size, 6), nnx.Param)
    assert tasks.accuracy_at_distance(graphdef, params, config, [5])[5]["accuracy"] == 1.0
    # without the [MASK] (a causal reading of the same oracle) the convention would be off by one
    assert tasks.accuracy_at_distance(graphdef, params, config, [5], objective="causal_lm")[5]["accuracy"] < 0.5
    with pytest.raises(ValueError, match="mask_id"):
        ds = synthetic.build_dataset(config)
        tasks.evaluate_accuracy(graphdef, params, ds.eval_batches(8, 1), objective="masked_lm")


def test_bidirectional_uses_the_forward_direction():
    class BiOracle(ShiftOracle):
        def forward_from_embeddings(self, x, carry=None, *, mask=None, dropout_key=None):
            fwd, _ = super().forward_from_embeddings(x)
            return (fwd, jnp.zeros_like(fwd)), None

    config = make_config("recall", 7, objective="bidirectional_lm")
    graphdef, params = nnx.split(BiOracle(synthetic.build_tokenizer(config.data).vocab_size, 7), nnx.Param)
    assert tasks.accuracy_at_distance(graphdef, params, config, [7])[7]["accuracy"] == 1.0


def test_distance_that_does_not_fit_is_a_user_error():
    from jaxlm.errors import UserError
    config = make_config("recall", 6)
    graphdef, params = nnx.split(ShiftOracle(synthetic.build_tokenizer(config.data).vocab_size, 6), nnx.Param)
    with pytest.raises(UserError, match="data.seq_len"):
        tasks.accuracy_at_distance(graphdef, params, config, [30], objective="causal_lm")
    assert config.data.distance == 6   # the caller's config is untouched
