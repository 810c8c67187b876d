"""Attention weights vs a float64 NumPy recomputation from the layer's own queries and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.models import attention


def numpy_weights(q, k, allowed):
    """float64 softmax(q k^T / sqrt(Dh)) over allowed keys; q, k [B, T, H, Dh]; allowed [B, T, T]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def make_layer(causal, d=32, heads=4, query_blocks=1):
    return attention.MultiHeadAttention(d, heads, causal=causal, num_layers=2, dtype=jnp.float32,
                                        rngs=nnx.Rngs(params=0), query_blocks=query_blocks)


@pytest.fixture
def short_blocks(monkeypatch):
    """Query blocks of any length, so short test sequences split into several."""
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 1)


def run(layer, x, mask):
    out = layer(x, mask)
    sown = nnx.pop(layer, nnx.Intermediate)
    (weights,) = sown["attention_weights"].get_value()
    return out, np.asarray(weights)


@pytest.mark.parametrize("causal,query_blocks", [(True, 1), (True, 4), (False, 1), (False, 4)])
def test_weights_match_numpy_and_rows_sum_to_one(causal, query_blocks, short_blocks):
    b, t, d = 3, 9, 32
    x = jax.random.normal(jax.random.key(1), (b, t, d))
    lengths = np.array([9, 6, 2])
    mask = np.arange(t)[None] < lengths[:, None]
    layer = make_layer(causal, query_blocks=query_blocks)
    out, w = run(layer, x, jnp.asarray(mask))
    assert out.shape == (b, t, d) and w.shape == (b, 4, t, t) and w.dtype == np.float32
    q, k, _ = layer.project(x)
    allowed = np.broadcast_to(mask[:, None, :], (b, t, t))
    if causal:
        allowed = allowed & np.tril(np.ones((t, t), bool))
    np.testing.assert_allclose(w, numpy_weights(q, k, allowed), atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    for i, n in enumerate(lengths):
        assert (w[i, :, :, n:] == 0).all(), "padding keys got weight"
    # The pure function gives what the layer sowed: bit for bit from one block, to rounding from several.
    pure = attention.attention_weights(q, k, causal=causal, mask=jnp.asarray(mask))
    np.testing.assert_allclose(w, pure, rtol=0, atol=0 if query_blocks == 1 or not causal else 1e-7)
    assert nnx.state(layer, nnx.Intermediate) == nnx.State({})


def test_output_equals_weights_times_values_and_projection():
    b, t, d = 2, 5, 32
    x = jax.random.normal(jax.random.key(2), (b, t, d))
    layer = make_layer(False)
    out, w = run(layer, x, None)
    _, _, v = layer.project(x)
    y = np.einsum("bhqk,bkhd->bqhd", w.astype(np.float64), np.asarray(v, np.float64)).reshape(b, t, d)
    ref = y @ np.asarray(layer.out.kernel[...], np.float64) + np.asarray(layer.out.bias[...], np.float64)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
    q = k = jax.random.normal(jax.random.key(3), (2, 4, 2, 8))
    mask = jnp.array([[False] * 4, [True, True, False, False]])
    w = np.asarray(attention.attention_weights(q, k, causal=True, mask=mask))
    assert np.isfinite(w).all()
    assert (w[0] == 0).all()
    np.testing.assert_allclose(w[1].sum(-1), 1.0, atol=1e-6)


def test_bfloat16_compute_keeps_float32_weights():
    layer = attention.MultiHeadAttention(16, 2, causal=True, num_layers=1, dtype=jnp.bfloat16,
                                         rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(4), (1, 6, 16))
    out, w = run(layer, x, None)
    assert out.dtype == jnp.bfloat16 and w.dtype == np.float32
    assert layer.qkv.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


# ---- the custom-VJP core (attention.attend) vs autodiff of the straightforward one -------------------------

CASES = {"causal": (True, None), "padding": (False, [6, 3, 1]), "causal+padding": (True, [6, 3, 1]),
         "fully_masked_row": (True, [6, 0, 2]), "bidirectional": (False, None)}


def _vjp_pair(fn, q, k, v, causal, mask, dy):
    """(y, grads of sum(y * dy)) -- the weights output unused, so its cotangent is symbolically zero."""
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, causal, mask)[0], q, k, v)
    return out, pull(dy)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_attend_equals_autodiff_in_outputs_and_gradients(case):
    causal, lengths = CASES[case]
    b, t, h, dh = 3, 6, 2, 8
    q, k, v, dy = (jax.random.normal(jax.random.key(i), (b, t, h, dh)) for i in range(4))
    mask = None if lengths is None else jnp.asarray(np.arange(t)[None] < np.array(lengths)[:, None])
    y_ref, grads_ref = _vjp_pair(attention.attend_reference, q, k, v, causal, mask, dy)
    y, grads = jax.jit(lambda *a: _vjp_pair(attention.attend, *a, causal, mask, dy))(q, k, v)
    assert y.dtype == y_ref.dtype and all(g.dtype == jnp.float32 for g in grads)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for name, g, r in zip("qkv", grads, grads_ref):
        r = np.asarray(r)
        assert np.abs(r).max() > 0.1, name
        assert np.abs(np.asarray(g) - r).max() <= 1e-5 * np.abs(r).max(), name
    if lengths is not None and 0 in lengths:   # the query rows of an all-padding sequence get no gradient
        assert np.all(np.asarray(grads[0])[1] == 0)


