"""Decoder (GPT) / Encoder (BERT): causality, bidirectionality, functional use, dropout, overfitting, FLOPs
(remat: tests/test_parallel.py, through the train step)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import config, objectives
from jaxlm.models import layers, transformer

VOCAB = 262                      # 256 bytes + 6 specials, like the bytes tokenizer
SPECIALS = tuple(range(256, 262))
MASK_ID = 257


def tiny_cfg(**overrides):
    cfg = config.default_config().model
    cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.max_len = 2, 32, 4, 64
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def build(cls, seed=0, vocab=VOCAB, **overrides):
    cfg = tiny_cfg(**overrides)
    return cls(cfg, vocab, rngs=nnx.Rngs(params=seed))


@functools.cache
def jitted(cls, **overrides):
    """(tokens, mask=None) -> logits of a tiny `cls`, via split/merge + jax.jit; cached so tests share compiles."""
    graphdef, params = nnx.split(build(cls, **overrides), nnx.Param)
    fn = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, mask=m)[0])
    return lambda tokens, mask=None: fn(params, tokens, mask)


def random_tokens(seed, b=2, t=16):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (b, t)), jnp.int32)


# ---------------------------------------------------------------- interface / functional use

@pytest.mark.parametrize("cls", [transformer.Decoder, transformer.Encoder])
def test_split_merge_captures_all_state_and_jits(cls):
    model = build(cls)
    graphdef, params = nnx.split(model, nnx.Param)
    everything = nnx.state(model)
    assert jax.tree.structure(everything) == jax.tree.structure(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = random_tokens(0)
    logits, carry = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, tokens)
    assert carry is None and model.initial_carry(2) is None
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, jitted(cls)(tokens))  # same seed, same function


def test_too_long_input_raises():
    model = build(transformer.Decoder)
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, 65), jnp.int32))


def test_bfloat16_compute_float32_params_and_logits():
    model = build(transformer.Decoder, dtype="bfloat16")
    _, params = nnx.split(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = jitted(transformer.Decoder, dtype="bfloat16")(random_tokens(1))
    ref = jitted(transformer.Decoder)(random_tokens(1))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.05)  # same weights, bf16 rounding only


def test_init_scales():
    model = build(transformer.Decoder, d_model=64)
    std = lambda v: float(jnp.std(v[...]))
    assert abs(std(model.token_embed.embedding) - 0.02) < 0.001
    assert abs(std(model.blocks[0].attn.qkv.kernel) - 0.02) < 0.001
    assert abs(std(model.blocks[0].mlp.fc.kernel) - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * 2)
    assert abs(std(model.blocks[1].attn.out.kernel) - scaled) < 0.001
    assert abs(std(model.blocks[1].mlp.proj.kernel) - scaled) < 0.001
    assert not jnp.any(model.blocks[0].attn.qkv.bias[...])


# ---------------------------------------------------------------- causality / bidirectionality

def test_decoder_is_causal():
    model = jitted(transformer.Decoder)
    tokens = random_tokens(2)
    base = model(tokens)
    for t in (0, 7, 14):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % 256)
        out = model(changed)
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4  # the change is seen from t+1 on


def test_encoder_sees_the_right_context_and_decoder_does_not():
    tokens = random_tokens(3)
    changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % 256)
    enc, dec = jitted(transformer.Encoder), jitted(transformer.Decoder)
    assert np.abs(enc(changed)[:, 3] - enc(tokens)[:, 3]).max() > 1e-4
    np.testing.assert_allclose(dec(changed)[:, 3], dec(tokens)[:, 3], atol=1e-6)


def test_encoder_ignores_padding_keys():
    model = jitted(transformer.Encoder)
    tokens = random_tokens(4)
    mask = jnp.arange(16)[None] < jnp.array([[16], [6]])
    changed = tokens.at[1, 6:].set(0)
    a = model(tokens, mask)
    b = model(changed, mask)
    np.testing.assert_allclose(a[1, :6], b[1, :6], atol=1e-6)
    np.testing.assert_allclose(a[0], b[0], atol=0)
    c = model(changed)  # without the mask the padding is attended to
    assert np.abs(c[1, :6] - b[1, :6]).max() > 1e-4


def test_sown_attention_weights_per_layer():
    model = build(transformer.Decoder)
    model(random_tokens(5, t=8))
    sown = nnx.pop(model, nnx.Intermediate)
    for i in range(2):
        (w,) = sown["blocks"][i]["attn"]["attention_weights"].get_value()
        assert w.shape == (2, 4, 8, 8)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        assert not np.triu(np.asarray(w), 1).any()
    assert nnx.state(model, nnx.Intermediate) == nnx.State({})


# ---------------------------------------------------------------- analysis hooks

def test_hidden_states_and_embedding_entry_points():
    graphdef, params = nnx.split(build(transformer.Encoder), nnx.Param)

    @jax.jit
    def run(p, tokens):
        model = nnx.merge(graphdef, p)
        states = model.hidden_states(tokens)
        return states, model._output(states[-1]), model.forward_from_embeddings(model.embed(tokens))

    tokens = random_tokens(6)
    states, from_last_state, from_embeddings = run(params, tokens)
    assert len(states) == 3 and all(s.shape == (2, 16, 32) for s in states)
    logits = jitted(transformer.Encoder)(tokens)
    np.testing.assert_allclose(from_last_state, logits, atol=1e-5)
    np.testing.assert_allclose(from_embeddings, logits, atol=1e-6)


def test_gradient_wrt_embeddings_is_causal_for_decoder():
    # The functional pattern (merge inside the traced function): a live module cannot be mutated (sown)
    # from inside jax.grad's trace.
    graphdef, params = nnx.split(build(transformer.Decoder), nnx.Param)
    x = nnx.merge(graphdef, params).embed(random_tokens(7, b=1, t=10))
    logit_sum = lambda e: nnx.merge(graphdef, params).forward_from_embeddings(e)[0, 4].sum()
    grad = jax.jit(jax.grad(logit_sum))(x)
    norms = np.abs(np.asarray(grad[0])).sum(-1)
    assert (norms[5:] == 0).all() and (norms[:5] > 0).all()


# ---------------------------------------------------------------- dropout

def lm_loss(graphdef, params, tokens, key):
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], dropout_key=key)
    loss_sum, count, _ = objectives.causal_lm_loss(logits, tokens[:, 1:])
    return loss_sum / count


def test_dropout_is_keyed_and_off_without_key():
    graphdef, params = nnx.split(build(transformer.Decoder, dropout=0.3), nnx.Param)
    tokens = random_tokens(8)
    f = jax.jit(lambda p, k: nnx.merge(graphdef, p)(tokens, dropout_key=k)[0])
    g = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens)[0])
    a, b, c = f(params, jax.random.key(0)), f(params, jax.random.key(0)), f(params, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - g(params)).max() > 1e-3
    np.testing.assert_array_equal(g(params), g(params))


# ---------------------------------------------------------------- it learns

TEXT = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 4


def text_batch(b, t):
    data = np.frombuffer(TEXT, np.uint8).astype(np.int32)
    starts = np.arange(b) * 11
    return jnp.asarray(np.stack([data[s:s + t] for s in starts]))


def test_tiny_gpt_overfits_repeated_text():
    graphdef, params = nnx.split(build(transformer.Decoder, max_len=48), nnx.Param)
    tokens = text_batch(8, 49)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, tokens, None))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    first = None
    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 4.0 and float(loss) < 0.1, (first, float(loss))


def test_tiny_bert_overfits_masked_text():
    graphdef, params = nnx.split(build(transformer.Encoder, max_len=48), nnx.Param)
    tokens = text_batch(4, 48)
    tx = optax.adam(5e-3)

    def masked(key):  # mask_prob 0.3 rather than BERT's 0.15: twice the signal per step, a faster test
        return objectives.mask_tokens(tokens, key, mask_prob=0.3, mask_id=MASK_ID, vocab_size=VOCAB,
                                      special_ids=SPECIALS)

    def loss_fn(params, key):
        inputs, selected = masked(key)
        logits, _ = nnx.merge(graphdef, params)(inputs)
        loss_sum, count, correct = objectives.masked_lm_loss(logits, tokens, selected)
        return loss_sum / count, correct / count

    @jax.jit
    def step(params, opt_state, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for i in range(600):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    accuracy = np.mean([float(jax.jit(loss_fn)(params, jax.random.key(10_000 + i))[1]) for i in range(8)])
    assert accuracy > 0.9, (float(loss), accuracy)


def test_dropout_helper():
    x = jnp.ones((200, 500))
    y = np.asarray(layers.dropout(x, 0.25, jax.random.key(0)))
    kept = y != 0
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    n, p = kept.size, 0.75
    assert abs(kept.sum() - n * p) < 4 * np.sqrt(n * p * (1 - p))
    assert layers.dropout(x, 0.25, None) is x and layers.dropout(x, 0.0, jax.random.key(0)) is x


def test_gelu_matches_float64_reference():
    xs = np.linspace(-8, 8, 4001)
    exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in xs])
    np.testing.assert_allclose(layers.gelu(jnp.asarray(xs, jnp.float32), False), exact, atol=2e-6)
    tanh = 0.5 * xs * (1 + np.tanh(math.sqrt(2 / math.pi) * (xs + 0.044715 * xs ** 3)))
    np.testing.assert_allclose(layers.gelu(jnp.asarray(xs, jnp.float32), True), tanh, atol=2e-6)


# ---------------------------------------------------------------- FLOPs

def test_flops_per_token_hand_count():
    cfg = tiny_cfg(name="gpt")  # L=2, d=32, mlp_ratio=4, V=50, T=16
    per_block = 3 * 32 * 32 + 32 * 32 + 2 * 32 * 128     # qkv, attn out, mlp in + out
    n = 2 * per_block + 32 * 50                           # + tied output layer
    assert transformer.flops_per_token(cfg, 50, 16) == 6 * n + 6 * 2 * 16 * 32 == 163_200
    cfg.name = "bert"
    assert transformer.flops_per_token(cfg, 50, 16) == 163_200 + 6 * 32 * 32


@pytest.mark.parametrize("cls,name", [(transformer.Decoder, "gpt"), (transformer.Encoder, "bert")])
def test_flops_weight_count_matches_the_model_kernels(cls, name):
    model = build(cls, vocab=50)
    kernels = sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                  if path[-1] == "kernel") + 50 * 32  # + tied embedding used as the output layer
    attention = 6 * 2 * 16 * 32
    assert transformer.flops_per_token(tiny_cfg(name=name), 50, 16) == 6 * kernels + attention


@pytest.mark.parametrize("cls", [transformer.Decoder, transformer.Encoder])
def test_logits_at_positions_equal_the_full_logits_gathered(cls):
    """positions (masked-LM's gather): the output layers at K positions only; against all T then indexing,
    forward and every parameter's gradient."""
    graphdef, params = nnx.split(build(cls), nnx.Param)
    tokens = random_tokens(4, b=3, t=24)
    positions = jnp.asarray(np.random.default_rng(1).integers(0, 24, (3, 7)), jnp.int32)  # any order, repeats
    probe = jnp.asarray(np.random.default_rng(2).standard_normal((3, 7, VOCAB)), jnp.float32)

    def loss(p, gathered):
        model = nnx.merge(graphdef, p)
        if gathered:
            logits = model(tokens, positions=positions)[0]
        else:
            logits = jnp.take_along_axis(model(tokens)[0], positions[..., None], axis=1)
        return jnp.sum(probe * logits), logits

    (_, got), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
    assert got.shape == (3, 7, VOCAB)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())


