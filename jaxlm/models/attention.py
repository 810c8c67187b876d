"""Multi-head self-attention (Vaswani et al. 2017) with a fused QKV projection and sown weights.

Layout: activations stay [B, T, H, Dh] (a free reshape of the projection output) and the einsums
contract in that layout, so no explicit head transposes are written.  Scores and softmax run in
float32 whatever the compute dtype.  Masking is one `jnp.where` with a large negative finite value
followed by `jax.nn.softmax`: a row with no visible key cannot produce NaN (it would be uniform), and
such rows are then zeroed so a query that may see nothing attends to nothing.

Causal attention runs in `query_blocks` blocks of queries (`model.attention_query_blocks`, 4 by default): block
i scores only the keys up to its own last query, so the score tiles strictly above the diagonal are never
computed, multiplied, exponentiated or differentiated (n blocks skip (n - 1) / 2n of the T x T work; blocks
are at least MIN_QUERY_BLOCK queries long).  GPT small trains 1.09x faster on CPU (benchmarks/README.md).
Only each block's diagonal tile is masked; the function is the same as one T x T block (tests compare them).

The layer's core `weights @ v` has two implementations with the same forward function:
  * `attend_reference`: the straightforward einsums, differentiated by JAX autodiff;
  * `attend` (default): a `jax.custom_vjp` with the textbook backward (dP = dY V^T,
    dS = P * (dP - rowsum(dY * Y)), dQ = dS K, dK = dS^T Q, dV = P^T dY), which XLA:CPU runs 3% faster per
    GPT train step than autodiff's (benchmarks/README.md).  Tests check it equals the reference (outputs and
    gradients).  Reverse mode only (grad, vjp, jacrev): build the layer with `fused=False` for jvp/jacfwd.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from jaxlm.models import layers, positions

# Large negative but finite: exp(NEG - max) underflows to exactly 0, and a row that is all NEG stays finite.
NEG = -1e30


def attention_mask(queries: int, keys: int, *, causal: bool, mask: jax.Array | None):
    """Which keys each query may attend to: bool, broadcastable to [B, 1, Tq, Tk] (query, key), or None.

    Args:
      queries, keys: Tq and Tk; the queries are the LAST Tq positions of the Tk keys (Tq = Tk: self-attention).
      causal: a query at position t sees keys <= t (GPT).
      mask: bool [B, Tk], True = real token; padding KEYS are hidden from every query.
    Returns:
      None if nothing is masked, else bool [1 or B, 1, Tq, Tk].
    """
    allowed = None
    if causal:
        allowed = jnp.tril(jnp.ones((queries, keys), dtype=bool), k=keys - queries)[None, None]
    if mask is not None:
        visible = mask.astype(bool)[:, None, None, :]
        allowed = visible if allowed is None else allowed & visible
    return allowed


def attention_weights(q: jax.Array, k: jax.Array, *, causal: bool = False,
                      mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) over visible keys, in float32.

    Pure function of the projected queries and keys, so tests and analysis can recompute the weights
    a layer sows.

    Args:
      q: [B, Tq, H, Dh], k: [B, Tk, H, Dh] (any float dtype; the product accumulates in float32); the queries
        are the last Tq positions of the keys.
      causal: hide keys after the query.
      mask: bool [B, Tk] key padding mask (True = real), or None.
    Returns:
      float32 [B, H, Tq, Tk] (batch, head, query, key); each row sums to 1, or is all zero when the query
      can see no key at all.
    """
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    allowed = attention_mask(q.shape[1], k.shape[1], causal=causal, mask=mask)
    if allowed is None:
        return jax.nn.softmax(scores, axis=-1)
    weights = jax.nn.softmax(jnp.where(allowed, scores, NEG), axis=-1)
    if mask is not None:  # a query whose visible keys are all padding attends to nothing (not uniformly)
        weights = jnp.where(allowed.any(axis=-1, keepdims=True), weights, 0.0)
    return weights


def attend_reference(q, k, v, causal: bool, mask: jax.Array | None = None):
    """softmax(q k^T / sqrt(Dh)) v over visible keys, differentiated by autodiff.

    q [B, Tq, H, Dh], k and v [B, Tk, H, Dh] -> (y [B, Tq, H, Dh] in v's dtype, weights float32 [B, H, Tq, Tk]).
    """
    weights = attention_weights(q, k, causal=causal, mask=mask)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attend(q, k, v, causal: bool, mask: jax.Array | None = None):
    """`attend_reference` with a hand-written backward (see the module docstring); mask is not differentiated.

    The weights are an output so the layer can sow them without computing them twice; their cotangent is
    symbolically zero unless something differentiates through them, and then it is included.
    """
    return attend_reference(q, k, v, causal, mask)


def _attend_fwd(q, k, v, causal, mask):
    # symbolic_zeros=True: the differentiable inputs arrive wrapped (CustomVJPPrimal); None stays None.
    q, k, v, mask = (None if a is None else a.value for a in (q, k, v, mask))
    y, weights = attend_reference(q, k, v, causal, mask)
    return (y, weights), (q, k, v, weights, y, mask)


