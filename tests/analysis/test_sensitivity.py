"""Gradient sensitivity: closed form on a linear RNN, causality of GPT/RNN/LSTM, two-sidedness of BERT/ELMo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.analysis import sensitivity

VOCAB, LENGTH = 11, 10


class LinearRNN(nnx.Module):
    """h_t = w h_{t-1} + e_t, logits_t = h_t U: d log p(x_{T+1}) / d e_t = w^(T-t) U (onehot - softmax(h_T U))."""

    def __init__(self, w: float, dim: int = 6, *, rngs: nnx.Rngs):
        self.w = w
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, dim)))
        self.out = nnx.Param(jax.random.normal(rngs.params(), (dim, VOCAB)))

    def embed(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)

    def forward_from_embeddings(self, x, carry=None, *, mask=None, dropout_key=None):
        def step(h, x_t):
            h = self.w * h + x_t
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(hs, 0, 1) @ self.out[...], None


def closed_form(model, tokens, *, per_sequence=False):
    """float64 NumPy: S[T, t] = |w|^(T - t) mean_b ||U (onehot(x_{T+1}) - softmax(h_T U))|| for t <= T
    (per_sequence: [B, T, t] without the mean over b)."""
    emb, out, w = np.asarray(model.embedding[...], np.float64), np.asarray(model.out[...], np.float64), model.w
    e = emb[tokens]                                        # [B, L, d]
    b, length, _ = e.shape
    s = np.zeros((b, length - 1, length))
    for big_t in range(length - 1):
        h = sum(w ** (big_t - t) * e[:, t] for t in range(big_t + 1))
        z = h @ out
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        g = (np.eye(VOCAB)[tokens[:, big_t + 1]] - p) @ out.T  # d log p / d h_T, [B, d]
        gnorm = np.linalg.norm(g, axis=-1)                 # [B]
        for t in range(big_t + 1):
            s[:, big_t, t] = abs(w) ** (big_t - t) * gnorm
    return s if per_sequence else s.mean(axis=0)


def tokens(batch=5, length=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("w", [0.7, -0.9])
def test_linear_rnn_matches_closed_form(w):
    model = LinearRNN(w, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = tokens()
    s = sensitivity.gradient_sensitivity(graphdef, params, x, batch_size=2, target_chunk=3)  # padded last call
    np.testing.assert_allclose(s, closed_form(model, x), rtol=2e-5, atol=1e-7)
    d, mean, _ = sensitivity.sensitivity_by_distance(s[-1:], target_positions=[LENGTH - 2])
    np.testing.assert_allclose(mean / mean[0], np.abs(w) ** d, rtol=2e-5)  # decays as |w|^d
    ratio = sensitivity.relative_sensitivity(d, mean, reference=1)
    np.testing.assert_allclose(ratio[d == 3], abs(w) ** 2, rtol=2e-5)


def test_per_sequence_sensitivity_matches_the_closed_form_of_each_sequence():
    model = LinearRNN(0.8, rngs=nnx.Rngs(params=1))
    graphdef, params = nnx.split(model, nnx.Param)
    x = tokens(batch=7, seed=2)
    each = sensitivity.gradient_sensitivity(graphdef, params, x, batch_size=3, per_sequence=True)   # padded
    assert each.shape == (7, LENGTH - 1, LENGTH)
    np.testing.assert_allclose(each, closed_form(model, x, per_sequence=True), rtol=2e-5, atol=1e-7)


def test_ratio_stderr_is_the_leave_one_out_jackknife():
    a = np.random.default_rng(0).gamma(2.0, 1.0, (30, 4))
    loo = np.array([np.delete(a, i, axis=0).mean(0) / np.delete(a, i, axis=0).mean(0)[1] for i in range(30)])
    reference = np.sqrt(29 / 30 * ((loo - loo.mean(0)) ** 2).sum(0))   # Efron & Stein, written out
    np.testing.assert_allclose(sensitivity.ratio_stderr(a, 1), reference, rtol=1e-12)
    assert sensitivity.ratio_stderr(a, 1)[1] == 0.0
    proportional = np.outer(a[:, 0], [1.0, 2.0, 0.5, 3.0])                 # every sequence the same shape
    np.testing.assert_allclose(sensitivity.ratio_stderr(proportional, 0), 0.0, atol=1e-12)


def test_the_analysis_reports_its_ratios_with_their_error_over_sequences():
    from jaxlm.analysis import hooks
    model = LinearRNN(0.6, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = tokens(batch=9, seed=4)
    result, _ = hooks.run_sensitivity(graphdef, params, x, objective="causal_lm", mask_id=None, out_dir=None)
    each = closed_form(model, x, per_sequence=True)[:, result["target_positions"]]
    curves = np.stack([sensitivity.sensitivity_by_distance(e, target_positions=result["target_positions"])[1]
                       for e in each])
    expected = sensitivity.ratio_stderr(curves, 1)
    for d in ("2", "4", "8"):
        np.testing.assert_allclose(result["relative_stderr"][d], expected[int(d)], rtol=1e-3)
    assert result["relative_stderr"]["1"] == 0.0 and result["relative_stderr"]["2"] > 0.0

def model_cfg(name):
    c = config_lib.default_config().model
    c.name, c.num_layers, c.d_model, c.hidden_size, c.num_heads, c.max_len = name, 1, 8, 8, 2, 16
    return c


@pytest.mark.parametrize("name", ["gpt", "lstm", "rnn"])
def test_causal_models_ignore_the_future_exactly(name):
    graphdef, params = nnx.split(models.build_model(model_cfg(name), VOCAB, 0), nnx.Param)
    s = sensitivity.gradient_sensitivity(graphdef, params, tokens())
    assert s.shape == (LENGTH - 1, LENGTH)
    future = np.triu(np.ones_like(s, bool), k=1)            # t > T
    assert (s[future] == 0.0).all()
    assert (s[~future] > 0.0).all()
    d, mean, std = sensitivity.sensitivity_by_distance(s)
    np.testing.assert_array_equal(d, np.arange(LENGTH - 1))
    assert (std >= 0).all() and np.isclose(mean[0], np.mean(np.diag(s)))


def test_bert_sees_both_sides():
    graphdef, params = nnx.split(models.build_model(model_cfg("bert"), VOCAB, 0), nnx.Param)
    s = sensitivity.gradient_sensitivity(graphdef, params, tokens(), mask_id=VOCAB - 1, target_positions=[2, 5])
    assert s.shape == (2, LENGTH)
    assert (s > 0).all()                                     # left, right and the [MASK] itself
    d, _, _ = sensitivity.sensitivity_by_distance(s, target_positions=[2, 5], bidirectional=True)
    assert d.min() == 2 - (LENGTH - 1) and d.max() == 5
    with pytest.raises(ValueError, match="mask_id"):
        sensitivity.gradient_sensitivity(graphdef, params, tokens())


def test_elmo_directions():
    graphdef, params = nnx.split(models.build_model(model_cfg("elmo"), VOCAB, 0), nnx.Param)
    x = tokens()
    both = sensitivity.gradient_sensitivity(graphdef, params, x)
    fwd = sensitivity.gradient_sensitivity(graphdef, params, x, direction="forward",
                                           target_positions=np.arange(1, LENGTH))
    assert both.shape == (LENGTH, LENGTH)
    assert (np.diag(both) == 0).all()                        # neither direction sees the predicted token
    for p in range(1, LENGTH):
        row = fwd[p - 1]
        assert (row[p:] == 0).all() and (row[:p] > 0).all()  # forward: strictly the left context
        # "both" differentiates log p_fwd + log p_bwd; the backward term lives strictly on the right
        np.testing.assert_allclose(both[p, :p], row[:p], rtol=1e-5)
        assert (both[p, p + 1:] > 0).all()
    assert (both[0, 1:] > 0).all() and (both[0, :1] == 0).all()


@pytest.mark.parametrize("name", ["bert", "lstm", "own"])
def test_masked_sensitivity_equals_a_per_position_gradient_of_the_full_logits(name):
    """Independent reference: mask T, run the whole model (logits at every position), differentiate
    log p(token T) at T w.r.t. the embeddings, average ||.|| over rows (the analysis runs the output layer at T
    only; "own": a model of one's own without a positions argument, whose full logits are gathered)."""
    model = (LinearRNN(0.8, rngs=nnx.Rngs(params=0)) if name == "own"
             else models.build_model(model_cfg(name), VOCAB, 0))
    graphdef, params = nnx.split(model, nnx.Param)
    x, mask_id = tokens(), VOCAB - 1
    s = sensitivity.gradient_sensitivity(graphdef, params, x, objective="masked_lm", mask_id=mask_id,
                                         target_positions=[0, 4, LENGTH - 1])
    for row, p in enumerate([0, 4, LENGTH - 1]):
        masked = jnp.asarray(x).at[:, p].set(mask_id)

        def score(e):
            logits = nnx.merge(graphdef, params).forward_from_embeddings(e)
            logits = logits[0] if isinstance(logits, tuple) else logits
            return jnp.sum(jax.nn.log_softmax(logits[:, p], axis=-1)[jnp.arange(len(x)), x[:, p]])

        grad = np.asarray(jax.grad(score)(model.embed(masked)), np.float64)
        np.testing.assert_allclose(s[row], np.linalg.norm(grad, axis=-1).mean(0), rtol=1e-5, atol=1e-9)