def test_fused_attend_gradient_through_the_weights_output_equals_autodiff():
    """A loss on the returned (sown) weights as well as on y: the weights' cotangent must be included."""
    q, k, v, dy = (jax.random.normal(jax.random.key(i), (2, 6, 2, 8)) for i in range(4))
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [3]]))

    def loss(fn):
        def f(q, k, v):
            y, w = fn(q, k, v, True, mask)
            return jnp.sum(y * dy) + jnp.sum(jnp.sin(3.0 * w))
        return f
    ref = jax.grad(loss(attention.attend_reference), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(attention.attend), argnums=(0, 1, 2))(q, k, v)
    only_y = jax.grad(lambda *a: jnp.sum(attention.attend(*a, True, mask)[0] * dy), argnums=(0, 1, 2))(q, k, v)
    for name, g, r, y in zip("qkv", got, ref, only_y):
        r = np.asarray(r)
        assert np.abs(np.asarray(g) - r).max() <= 1e-5 * np.abs(r).max(), name
        if name != "v":   # the weights do not depend on v; for q and k their term matters here
            assert np.abs(np.asarray(y) - r).max() > 1e-3 * np.abs(r).max(), name


def test_fused_attend_in_bfloat16_matches_autodiff_within_bfloat16_rounding():
    q, k, v, dy = (jax.random.normal(jax.random.key(i), (2, 8, 2, 16), jnp.bfloat16) for i in range(4))
    y_ref, ref = _vjp_pair(attention.attend_reference, q, k, v, True, None, dy)
    y, grads = _vjp_pair(attention.attend, q, k, v, True, None, dy)
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for g, r in zip((y, *grads), (y_ref, *ref)):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(g - r).max() <= 0.03 * np.abs(r).max()


