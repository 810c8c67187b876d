"""ELMo biLM and ScalarMix: padding-aware reversal, per-layer representations, tied softmax, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm import bench, config as config_lib
from jaxlm.models import elmo, scalar_mix


def _cfg(**overrides):
    cfg = config_lib.default_config().model
    cfg.name = "elmo"
    cfg.num_layers, cfg.d_model, cfg.hidden_size = 2, 8, 12
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _model(**overrides):
    return elmo.ELMo(_cfg(**overrides), 11, rngs=nnx.Rngs(params=0))


LENGTHS = np.array([9, 6, 2])


def _padded_batch(seed=0, pad_id=0):
    tokens = np.random.default_rng(seed).integers(1, 11, (3, 9))
    mask = np.arange(9)[None, :] < LENGTHS[:, None]
    return jnp.asarray(np.where(mask, tokens, pad_id), jnp.int32), jnp.asarray(mask)


def test_flip_sequences_reverses_only_real_tokens():
    x = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])[..., None]   # [B 2, T 5, 1]
    flipped = elmo.flip_sequences(x, jnp.array([3, 5]))
    np.testing.assert_array_equal(flipped[..., 0], [[3, 2, 1, 0, 0], [8, 7, 6, 5, 4]])
    np.testing.assert_array_equal(elmo.flip_sequences(flipped, jnp.array([3, 5])), x)


def test_interface_and_state_is_only_params():
    model = _model(dropout=0.1)
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    assert model.initial_carry(3) is None
    tokens, mask = _padded_batch()
    (fwd, bwd), carry = model(tokens, mask=mask, dropout_key=jax.random.key(1))
    assert carry is None
    assert fwd.shape == bwd.shape == (3, 9, 11) and fwd.dtype == bwd.dtype == jnp.float32


def test_backward_stack_is_forward_stack_on_reversed_rows_with_padding():
    model = _model()
    tokens, mask = _padded_batch()
    reps = model.embeddings(tokens, mask)
    # Reverse each row's real tokens by hand and run the *forward* direction with the backward weights:
    # it is causal, so its outputs at real positions never see the padding that follows them.
    rev = np.array(tokens)
    for b, n in enumerate(LENGTHS):
        rev[b, :n] = rev[b, :n][::-1]
    fwd = elmo.run_stack(model.forward_layers, model.embed(tokens))
    bwd = elmo.run_stack(model.backward_layers, model.embed(jnp.asarray(rev)))
    d = 8
    for layer in range(model.num_layers):
        for b, n in enumerate(LENGTHS):
            np.testing.assert_allclose(reps[layer + 1, b, :n, :d], fwd[layer][b, :n], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(reps[layer + 1, b, :n, d:], bwd[layer][b, :n][::-1], rtol=1e-5, atol=1e-6)


def test_vocabulary_projection_equals_embedding_then_projection_with_padding():
    """Called on tokens, both directions' first layers project the vocabulary (the backward one gathers the
    row-flipped ids); against forward_from_embeddings(embed(tokens)): both logits and every gradient."""
    model = _model()
    lengths = np.array([20, 13, 5])
    mask = jnp.asarray(np.arange(20)[None, :] < lengths[:, None])
    tokens = jnp.where(mask, jnp.asarray(np.random.default_rng(6).integers(1, 11, (3, 20)), jnp.int32), 0)
    assert model.projects_by_vocabulary(tokens)   # 60 tokens >= 4 per entry of 11
    graphdef, params = nnx.split(model)

    def loss(params, by_vocabulary):
        m = nnx.merge(graphdef, params)
        (fwd, bwd), _ = (m(tokens, mask=mask) if by_vocabulary
                         else m.forward_from_embeddings(m.embed(tokens), mask=mask))
        xent = optax.softmax_cross_entropy_with_integer_labels
        return (jnp.sum(jnp.where(mask[:, :-1], xent(fwd[:, :-1], tokens[:, 1:]), 0.0))
                + jnp.sum(jnp.where(mask[:, 1:], xent(bwd[:, 1:], tokens[:, :-1]), 0.0))), (fwd, bwd)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, out_v), grads_v = grad(params, True)
    (_, out_e), grads_e = grad(params, False)
    for a, b in zip(out_v, out_e):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads_v)]
    for n, a, b in zip(names, jax.tree.leaves(grads_v), jax.tree.leaves(grads_e)):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0 and float(jnp.max(jnp.abs(a - b))) < 1e-5 * scale, n
    # the path is taken: each direction's first projection (forward, and the two gradients: 3 matmuls of
    # 2 * rows * d * 4H) runs over the 11 entries instead of the 60 tokens
    flops = {v: bench.matmul_flops(jax.make_jaxpr(jax.grad(lambda p: loss(p, v)[0]))(params)) for v in (True, False)}
    assert flops[False] - flops[True] == 2 * 3 * 2 * (60 - 11) * 8 * 48


def test_real_positions_ignore_padding_contents():
    model = _model()
    (tokens_a, mask), (tokens_b, _) = _padded_batch(pad_id=0), _padded_batch(pad_id=7)
    (fa, ba), _ = model(tokens_a, mask=mask)
    (fb, bb), _ = model(tokens_b, mask=mask)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(fa)[m], np.asarray(fb)[m], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ba)[m], np.asarray(bb)[m], rtol=1e-6, atol=1e-7)
    # without the mask, the backward direction reads the padding first and differs
    (_, b_nomask), _ = model(tokens_b)
    assert not np.allclose(np.asarray(b_nomask)[m], np.asarray(bb)[m], atol=1e-6)


def test_embeddings_shape_and_layer0_and_tied_logits():
    model = _model(num_layers=3)
    tokens, mask = _padded_batch()
    reps = model.embeddings(tokens, mask)
    assert reps.shape == (4, 3, 9, 16)
    x = model.embed(tokens)
    np.testing.assert_array_equal(reps[0], jnp.concatenate([x, x], -1))
    (fwd, bwd), _ = model(tokens, mask=mask)
    table, bias = model.embedding.embedding[...], model.logit_bias[...]
    np.testing.assert_allclose(fwd, reps[-1, ..., :8] @ table.T + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bwd, reps[-1, ..., 8:] @ table.T + bias, rtol=1e-5, atol=1e-6)
    assert len(model.hidden_states(tokens, mask=mask)) == 4


def test_scalar_mix_matches_equation_and_weights_sum_to_one():
    mix = scalar_mix.ScalarMix(4)
    np.testing.assert_allclose(mix.weights(), 0.25)
    mix.scalars[...] = jnp.array([0.3, -1.0, 2.0, 0.5])
    mix.gamma[...] = jnp.array(1.7)
    assert abs(float(jnp.sum(mix.weights())) - 1.0) < 1e-6
    reps = np.random.default_rng(0).standard_normal((4, 2, 5, 6))
    s = np.array([0.3, -1.0, 2.0, 0.5])
    w = np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(mix(jnp.asarray(reps, jnp.float32)), 1.7 * np.einsum("j,jbtd->btd", w, reps),
                               rtol=1e-5, atol=1e-6)
    assert not jax.tree.leaves(nnx.state(mix, nnx.Not(nnx.Param)))


def test_scalar_mix_layer_norm_uses_real_positions_only():
    mix = scalar_mix.ScalarMix(2, layer_norm=True)
    reps = np.random.default_rng(1).standard_normal((2, 2, 5, 3)) * 3 + 1
    mask = np.arange(5)[None, :] < np.array([5, 3])[:, None]
    expected = []
    for h in reps:
        real = h[mask]
        expected.append((h - real.mean()) / real.std())
    out = mix(jnp.asarray(reps, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out)[mask], np.mean(expected, 0)[mask], rtol=1e-4, atol=1e-5)


def test_flops_per_token_closed_form():
    cfg = _cfg()
    per_layer = 2 * (8 * 48 + 8 * 48 + 12 * 8)
    assert elmo.flops_per_token(cfg, 11, 64) == 3 * 2 * (2 * per_layer + 2 * 8 * 11)
    model = elmo.ELMo(cfg, 11, rngs=nnx.Rngs(params=0))
    matmul_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)) if p.ndim == 2)
    # 6N over the LSTM weights, plus each direction's tied softmax (the embedding table counted twice)
    assert elmo.flops_per_token(cfg, 11, 64) == 6 * (matmul_params + 11 * 8)


def test_overfits_tiny_text():
    text = "the quick brown fox jumps over the lazy dog. " * 8
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text], np.int32)
    batch = jnp.asarray(np.stack([ids[s:s + 32] for s in range(0, 8 * 37, 37)]))
    model = elmo.ELMo(_cfg(d_model=32, hidden_size=64), len(vocab), rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(2e-2)
    opt_state = tx.init(params)

    def losses(params):
        (fwd, bwd), _ = nnx.merge(graphdef, params)(batch)
        ce = optax.softmax_cross_entropy_with_integer_labels
        return ce(fwd[:, :-1], batch[:, 1:]).mean(), ce(bwd[:, 1:], batch[:, :-1]).mean()

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: sum(losses(p)) / 2)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(150):
        params, opt_state, loss = train_step(params, opt_state)
        first = loss if first is None else first
    forward_loss, backward_loss = jax.jit(losses)(params)
    assert float(first) > 0.8 * np.log(len(vocab))
    assert float(forward_loss) < 0.2 and float(backward_loss) < 0.2, (forward_loss, backward_loss)
