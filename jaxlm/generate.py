"""Sampling from causal models (temperature, top-k, top-p) and the next-token probability table.

The whole generation is one jitted `lax.scan`. Transformers re-read a rolling window of the last
`max_len` tokens each step (no KV cache: simple, and fast enough at research sizes); recurrent models
carry their state and do O(1) work per token through `model.step`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Scale by 1/temperature, keep the k most likely and the smallest set with mass >= top_p (others -> -inf)."""
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p     # always keeps the most likely token
        keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1, inplace=False)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "num_tokens", "temperature", "top_k", "top_p"))
def _sample_window(graphdef, params, prompt, key, *, max_len, num_tokens, temperature, top_k, top_p):
    """Transformer sampling over a rolling window of max_len tokens (prompt: int32 [P], P <= max_len)."""
    p = prompt.shape[0]
    window = jnp.zeros((max_len,), jnp.int32).at[:p].set(prompt)

    def body(carry, k):
        window, n = carry
        at = jnp.reshape(jnp.minimum(n, max_len) - 1, (1, 1))   # the output layer only at the last token
        logits, _ = nnx.merge(graphdef, params)(window[None], positions=at)   # merged in the scan: sow stays in-trace
        last = logits[0, 0]
        token = jax.random.categorical(k, filter_logits(last, temperature=temperature, top_k=top_k, top_p=top_p))
        full = n >= max_len
        window = jnp.where(full, jnp.roll(window, -1).at[-1].set(token), window.at[jnp.minimum(n, max_len - 1)].set(token))
        return (window, n + 1), token

    _, tokens = jax.lax.scan(body, (window, jnp.asarray(p)), jax.random.split(key, num_tokens))
    return tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "temperature", "top_k", "top_p"))
def _sample_recurrent(graphdef, params, prompt, key, *, num_tokens, temperature, top_k, top_p):
    """Recurrent sampling: read the prompt once, then carry the state token by token."""
    logits, carry = nnx.merge(graphdef, params)(prompt[None], positions=jnp.full((1, 1), prompt.shape[0] - 1))

    def body(c, k):
        last, carry = c
        token = jax.random.categorical(k, filter_logits(last, temperature=temperature, top_k=top_k, top_p=top_p))
        logits, carry = nnx.merge(graphdef, params).step(token[None], carry)
        return (logits[0], carry), token

    _, tokens = jax.lax.scan(body, (logits[0, 0], carry), jax.random.split(key, num_tokens))
    return tokens


def model_class(graphdef) -> type:
    """The model's class, read from its graphdef (the root node) without building the model."""
    return graphdef.nodes[0].type


def is_recurrent(graphdef) -> bool:
    """Whether the model carries state token by token (has `step`)."""
    return hasattr(model_class(graphdef), "step")


def sample(graphdef, params, prompt, *, max_len: int, num_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """num_tokens new token ids continuing `prompt` (1-D ids, non-empty)."""
    prompt = jnp.asarray(np.asarray(prompt, np.int32)[-max_len:])
    key = jax.random.key(seed)
    kwargs = dict(num_tokens=int(num_tokens), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    if is_recurrent(graphdef):
        return np.asarray(_sample_recurrent(graphdef, params, prompt, key, **kwargs))
    return np.asarray(_sample_window(graphdef, params, prompt, key, max_len=int(max_len), **kwargs))


def next_token_table(graphdef, params, prompt, k: int) -> list[tuple[int, float]]:
    """The k most likely next tokens after `prompt` with their probabilities (the seed's GPT output)."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(jnp.asarray(np.asarray(prompt, np.int32))[None])
    probs = np.asarray(jax.nn.softmax(logits[0, -1].astype(jnp.float32)))
    top = np.argsort(-probs)[:k]
    return [(int(i), float(probs[i])) for i in top]
