"""Loss by position against a plain forward pass and a float64 log-softmax, for every left-to-right kind."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.analysis import position_loss

VOCAB, L = 13, 12


def build(name):
    c = config_lib.default_config().model
    c.name, c.num_layers, c.d_model, c.hidden_size, c.num_heads, c.max_len = name, 1, 8, 8, 2, 16
    return nnx.split(models.build_model(c, VOCAB, 0), nnx.Param)


def windows(n=37, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, L + 1)).astype(np.int32)


@pytest.mark.parametrize("name,kind", [("gpt", "causal"), ("lstm", "causal"), ("elmo", "bidirectional")])
def test_losses_by_position_are_the_next_token_losses_of_one_forward_pass(name, kind):
    graphdef, params = build(name)
    w = windows()
    out, _ = nnx.merge(graphdef, params)(jnp.asarray(w[:, :-1]))
    logits = np.asarray(out[0] if kind == "bidirectional" else out, np.float64)   # elmo: the forward direction
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, w[:, 1:, None], axis=-1)[..., 0]
    got = position_loss.losses_by_position(graphdef, params, w, kind=kind, vocab_size=VOCAB, batch_size=16)
    assert got.shape == (37, L)   # 37 windows in calls of 16: the last call padded, the padding dropped
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_summary_against_written_out_statistics():
    rng = np.random.default_rng(1)
    losses = rng.gamma(2.0, 1.0, (50, 10))
    s = position_loss.summarize(losses)
    for t in (0, 4, 9):
        column = losses[:, t]
        assert s["mean"][t] == pytest.approx(sum(column) / 50)
        assert s["stderr"][t] == pytest.approx(np.sqrt(sum((column - column.mean()) ** 2) / 49 / 50))
    excess = [row[9] - sum(row[5:9]) / 4 for row in losses]   # the last position minus positions 5..8 (L = 10)
    assert s["last_excess"][0] == pytest.approx(np.mean(excess))
    assert s["last_excess"][1] == pytest.approx(np.std(excess, ddof=1) / np.sqrt(50))
    losses[:, -1] += 0.5                                          # a last position fitted worse shows as its excess
    assert position_loss.summarize(losses)["last_excess"][0] == pytest.approx(np.mean(excess) + 0.5)


def test_a_masked_lm_has_no_next_token_loss():
    graphdef, params = build("bert")
    with pytest.raises(ValueError, match="left-to-right"):
        position_loss.losses_by_position(graphdef, params, windows(4), kind="masked", vocab_size=VOCAB)