@pytest.mark.parametrize("cls", [transformer.Decoder, transformer.Encoder])
def test_remat_model_samples_and_analyses_like_the_plain_one(cls):
    """model.remat only changes what the backward pass stores: sampling (a scan), gradient sensitivity (a vjp
    over closed-over params) and the sown attention maps equal the plain model's (they used to raise
    TraceContextError under remat)."""
    from jaxlm import generate
    from jaxlm.analysis import attention_maps, sensitivity
    plain = nnx.split(build(cls), nnx.Param)
    remat = nnx.split(build(cls, remat=True), nnx.Param)
    tokens = np.asarray(random_tokens(6, b=3, t=12))
    results = []
    for graphdef, params in (plain, remat):
        got = {"sensitivity": sensitivity.gradient_sensitivity(graphdef, params, tokens, mask_id=MASK_ID),
               "attention": attention_maps.attention_weights(graphdef, params, tokens[0])}
        if cls is transformer.Decoder:
            got["sample"] = generate.sample(graphdef, params, tokens[0, :4], max_len=64, num_tokens=6, seed=3)
        results.append(got)
    for name, want in results[0].items():
        np.testing.assert_allclose(results[1][name], want, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_greedy_sampling_equals_a_plain_argmax_loop(name):
    """generate.sample with top_k=1 against the straightforward loop: run the model on the last max_len tokens,
    take the argmax of the last position's logits, append (the window rolls once the prompt + output is longer
    than max_len; the LSTM carries its state instead)."""
    from jaxlm import generate, models
    cfg = tiny_cfg(name=name, max_len=8, hidden_size=32)
    graphdef, params = nnx.split(models.build_model(cfg, VOCAB, 0), nnx.Param)
    prompt = [int(t) for t in np.asarray(random_tokens(7, b=1, t=3))[0]]
    got = generate.sample(graphdef, params, prompt, max_len=8, num_tokens=10, top_k=1, seed=5)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    tokens = list(prompt)
    for _ in range(10):
        context = tokens[-8:] if name == "gpt" else tokens
        tokens.append(int(jnp.argmax(forward(params, jnp.asarray([context], jnp.int32))[0, -1])))
    assert list(got) == tokens[3:]