@pytest.mark.parametrize("causal", [True, False])
def test_fused_layer_gradients_equal_the_autodiff_layer(causal):
    """The whole layer (projections included), fused vs fused=False, same parameters; jvp works unfused."""
    x = jax.random.normal(jax.random.key(5), (2, 7, 32))
    mask = None if causal else jnp.asarray(np.arange(7)[None] < np.array([[7], [4]]))
    layers = {f: attention.MultiHeadAttention(32, 4, causal=causal, num_layers=2, dtype=jnp.float32,
                                              rngs=nnx.Rngs(params=0), fused=f) for f in (True, False)}
    grads, apply = {}, {}
    for fused, layer in layers.items():
        graphdef, params = nnx.split(layer, nnx.Param)
        apply[fused] = lambda x, g=graphdef, p=params: nnx.merge(g, p)(x, mask)
        loss = lambda p, x, g=graphdef: jnp.sum(jnp.sin(nnx.merge(g, p)(x, mask)))   # noqa: E731
        grads[fused] = jax.grad(loss, argnums=(0, 1))(params, x)
    for a, r in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        r = np.asarray(r)
        assert np.abs(np.asarray(a) - r).max() <= 1e-5 * np.abs(r).max()
    direction = jax.random.normal(jax.random.key(6), x.shape)
    _, tangent = jax.jvp(apply[False], (x,), (direction,))   # forward mode needs the autodiff layer
    eps = 1e-2   # central difference, float32: error O(eps^2) plus rounding ~1e-7 / eps
    numeric = (apply[False](x + eps * direction) - apply[False](x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(tangent, numeric, atol=2e-3 * float(np.abs(np.asarray(numeric)).max()))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(apply[True], (x,), (jnp.ones_like(x),))


# ---- causal attention in query blocks (attention.attend_causal) vs one T x T block ---------------------------

def test_block_stops_split_evenly_and_never_below_the_minimum_block():
    assert attention.MIN_QUERY_BLOCK == 64
    assert attention.block_stops(256, 4) == [64, 128, 192, 256]
    assert attention.block_stops(128, 4) == [64, 128]
    assert attention.block_stops(127, 4) == [127] and attention.block_stops(1024, 4) == [256, 512, 768, 1024]
    assert attention.block_stops(200, 3) == [66, 133, 200] and attention.block_stops(256, 1) == [256]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("blocks", [2, 3, 4])
@pytest.mark.parametrize("lengths", [None, [10, 7, 0]])
def test_query_blocks_equal_one_block_in_outputs_weights_and_gradients(fused, blocks, lengths, short_blocks):
    """Uneven blocks (T = 10), a padding mask with an all-padding row, and a loss on the sown weights too."""
    b, t, h, dh = 3, 10, 2, 8
    q, k, v, dy = (jax.random.normal(jax.random.key(i), (b, t, h, dh)) for i in range(4))
    mask = None if lengths is None else jnp.asarray(np.arange(t)[None] < np.array(lengths)[:, None])
    core = attention.attend if fused else attention.attend_reference

    def loss(fn):
        def f(q, k, v):
            y, w = fn(q, k, v)
            return jnp.sum(y * dy) + jnp.sum(jnp.sin(3.0 * w)), (y, w)
        return f
    one = lambda q, k, v: attention.attend_reference(q, k, v, True, mask)   # noqa: E731
    split = lambda q, k, v: attention.attend_causal(core, q, k, v, mask, blocks)   # noqa: E731
    ref, (y_ref, _) = jax.grad(loss(one), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    got, (y, w) = jax.jit(jax.grad(loss(split), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    keys = np.ones((b, t), bool) if mask is None else np.asarray(mask)
    allowed = np.tril(np.ones((t, t), bool))[None] & keys[:, None]
    with np.errstate(invalid="ignore"):   # an all-padding row is NaN in float64 NumPy; the layer gives zeros
        expected = np.where(allowed.any(-1)[:, None, :, None], numpy_weights(q, k, allowed), 0.0)
    np.testing.assert_allclose(w, expected, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for name, g, r in zip("qkv", got, ref):
        r = np.asarray(r)
        assert np.abs(r).max() > 0.1, name
        assert np.abs(np.asarray(g) - r).max() <= 1e-5 * np.abs(r).max(), name


def test_a_gpt_sized_sequence_runs_in_blocks_and_its_step_skips_the_upper_tiles():
    """T = 256 with the default 4 blocks: the layer output equals one block's, and the jaxpr's score matmuls
    cover 5/8 of the T x T matrix (the diagonal tiles full, the tiles above them not at all)."""
    x = jax.random.normal(jax.random.key(5), (2, 256, 32))
    blocked, single = make_layer(True, query_blocks=4), make_layer(True, query_blocks=1)
    np.testing.assert_allclose(blocked(x), single(x), rtol=1e-5, atol=1e-6)
    q, k, v = blocked.project(x)
    step = jax.make_jaxpr(lambda q, k, v: attention.attend_causal(attention.attend_reference, q, k, v, None, 4)[0])
    shapes = [e.outvars[0].aval.shape for e in step(q, k, v).jaxpr.eqns
              if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[:3] == (2, 4, 64)]   # [B, H, Tq, Tk]
    assert sorted(shapes) == [(2, 4, 64, 64), (2, 4, 64, 128), (2, 4, 64, 192), (2, 4, 64, 256)]
