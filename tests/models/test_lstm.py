"""RNN / LSTM layers and LMs against float64 NumPy equations, finite differences and their own properties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import bench, config as config_lib
from jaxlm.models import lstm


def _cfg(name="lstm", **overrides):
    cfg = config_lib.default_config().model
    cfg.name = name
    cfg.num_layers, cfg.d_model, cfg.hidden_size = 2, 16, 24
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_lstm(x, h, c, w_ih, w_hh, b, w_p=None):
    """float64 NumPy LSTM(P) over x [B, T, in]: the textbook equations, one step at a time."""
    hs = []
    for x_t in np.swapaxes(x, 0, 1):
        z = x_t @ w_ih + h @ w_hh + b
        i, f, g, o = np.split(z, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        m = _sigmoid(o) * np.tanh(c)
        h = m if w_p is None else m @ w_p
        hs.append(h)
    return np.stack(hs, axis=1), h, c


def _np_rnn(x, h, w_ih, w_hh, b):
    hs = []
    for x_t in np.swapaxes(x, 0, 1):   # x [B, T, in]
        h = np.tanh(x_t @ w_ih + h @ w_hh + b)
        hs.append(h)
    return np.stack(hs, axis=1), h


def _f64(p):
    return np.asarray(p[...], np.float64)


def _normal(seed, shape, dtype=np.float32, scale=1.0):
    """Test data from NumPy (no per-shape JAX compilation)."""
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def _random_lstm_args(seed, T, B, H, P, dtype=np.float32, scale=0.5):
    """Random (xw, w_hh, w_p, h0, c0) for the pure recurrences; P=0 means no projection."""
    out = P if P else H
    xw = _normal(seed, (B, T, 4 * H), dtype)
    w_hh = _normal(seed + 1, (out, 4 * H), dtype, scale / np.sqrt(out))
    w_p = _normal(seed + 2, (H, P), dtype, scale / np.sqrt(H)) if P else None
    h0 = _normal(seed + 3, (B, out), dtype, 0.5)
    c0 = _normal(seed + 4, (B, H), dtype, 0.5)
    return xw, w_hh, w_p, h0, c0


# --- cells against float64 NumPy ---------------------------------------------------------------------


@pytest.mark.parametrize("projection", [0, 5])
@pytest.mark.parametrize("T", [1, 9])
def test_lstm_layer_matches_numpy(projection, T):
    layer = lstm.LSTMLayer(6, 8, projection, rngs=nnx.Rngs(params=1))
    x = _normal(0, (3, T, 6))
    h0 = _normal(1, (3, projection or 8), scale=0.3)
    c0 = _normal(2, (3, 8), scale=0.3)
    hs, (h, c) = layer(x, (h0, c0))
    w_p = _f64(layer.w_p) if projection else None
    ref_hs, ref_h, ref_c = _np_lstm(np.asarray(x, np.float64), np.asarray(h0, np.float64),
                                    np.asarray(c0, np.float64), _f64(layer.w_ih), _f64(layer.w_hh),
                                    _f64(layer.b), w_p)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-6)
    assert hs.shape == (3, T, projection or 8)


@pytest.mark.parametrize("T", [1, 9])
def test_rnn_layer_matches_numpy(T):
    layer = lstm.RNNLayer(6, 8, rngs=nnx.Rngs(params=1))
    x = _normal(0, (3, T, 6))
    h0 = _normal(1, (3, 8), scale=0.3)
    hs, h = layer(x, h0)
    ref_hs, ref_h = _np_rnn(np.asarray(x, np.float64), np.asarray(h0, np.float64), _f64(layer.w_ih),
                            _f64(layer.w_hh), _f64(layer.b))
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-6)


# --- gradients against central finite differences (float64) ------------------------------------------


def _check_directional_derivatives(f, args, seed, eps=1e-5, rtol=1e-6):
    """<grad f, v> == (f(a + eps v) - f(a - eps v)) / 2 eps for a random direction v in each argument."""
    grads = jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)
    f = jax.jit(f)
    for n, (arg, grad) in enumerate(zip(args, grads)):
        if arg is None:
            continue
        v = _normal(seed + n, arg.shape, np.float64)
        plus = list(args); plus[n] = arg + eps * v
        minus = list(args); minus[n] = arg - eps * v
        fd = (f(*plus) - f(*minus)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grad, v), fd, rtol=rtol, atol=1e-9, err_msg=f"argument {n}")


@pytest.mark.parametrize("fused,projection,feature_major", [(True, 3, False), (True, 3, True), (True, 0, True),
                                                            (False, 0, None)])
def test_lstm_gradients_match_finite_differences(fused, projection, feature_major):
    with jax.enable_x64(True):
        args = _random_lstm_args(3, 6, 2, 4, projection, np.float64)
        weights = _normal(10, (2, 6, projection or 4), np.float64)

        def loss(*a):
            hs, (h, c) = lstm.lstm_scan(*a, fused=fused, feature_major=feature_major)
            return jnp.sum(hs * weights) + jnp.sum(h ** 2) + jnp.sum(jnp.sin(c))

        _check_directional_derivatives(loss, args, 20)


def test_rnn_gradients_match_finite_differences():
    with jax.enable_x64(True):
        xw = _normal(6, (2, 6, 4), np.float64)
        w_hh = _normal(7, (4, 4), np.float64, 0.5)
        h0 = _normal(8, (2, 4), np.float64, 0.5)
        weights = _normal(9, (2, 6, 4), np.float64)

        def loss(xw, w_hh, h0):
            hs, h = lstm.rnn_scan(xw, w_hh, h0)
            return jnp.sum(hs * weights) + jnp.sum(h ** 2)

        _check_directional_derivatives(loss, (xw, w_hh, h0), 30)


# --- the custom-VJP path equals autodiff -------------------------------------------------------------


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("projection", [0, 5])
def test_fused_lstm_equals_autodiff(projection, feature_major):
    args = _random_lstm_args(40, 40, 3, 16, projection, scale=1.5)
    ct = _normal(50, (3, 40, projection or 16))
    ct_h = _normal(51, (3, projection or 16))
    ct_c = _normal(52, (3, 16))

    def loss(fused, *a):
        hs, (h, c) = lstm.lstm_scan(*a, fused=fused, feature_major=feature_major)
        return jnp.sum(hs * ct) + jnp.sum(h * ct_h) + jnp.sum(c * ct_c)

    out_f = jax.jit(lstm.lstm_scan_fused, static_argnums=5)(*args, feature_major)
    out_r = jax.jit(lstm.lstm_scan_reference)(*args)
    for a, b in zip(jax.tree.leaves(out_f), jax.tree.leaves(out_r)):
        assert _rel_err(a, b) < 1e-6
    argnums = (1, 2, 3, 4, 5)
    g_f = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=0)(True, *args)
    g_r = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=0)(False, *args)
    assert len(jax.tree.leaves(g_f)) == (5 if projection else 4)
    for name, a, b in zip(["xw", "w_hh", "w_p", "h0", "c0"], g_f, g_r):
        if b is not None:
            assert _rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("projection", [0, 12])
def test_fused_lstm_lm_gradients_equal_unfused_forward_mode(projection):
    """The whole LM (input projections through layers.dense_vjp, fused recurrences) against the unfused model by
    autodiff: every parameter's gradient, and <grad, v> against the unfused model's jvp (forward mode works there)."""
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 11, (3, 10)), jnp.int32)

    def loss_fn(fused):
        graphdef, params = nnx.split(lstm.LSTMLM(_cfg(projection_size=projection), 11, rngs=nnx.Rngs(params=0),
                                                 fused=fused))

        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, params

    (loss_f, params), (loss_u, params_u) = loss_fn(True), loss_fn(False)
    grads_f = jax.jit(jax.grad(loss_f))(params)
    grads_u = jax.jit(jax.grad(loss_u))(params_u)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads_f)]
    assert any("w_ih" in n for n in names) and any("'b'" in n for n in names)
    for name, a, b in zip(names, jax.tree.leaves(grads_f), jax.tree.leaves(grads_u)):
        assert _rel_err(a, b) < 1e-5, name
    v = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(p.size).standard_normal(p.shape), p.dtype), params)
    _, forward = jax.jvp(loss_u, (params_u,), (v,))
    reverse = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads_f), jax.tree.leaves(v)))
    np.testing.assert_allclose(reverse, forward, rtol=1e-4)


@pytest.mark.parametrize("name,projection,fused", [("rnn", 0, True), ("lstm", 0, True), ("lstm", 12, True),
                                                    ("lstm", 0, False)])
def test_vocabulary_projection_equals_embedding_then_projection(name, projection, fused):
    """Called on tokens, the first layer projects the vocabulary ((E @ W_ih + b)[tokens]); against the
    straightforward E[tokens] @ W_ih + b (forward_from_embeddings): logits, carry and every gradient."""
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    kwargs = {} if name == "rnn" else {"fused": fused}
    model = cls(_cfg(name, projection_size=projection), 11, rngs=nnx.Rngs(params=0), **kwargs)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 20)), jnp.int32)
    carry = jax.tree.map(lambda c: _normal(c.size, c.shape, scale=0.5), model.initial_carry(3))
    assert model.projects_by_vocabulary(tokens[:, :-1])   # 57 tokens >= 4 per entry of 11
    graphdef, params = nnx.split(model)

    def loss(params, by_vocabulary):
        m = nnx.merge(graphdef, params)
        logits, new_carry = (m(tokens[:, :-1], carry) if by_vocabulary
                             else m.forward_from_embeddings(m.embed(tokens[:, :-1]), carry))
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return xent + sum(jnp.sum(c ** 2) for c in jax.tree.leaves(new_carry)), (logits, new_carry)

    (_, out_v), grads_v = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
    (_, out_e), grads_e = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
    for a, b in zip(jax.tree.leaves(out_v), jax.tree.leaves(out_e)):
        assert _rel_err(a, b) < 1e-5
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads_v)]
    assert any("embedding" in n for n in names)
    for n, a, b in zip(names, jax.tree.leaves(grads_v), jax.tree.leaves(grads_e)):
        assert _rel_err(a, b) < 1e-5, n
    # the path is taken: the first layer's input projection (forward and both gradients: 3 matmuls of
    # 2 * rows * d * gates) runs over the 11 vocabulary entries instead of the 57 tokens
    flops = {v: bench.matmul_flops(jax.make_jaxpr(jax.grad(lambda p: loss(p, v)[0]))(params)) for v in (True, False)}
    gates = 24 if name == "rnn" else 4 * 24
    assert flops[False] - flops[True] == 3 * 2 * (57 - 11) * 16 * gates


@pytest.mark.parametrize("by_vocabulary", [False, True])
def test_bfloat16_gradients_of_the_embedding_and_first_layer_stay_close_to_float32(by_vocabulary):
    """Both first-layer paths in bfloat16 against the float32 model: the gathers' scatter-adds sum in float32
    (in bfloat16 they were 7% (embedding) and 12% (W_ih, vocabulary path) off; bfloat16 matmuls give ~0.7%)."""
    p = 1.0 / np.arange(1, 41) ** 1.2                       # character-like: a few very frequent ids
    tokens = jnp.asarray(np.random.default_rng(7).choice(40, size=(16, 129), p=p / p.sum()), jnp.int32)

    def grads(dtype):
        graphdef, params = nnx.split(lstm.LSTMLM(_cfg(d_model=64, hidden_size=96, dtype=dtype), 40,
                                                 rngs=nnx.Rngs(params=0)))

        def loss(params):
            m = nnx.merge(graphdef, params)
            x = tokens[:, :-1]
            logits, _ = m(x) if by_vocabulary else m.forward_from_embeddings(m.embed(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return nnx.merge(graphdef, jax.jit(jax.grad(loss))(params))

    low, ref = grads("bfloat16"), grads("float32")
    assert lstm.projects_by_vocabulary(40, tokens[:, :-1], dropout_rate=0.0, dropout_key=None)
    for name, a, b in [("embedding", low.embedding.embedding, ref.embedding.embedding),
                       ("w_ih", low.layers[0].w_ih, ref.layers[0].w_ih), ("b", low.layers[0].b, ref.layers[0].b)]:
        a, b = np.asarray(a[...], np.float64), np.asarray(b[...], np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.02, name


def test_vocabulary_projection_only_where_it_saves_and_not_under_embedding_dropout():
    model = lstm.LSTMLM(_cfg(dropout=0.1), 11, rngs=nnx.Rngs(params=0))
    many, few = jnp.zeros((4, 11), jnp.int32), jnp.zeros((4, 10), jnp.int32)
    assert lstm.MIN_TOKENS_PER_VOCABULARY_ENTRY == 4
    assert model.projects_by_vocabulary(many) and not model.projects_by_vocabulary(few)   # 44 vs 40 tokens
    assert not model.projects_by_vocabulary(many, jax.random.key(0))   # dropout between lookup and matmul
    assert lstm.LSTMLM(_cfg(), 11, rngs=nnx.Rngs(params=0)).projects_by_vocabulary(many, jax.random.key(0))


# --- initialisation ----------------------------------------------------------------------------------


def test_forget_bias_init():
    b = np.asarray(lstm.lstm_bias_init(jax.random.key(0), 7, forget_bias=2.5))
    np.testing.assert_array_equal(b[7:14], 2.5)
    np.testing.assert_array_equal(np.delete(b, np.s_[7:14]), 0.0)
    model = lstm.LSTMLM(_cfg(), 11, rngs=nnx.Rngs(params=0))  # default config: forget_bias = 1.0
    np.testing.assert_array_equal(model.layers[0].b[24:48], 1.0)


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_recurrent_embedding_init_has_unit_norm_rows(name):
    # GPT-2's 0.02 starves un-normalised recurrent gates of input (the LSTM then failed recall at d = 10)
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    table = np.asarray(cls(_cfg(name, d_model=64), 3000, rngs=nnx.Rngs(params=0)).embedding.embedding[...])
    np.testing.assert_allclose(table.std(), 1 / 8, rtol=0.02)
    np.testing.assert_allclose(np.linalg.norm(table, axis=1).mean(), 1.0, rtol=0.02)
    custom = cls(_cfg(name, d_model=64, embed_init_std=0.3), 3000, rngs=nnx.Rngs(params=0))
    np.testing.assert_allclose(np.asarray(custom.embedding.embedding[...]).std(), 0.3, rtol=0.02)


def test_chrono_init():
    t_max = 50
    b = np.asarray(lstm.lstm_bias_init(jax.random.key(0), 2000, lstm_init="chrono", max_len=t_max))
    b_i, b_f, rest = b[:2000], b[2000:4000], b[4000:]
    np.testing.assert_array_equal(b_i, -b_f)
    np.testing.assert_array_equal(rest, 0.0)
    assert b_f.min() >= 0.0 and b_f.max() <= np.log(t_max - 1) + 1e-6
    # exp(b_f) ~ U(1, T_max - 1): its mean and spread match the uniform's
    np.testing.assert_allclose(np.exp(b_f).mean(), t_max / 2, rtol=0.05)
    np.testing.assert_allclose(np.exp(b_f).std(), (t_max - 2) / np.sqrt(12), rtol=0.05)
    model = lstm.LSTMLM(_cfg(lstm_init="chrono", max_len=t_max), 11, rngs=nnx.Rngs(params=0))
    np.testing.assert_array_equal(model.layers[1].b[:24], -model.layers[1].b[24:48])


# --- LM properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,projection", [("rnn", 0), ("lstm", 0), ("lstm", 12)])
def test_model_state_is_only_params(name, projection):
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    model = cls(_cfg(name, projection_size=projection, dropout=0.1), 11, rngs=nnx.Rngs(params=0))
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    logits, carry = model(jnp.zeros((2, 5), jnp.int32), dropout_key=jax.random.key(0))
    assert logits.shape == (2, 5, 11) and logits.dtype == jnp.float32
    assert jax.tree.structure(carry) == jax.tree.structure(model.initial_carry(2))


@pytest.mark.parametrize("name,projection", [("rnn", 0), ("lstm", 0), ("lstm", 12)])
def test_carry_across_segments_equals_one_pass(name, projection):
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    model = cls(_cfg(name, projection_size=projection), 11, rngs=nnx.Rngs(params=0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (3, 16)), jnp.int32)
    call = jax.jit(lambda model, *args: model(*args))
    full, full_carry = call(model, tokens)
    first, carry = call(model, tokens[:, :8])
    second, carry = call(model, tokens[:, 8:], carry)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(full_carry)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and the state matters: restarting from zeros gives different logits
    assert _rel_err(call(model, tokens[:, 8:])[0], second) > 1e-2


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_step_equals_full_sequence(name):
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    model = cls(_cfg(name, projection_size=12 if name == "lstm" else 0), 11, rngs=nnx.Rngs(params=0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 8)), jnp.int32)
    full, _ = model(tokens)
    step = jax.jit(lambda t, c: model.step(t, c))
    carry = model.initial_carry(2)
    for t in range(tokens.shape[1]):  # the test walks token by token; the model never loops over time
        logits, carry = step(tokens[:, t], carry)
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_embedding_entry_point():
    model = lstm.LSTMLM(_cfg(projection_size=16), 11, rngs=nnx.Rngs(params=0))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 6)), jnp.int32)
    states = model.hidden_states(tokens)
    assert [s.shape for s in states] == [(2, 6, 16)] * 3
    logits, _ = model(tokens)
    tied = states[-1] @ model.embedding.embedding[...].T + model.logit_bias[...]
    np.testing.assert_allclose(tied, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.forward_from_embeddings(model.embed(tokens))[0], logits, rtol=1e-6)


def test_flops_per_token_is_six_times_matmul_params():
    for name, projection in [("rnn", 0), ("lstm", 0), ("lstm", 12)]:
        cfg = _cfg(name, projection_size=projection)
        model = (lstm.RNNLM if name == "rnn" else lstm.LSTMLM)(cfg, 11, rngs=nnx.Rngs(params=0))
        matmul_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))
                            if p.ndim == 2) - 11 * cfg.d_model   # embedding lookup is free ...
        matmul_params += 11 * cfg.d_model                         # ... the tied output layer is not
        assert lstm.flops_per_token(cfg, 11, 64) == 6 * matmul_params
    # closed form, 2-layer LSTM, d 16, H 24, V 11, no projection (output projection 24 -> 16)
    expected = 3 * 2 * ((16 + 24) * 96 + (24 + 24) * 96 + 24 * 16 + 16 * 11)
    assert lstm.flops_per_token(_cfg(), 11, 64) == expected


# --- learning ----------------------------------------------------------------------------------------


TEXT = "the quick brown fox jumps over the lazy dog. " * 8
VOCAB = sorted(set(TEXT))


def _overfit(model, steps=150, lr=2e-2):
    ids = np.array([VOCAB.index(ch) for ch in TEXT], np.int32)
    batch = jnp.asarray(np.stack([ids[s:s + 33] for s in range(0, 8 * 37, 37)]))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    def loss_fn(params):
        logits, _ = nnx.merge(graphdef, params)(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state)
        first = loss if first is None else first
    return float(first), float(loss_fn(params))


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_overfits_tiny_text(name):
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    cfg = _cfg(name, d_model=32, hidden_size=64)
    first, last = _overfit(cls(cfg, len(VOCAB), rngs=nnx.Rngs(params=0)))
    assert first > 0.8 * np.log(len(VOCAB)) and last < 0.2, (first, last)


@pytest.mark.parametrize("name,by_vocabulary", [("rnn", True), ("lstm", True), ("lstm", False)])
def test_logits_at_positions_equal_the_full_logits_gathered(name, by_vocabulary):
    """positions (masked-LM objective on a recurrent LM): the output layer at K positions only; against all T
    then indexing, forward and every parameter's gradient."""
    cls = lstm.RNNLM if name == "rnn" else lstm.LSTMLM
    graphdef, params = nnx.split(cls(_cfg(name, projection_size=0 if name == "rnn" else 12), 11,
                                     rngs=nnx.Rngs(params=0)))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 20 if by_vocabulary else 3)), jnp.int32)
    positions = jnp.asarray(np.random.default_rng(1).integers(0, tokens.shape[1], (3, 5)), jnp.int32)
    probe = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 11)), jnp.float32)
    assert nnx.merge(graphdef, params).projects_by_vocabulary(tokens) == by_vocabulary

    def loss(p, gathered):
        model = nnx.merge(graphdef, p)
        logits = (model(tokens, positions=positions)[0] if gathered
                  else jnp.take_along_axis(model(tokens)[0], positions[..., None], axis=1))
        return jnp.sum(probe * logits), logits

    (_, got), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
    assert got.shape == (3, 5, 11) and _rel_err(got, want) < 1e-5
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert _rel_err(g, w) < 1e-5
