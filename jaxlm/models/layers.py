"""Shared building blocks for the transformer models: dropout, embeddings, LayerNorm, the GELU MLP.

Parameters are always float32; computation runs in ``cfg.dtype`` (the ``dtype`` arguments below), so
bfloat16 runs keep float32 master weights and optimizer state.  Initialisation follows GPT-2
(Radford et al. 2019): normal(0.02) for embeddings and linear kernels, zeros for biases, and
0.02/sqrt(2L) for the projections that write into the residual stream (see :func:`residual_init`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def normal_init(std: float = INIT_STD):
    """normal(0, std) initializer (GPT-2 / BERT use std 0.02)."""
    return nnx.initializers.normal(stddev=std)


def residual_init(num_layers: int):
    """GPT-2 scaled init for residual output projections: std 0.02 / sqrt(2 * num_layers).

    Each block adds two such projections (attention output, MLP output) to the residual stream, so
    scaling by 1/sqrt(2L) keeps the residual's variance at init independent of depth.
    """
    return normal_init(INIT_STD / math.sqrt(2 * num_layers))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by 1/(1-rate).

    A pure function (the key is passed in, nothing is stored on a module), so models keep only
    nnx.Param state.  `key=None` or `rate == 0` is the identity (evaluation / deterministic mode).
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def split_keys(key: jax.Array | None, num: int) -> list:
    """`num` independent dropout keys, or `num` Nones when `key` is None (deterministic)."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


def at_positions(x: jax.Array, positions: jax.Array | None) -> jax.Array:
    """x [B, T, ...] -> x [B, K, ...] at positions int [B, K] (None: x unchanged).

    Models take ``positions`` to compute their output layers only where a loss needs logits (masked-LM).
    """
    return x if positions is None else jnp.take_along_axis(x, positions[..., None], axis=1)


def compute_dtype(cfg):
    """The compute dtype named by `cfg.dtype` ("float32" | "bfloat16" | "float16")."""
    return jnp.dtype(cfg.dtype)


def embedding_std(cfg, *, recurrent: bool) -> float:
    """The token-embedding init std: cfg.embed_init_std, or the model family's default when it is 0.

    Transformers: 0.02 (GPT-2; LayerNorm follows, so the scale does not matter much).  Recurrent models:
    1/sqrt(d_model), rows of unit norm (the fan-in scaling of flax's Embed).  Recurrent layers see the
    embedding through un-normalised gates, and at 0.02 the input reaches the LSTM cell ~100x weaker than
    its recurrent signal: the LSTM then sat at chance on delayed recall at d = 10 for 500-2,000 steps.
    """
    if cfg.embed_init_std > 0:
        return float(cfg.embed_init_std)
    return 1.0 / math.sqrt(cfg.d_model) if recurrent else INIT_STD