def _attend_bwd(causal, residuals, cotangents):
    q, k, v, weights, y, mask = residuals
    dy, dweights = cotangents
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros_like(y)
    f32 = jnp.float32
    dv = jnp.einsum("bhqk,bqhd->bkhd", weights.astype(v.dtype), dy.astype(v.dtype))
    dp = jnp.einsum("bqhd,bkhd->bhqk", dy, v, preferred_element_type=f32)
    # softmax backward dS = P (dP - sum_k P dP), with sum_k P dP = sum_d dY Y: a reduction over Dh instead
    # of one over [B, H, T, T].  Masked keys (and zeroed rows) have P = 0, so their dS is 0, as in autodiff.
    rows = jnp.sum(dy.astype(f32) * y.astype(f32), axis=-1).transpose(0, 2, 1)[..., None]
    dp = dp - rows
    if not isinstance(dweights, SymbolicZero):   # something differentiates through the sown weights too
        dp = dp + dweights - jnp.sum(weights * dweights, axis=-1, keepdims=True)
    ds = (weights * dp).astype(q.dtype)
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q * scale)
    return dq, dk, dv, None


attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)


# Shortest query block worth its own kernels: each block adds ~15 kernels per layer to compile, and below 64
# queries the work a block skips no longer pays for them (GPT at T = 128: 2 blocks; T >= 256: 4).
MIN_QUERY_BLOCK = 64


def block_stops(length: int, blocks: int) -> list[int]:
    """The end (exclusive) of each of at most `blocks` near-equal query blocks of a length-`length` sequence,
    none shorter than MIN_QUERY_BLOCK (a shorter sequence is one block)."""
    n = max(1, min(blocks, length // MIN_QUERY_BLOCK))
    return [(i + 1) * length // n for i in range(n)]


def attend_causal(core, q, k, v, mask: jax.Array | None, blocks: int):
    """Causal `core` (attend or attend_reference) in query blocks: block [start, stop) attends to keys [0, stop).

    q, k, v [B, T, H, Dh], mask bool [B, T] or None -> (y [B, T, H, Dh], weights float32 [B, H, T, T]); the
    weights of the skipped tiles are the zeros the mask would have given them (sown for analysis, dead code
    in training).
    """
    t = q.shape[1]
    ys, weights, start = [], [], 0
    for stop in block_stops(t, blocks):
        y, w = core(q[:, start:stop], k[:, :stop], v[:, :stop], True, None if mask is None else mask[:, :stop])
        ys.append(y)
        weights.append(jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, t - stop))))
        start = stop
    return jnp.concatenate(ys, axis=1), jnp.concatenate(weights, axis=2)


class MultiHeadAttention(nnx.Module):
    """Self-attention: fused QKV Linear(d -> 3d), per-head softmax, output Linear(d -> d).

    The output projection writes into the residual stream and gets the GPT-2 scaled init.  Weights
    [B, H, T, T] are sown as ``nnx.Intermediate`` ``attention_weights``; pull them with
    ``nnx.pop(model, nnx.Intermediate)`` (each call appends one entry until popped).  Under jit the
    sown value is dead code unless returned, so training pays nothing for it.  `fused` picks `attend`
    (custom VJP, the default) or `attend_reference` (autodiff; needed for forward-mode jvp/jacfwd).
    Causal attention runs in `query_blocks` query blocks (`attend_causal`; 1 = one T x T block).
    `rope` rotates queries and keys by their positions first (`positions.rotate`).
    """

    def __init__(self, features: int, num_heads: int, *, causal: bool, num_layers: int, dtype,
                 rngs: nnx.Rngs, fused: bool = True, query_blocks: int = 1, rope: bool = False):
        if features % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={features}")
        self.num_heads = num_heads
        self.causal = causal
        self.fused = fused
        self.query_blocks = query_blocks
        self.rope = rope
        self.qkv = layers.linear(features, 3 * features, dtype=dtype, rngs=rngs)
        self.out = layers.linear(features, features, dtype=dtype, rngs=rngs,
                                 init=layers.residual_init(num_layers))

    def project(self, x: jax.Array):
        """x [B, T, d] -> (q, k, v), each [B, T, H, Dh], from ONE matmul.

        `jnp.split` rather than indexing: the gradient of a split is one concatenate, whereas each
        index's gradient is a zero-padded full-size copy of dqkv that then has to be summed.
        """
        b, t, d = x.shape
        heads = (b, t, self.num_heads, d // self.num_heads)
        return tuple(a.reshape(heads) for a in jnp.split(self.qkv(x), 3, axis=-1))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, d], mask bool [B, T] (True = real) or None -> [B, T, d]."""
        b, t, d = x.shape
        q, k, v = self.project(x)
        if self.rope:
            q, k = positions.rotate(q), positions.rotate(k)
        core = attend if self.fused else attend_reference
        if self.causal:
            y, weights = attend_causal(core, q, k, v, mask, self.query_blocks)
        else:
            y, weights = core(q, k, v, False, mask)
        self.sow(nnx.Intermediate, "attention_weights", weights)
        return self.out(y.reshape(b, t, d))
