"""Position encodings (models/positions.py): rope against a float64 complex-number reference and its relative
property, rope attention against NumPy, and what each encoding leaves out of the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config, models
from jaxlm.models import attention, positions

from tests.models.test_attention import numpy_weights


def complex_rope(x, base=10_000.0):
    """RoFormer written with complex numbers: the pair (x_i, x_{i + Dh/2}) is z_i, rotated to z_i e^{i m theta_i}."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    theta = base ** (-2.0 * np.arange(half) / x.shape[-1])
    m = np.arange(x.shape[1])[None, :, None, None]
    z = z * np.exp(1j * m * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_rotation_matches_the_complex_reference_and_keeps_norms():
    x = jax.random.normal(jax.random.key(0), (2, 300, 3, 16))
    rotated = np.asarray(positions.rotate(x))
    np.testing.assert_allclose(rotated, complex_rope(x), atol=2e-5)   # angles up to 299 rad, float32 sin/cos
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(rotated[:, 0], np.asarray(x)[:, 0])   # position 0 is not rotated
    with pytest.raises(ValueError, match="even head dimension"):
        positions.rotate(jnp.ones((1, 4, 2, 7)))


def test_rope_scores_depend_on_relative_position_only():
    """The same query and key vector at every position: the rotated score q_m . k_n is a function of m - n."""
    q = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 1, 1, 32)), (1, 40, 1, 32))
    k = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, 1, 1, 32)), (1, 40, 1, 32))
    s = np.einsum("qd,kd->qk", np.asarray(positions.rotate(q))[0, :, 0], np.asarray(positions.rotate(k))[0, :, 0])
    np.testing.assert_allclose(s[1:, 1:], s[:-1, :-1], atol=1e-5)   # constant along every diagonal
    assert np.ptp(np.diag(s, -7)) < 1e-5 and np.ptp(s[:, 0]) > 0.1    # ... and not constant across them


@pytest.mark.parametrize("causal,query_blocks", [(True, 1), (True, 3), (False, 1)])
def test_rope_attention_matches_numpy(causal, query_blocks, monkeypatch):
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 1)
    b, t, d = 2, 9, 32
    x = jax.random.normal(jax.random.key(3), (b, t, d))
    mask = np.arange(t)[None] < np.array([[9], [5]])
    layer = attention.MultiHeadAttention(d, 4, causal=causal, num_layers=2, dtype=jnp.float32,
                                         rngs=nnx.Rngs(params=0), query_blocks=query_blocks, rope=True)
    out = layer(x, jnp.asarray(mask))
    (w,) = nnx.pop(layer, nnx.Intermediate)["attention_weights"].get_value()
    q, k, v = (np.asarray(a, np.float64) for a in layer.project(x))
    allowed = np.broadcast_to(mask[:, None, :], (b, t, t)) & (np.tril(np.ones((t, t), bool)) if causal else True)
    ref_w = numpy_weights(complex_rope(q), complex_rope(k), allowed)
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    y = np.einsum("bhqk,bkhd->bqhd", ref_w, v).reshape(b, t, d)
    ref = y @ np.asarray(layer.out.kernel[...], np.float64) + np.asarray(layer.out.bias[...], np.float64)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_rope_layer_gradients_fused_equal_autodiff(causal):
    x = jax.random.normal(jax.random.key(4), (2, 7, 32))
    grads = []
    for fused in (True, False):
        layer = attention.MultiHeadAttention(32, 4, causal=causal, num_layers=2, dtype=jnp.float32,
                                             rngs=nnx.Rngs(params=0), fused=fused, rope=True)
        graphdef, params = nnx.split(layer, nnx.Param)
        loss = lambda p, x, g=graphdef: jnp.sum(jnp.sin(nnx.merge(g, p)(x)))   # noqa: E731
        grads.append(jax.grad(loss, argnums=(0, 1))(params, x))
    for a, r in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        assert np.abs(np.asarray(a) - np.asarray(r)).max() <= 1e-5 * np.abs(np.asarray(r)).max()


def _build(name, encoding, **overrides):
    c = config.default_config().model
    c.name, c.num_layers, c.d_model, c.num_heads, c.max_len, c.position_encoding = name, 2, 32, 4, 64, encoding
    for key, value in overrides.items():
        c[key] = value
    return models.build_model(c, 50, 0)


def test_only_a_learned_table_limits_the_length():
    """rope and none run beyond model.max_len (analysis beyond the training length); a learned table cannot."""
    tokens = jnp.zeros((1, 80), jnp.int32)   # max_len 64
    for encoding in ("rope", "none"):
        assert _build("gpt", encoding)(tokens)[0].shape == (1, 80, 50)
    with pytest.raises(ValueError, match="exceeds model.max_len=64"):
        _build("gpt", "learned")(tokens)


def test_only_learned_positions_have_a_table():
    count = {e: sum(x.size for x in jax.tree.leaves(nnx.state(_build("gpt", e), nnx.Param)))
             for e in positions.ENCODINGS}
    assert count["learned"] - count["rope"] == 64 * 32 and count["rope"] == count["none"]
    assert not hasattr(_build("gpt", "rope"), "pos_embed")


def test_a_bidirectional_model_without_positions_sees_a_bag_of_words():
    """NoPE in an encoder: permuting the tokens permutes the logits (and with learned positions it does not)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32)
    perm = np.random.default_rng(1).permutation(12)
    for encoding, equivariant in (("none", True), ("learned", False), ("rope", False)):
        model = _build("bert", encoding)
        a, b = np.asarray(model(tokens)[0])[:, perm], np.asarray(model(tokens[:, perm])[0])
        assert np.allclose(a, b, atol=1e-5) == equivariant, encoding