class Embed(nnx.Module):
    """Token embedding table [vocab, d] whose transpose is also the output layer (weight tying).

    Tying (Press & Wolf 2017) halves the embedding-related parameters and is what GPT-2 and BERT do:
    ``logits = h @ E^T`` (:meth:`attend`).
    """

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs, std: float = INIT_STD):
        self.dtype = dtype
        self.embedding = nnx.Param(normal_init(std)(rngs.params(), (num_embeddings, features), jnp.float32))

    def table(self) -> jax.Array:
        """The whole table [vocab, d] in the compute dtype."""
        return self.embedding[...].astype(self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> vectors [..., d] in the compute dtype.

        Gathered from the float32 table and then cast (the same values), so that the gradient's scatter-add
        sums each row's many tokens in float32: with bfloat16 rows, a bfloat16 LSTM's embedding gradient was 7%
        off the float32 model's (0.7% this way; tests/models/test_lstm.py).
        """
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """h [..., d] -> logits [..., vocab] = h @ E^T, computed in the compute dtype."""
        return jnp.einsum("...d,vd->...v", h.astype(self.dtype), self.table())


def layer_norm(features: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm (Ba et al. 2016) with eps 1e-5 (GPT-2/PyTorch default); float32 params, stats in float32."""
    return nnx.LayerNorm(features, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] + b [out], written as one 2-D matmul over the flattened leading axes.

    Same function as einsum("...i,io->...o"), but autodiff of the 2-D form gives XLA:CPU a weight gradient
    it runs as one YNNPACK matmul; the einsum's (and flax nnx.Linear's) became a transpose copy of the
    cotangent plus a slower Eigen dot.  The backward of a [4096, 256] x [256, 1024] layer measured 1.7-2x
    faster this way (benchmarks/README.md).  Plain autodiff, so every transformation (jvp too) works.
    """
    y = x.reshape(-1, x.shape[-1]) @ w
    return y.reshape(x.shape[:-1] + (w.shape[-1],)) + b


@jax.custom_vjp
def dense_vjp(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """`dense` with a hand-written backward that computes the weight gradient x^T @ dy in w's own [in, out] layout.

    Autodiff's transpose rule computes dy^T @ x ([out, in]) and transposes it; in the LSTM step XLA:CPU did not
    fold that transpose away but fused it into the optimizer's kernels, which then read the gradient with a
    stride (LSTM small: ~3% of the step).  The weight gradient goes through :func:`weight_gradient`.  Reverse
    mode only, like the fused LSTM recurrence it feeds.
    """
    return dense(x, w, b)


def _dense_vjp_fwd(x, w, b):
    return dense(x, w, b), (x, w)


def _dense_vjp_bwd(residuals, dy):
    x, w = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jax.lax.dot_general(dy2, w, (((1,), (1,)), ((), ())))   # dy @ w^T: [N, in]
    return dx.reshape(x.shape), weight_gradient(x2, dy2), dy2.sum(axis=0)


def weight_gradient(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T @ dy for x [N, in], dy [N, out] -> [in, out], with x^T materialised first.

    Left to itself XLA folds the transpose into the dot, and XLA:CPU runs that transposed-operand dot as an
    Eigen kernel: [2048, 512]^T x [2048, 2048] (an LSTM small weight gradient per device, both devices at once)
    took 70 ms against 54 ms for copying x^T and one YNNPACK matmul (benchmarks/README.md).  The barrier keeps
    the copy.  Not used for GPT's layers: there the copies cost more than they save (GPT small 0.89x).
    """
    return jax.lax.optimization_barrier(x.T) @ dy


dense_vjp.defvjp(_dense_vjp_fwd, _dense_vjp_bwd)


class Linear(nnx.Module):
    """Dense layer y = x @ kernel + bias through :func:`dense`: float32 `kernel` [in, out] and `bias` [out]
    (the parameter names and shapes of nnx.Linear, so checkpoints are interchangeable), compute in `dtype`."""

    def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, init=None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = jnp.dtype(dtype)
        self.kernel = nnx.Param((init or normal_init())(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        return dense(x.astype(dt), self.kernel[...].astype(dt), self.bias[...].astype(dt))


def linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, init=None) -> Linear:
    """Dense layer with float32 params, normal(0.02) kernel (or `init`), zero bias, compute in `dtype`."""
    return Linear(in_features, out_features, dtype=dtype, rngs=rngs, init=init)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU (Hendrycks & Gimpel 2016): x * Phi(x), exact (erf) or the tanh approximation.

    The exact form is written as 0.5 * x * (1 + erf(x / sqrt 2)), as PyTorch does, rather than
    jax.nn.gelu's erfc form: XLA:CPU evaluates erfc as two branches plus a select (about 1.5x the cost
    of erf forward+backward here) and the difference is < 2e-6 absolute on [-10, 10].
    """
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class MlpBlock(nnx.Module):
    """Position-wise feed-forward: Linear(d -> hidden), GELU, Linear(hidden -> d).

    The second projection writes into the residual stream and so gets the scaled init.  GELU is exact
    (erf) unless `gelu_approximate` (tanh form, Hendrycks & Gimpel 2016), which is faster on CPU but a
    slightly different function; it is a config choice, not a silent substitution.
    """

    def __init__(self, features: int, hidden: int, *, num_layers: int, gelu_approximate: bool, dtype,
                 rngs: nnx.Rngs):
        self.gelu_approximate = gelu_approximate
        self.fc = linear(features, hidden, dtype=dtype, rngs=rngs)
        self.proj = linear(hidden, features, dtype=dtype, rngs=rngs, init=residual_init(num_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d] -> [B, T, d]."""
        return self.proj(gelu(self.fc(x), self.gelu_approximate))
