"""Recurrent language models: Elman RNN and (projected) LSTM layers, stacked into `RNNLM` / `LSTMLM`.

Everything is batch-major (`[B, T, features]`), as the LMs' inputs and outputs: a batch split over devices
then stays a contiguous split through every reshape, so data parallelism needs no gathers (time-major
`[T, B, *]` arrays flattened to `[T * B, *]` for a matmul made XLA all-gather the batch and compute the
projections redundantly on every device).  Each layer computes its input projection `x @ W_ih + b` for all
time steps as one large matmul outside the recurrence, so the loop body only does the `[B, P] @ [P, 4H]`
recurrent matmul (one matmul for all four LSTM gates) and the elementwise cell; it reads step t of the
batch-major projection and writes step t of the batch-major output in place.

The LSTM recurrence has two implementations with the same forward function:
  * :func:`lstm_scan_reference`: the straightforward scan, differentiated by JAX autodiff;
  * :func:`lstm_scan_fused` (default): a `jax.custom_vjp` whose backward pass is a reverse loop that
    carries only (dh, dc) and emits the per-step gate gradients; dW_hh (and dW_p) are then one large
    matmul over all steps after the loop, as cuDNN and oneDNN do (this design measured +45-54% over
    autodiff of the scan on the 2-core CPU in shared/bench/README.md).  Tests check it equals the
    reference (outputs and gradients).  It supports reverse mode (grad, vjp, jacrev) but not forward
    mode (jvp, jacfwd): build the model with `fused=False` for that.  Its loops run batch-major or, from
    hidden size FEATURE_MAJOR_MIN_HIDDEN, feature-major (`_Layout`), whichever XLA:CPU runs faster.  The
    fused layer's input projection has a hand-written backward too (`layers.dense_vjp`).
The Elman RNN uses plain autodiff of its scan.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import layers

# ----------------------------------------------------------------------------------------------------
# Cell equations (pure functions; scans over time)
# ----------------------------------------------------------------------------------------------------


def rnn_scan(xw: jax.Array, w_hh: jax.Array, h0: jax.Array):
    """Elman recurrence h_t = tanh(xw_t + h_{t-1} @ W_hh) (Elman 1990).

    Args:
      xw: [B, T, H] input projection x_t @ W_ih + b for all steps.
      w_hh: [H, H]; h0: [B, H].
    Returns:
      (hs [B, T, H], h_T [B, H]).
    """
    def body(h, xw_t):
        h = jnp.tanh(xw_t + h @ w_hh)
        return h, h

    h_last, hs = jax.lax.scan(body, h0, jnp.swapaxes(xw, 0, 1))
    return jnp.swapaxes(hs, 0, 1), h_last


# The four gate activations in one elementwise pass over the gate axis: sigmoid(x) = (tanh(x/2) + 1) / 2 for
# i, f, o and tanh for g, instead of four sliced ops (each a separate kernel per time step on CPU).
_GATE_SCALE = np.array([0.5, 0.5, 1.0, 0.5], np.float32)
_GATE_SHIFT = np.array([0.5, 0.5, 0.0, 0.5], np.float32)


def _gate_activations(z: jax.Array, gate_axis: int = -2) -> jax.Array:
    """Pre-activations with the 4H gate features on axis `gate_axis + 1` split as (4, H) at `gate_axis`
    (order i, f, g, o) -> activations: sigmoid, sigmoid, tanh, sigmoid.

    Batch-major steps: z [..., 4H] -> [..., 4, H] (gate_axis -2); feature-major steps: z [4H, B] -> [4, H, B]
    (gate_axis -3).
    """
    axis = z.ndim + gate_axis + 1                      # the axis holding the 4H gate features
    z = z.reshape(z.shape[:axis] + (4, z.shape[axis] // 4) + z.shape[axis + 1:])
    shape = (4,) + (1,) * (-gate_axis - 1)
    scale = jnp.asarray(_GATE_SCALE.reshape(shape), z.dtype)
    shift = jnp.asarray(_GATE_SHIFT.reshape(shape), z.dtype)
    return jnp.tanh(z * scale) * scale + shift


def _lstm_cell(w_hh, w_p, carry, xw_t):
    """One LSTM step. Returns ((h, c), gate activations [B, 4, H] in the order i, f, g, o).

    c_t = f * c_{t-1} + i * g;  m_t = o * tanh(c_t);  h_t = m_t (or m_t @ W_p with a projection, LSTMP,
    Sak et al. 2014).
    """
    h, c = carry
    a = _gate_activations(xw_t + h @ w_hh)
    i, f, g, o = a[..., 0, :], a[..., 1, :], a[..., 2, :], a[..., 3, :]
    c = f * c + i * g
    m = o * jnp.tanh(c)
    h = m if w_p is None else m @ w_p
    return (h, c), a


def lstm_scan_reference(xw, w_hh, w_p, h0, c0):
    """LSTM recurrence over time, differentiated by plain autodiff (the reference for the fused path).

    Args:
      xw: [B, T, 4H] input projection (x_t @ W_ih + b) for all steps, gates ordered i, f, g, o.
      w_hh: [P, 4H] recurrent weights (P = projection size, or H without projection).
      w_p: [H, P] projection, or None.
      h0: [B, P]; c0: [B, H].
    Returns:
      (hs [B, T, P], (h_T [B, P], c_T [B, H])).
    """
    def body(carry, xw_t):
        carry, _ = _lstm_cell(w_hh, w_p, carry, xw_t)
        return carry, carry[0]

    carry, hs = jax.lax.scan(body, (h0, c0), jnp.swapaxes(xw, 0, 1))
    return jnp.swapaxes(hs, 0, 1), carry


# Hidden sizes from which the fused recurrence runs feature-major (see `_Layout`): measured on the 2-core
# Zen 3 VM (benchmarks/README.md), the LSTM small train step is 1.25x faster feature-major at H = 512, LSTM tiny
# 0.92x at H = 128.
FEATURE_MAJOR_MIN_HIDDEN = 256


class _Layout:
    """How the fused recurrence holds one step's arrays inside its loops.

    Batch-major: h [B, P], c [B, H], gates [B, 4, H]; the recurrent matmul is h @ W_hh ([16, 512] x [512, 2048]
    for LSTM small).  Feature-major: the transposes h [P, B], c [H, B], gates [4, H, B]; the recurrent matmul is
    W_hh^T @ h ([2048, 512] x [512, 16]), which XLA:CPU runs about 1.6x faster at that size (the weight is the
    large left operand).  Inputs and outputs stay batch-major in both: each step transposes its [B, *] slice
    inside the loop's fused elementwise ops, so no [T, ...] array is copied to change layout.
    """

    def __init__(self, feature_major: bool):
        self.feature_major = feature_major
        self.gate_axis = -3 if feature_major else -2

    def step_in(self, x):
        """A batch-major [B, F] step slice -> this layout."""
        return x.T if self.feature_major else x

    step_out = step_in

    def weight(self, w, *, transpose: bool = False):
        """w (or w^T) prepared, outside the loop, as the operand of :meth:`times` (an in-loop transpose
        becomes a transposed-operand dot, which XLA:CPU runs several times slower)."""
        return w.T if self.feature_major != transpose else w

    def times(self, x, w_prepared):
        """x @ w in row convention (x holds rows of a batch), w prepared by :meth:`weight`."""
        return w_prepared @ x if self.feature_major else x @ w_prepared

    def gates_shape(self, batch: int, hidden: int) -> tuple:
        """The shape of one step's gate activations: [B, 4, H] or [4, H, B]."""
        return (4, hidden, batch) if self.feature_major else (batch, 4, hidden)

    def gate(self, a, k):
        """Gate k of activations [..., 4, H] / [..., 4, H, B]."""
        return jax.lax.index_in_dim(a, k, a.ndim + self.gate_axis, keepdims=False)

    def flat_gates(self, a):
        """[B, 4, H] -> [B, 4H] or [4, H, B] -> [4H, B]."""
        axis = a.ndim + self.gate_axis
        return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


def lstm_scan_fused(xw, w_hh, w_p, h0, c0, feature_major: bool | None = None):
    """Same function as :func:`lstm_scan_reference`, with a hand-written backward pass (see module doc).

    `feature_major` picks the loop layout (`_Layout`); None = by hidden size (FEATURE_MAJOR_MIN_HIDDEN).
    """
    if feature_major is None:
        feature_major = c0.shape[-1] >= FEATURE_MAJOR_MIN_HIDDEN
    return _lstm_scan_fused(xw, w_hh, w_p, h0, c0, bool(feature_major))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lstm_scan_fused(xw, w_hh, w_p, h0, c0, feature_major):
    del feature_major  # the forward function is the same in both layouts
    return lstm_scan_reference(xw, w_hh, w_p, h0, c0)


def _fused_fwd(xw, w_hh, w_p, h0, c0, feature_major):
    lay = _Layout(feature_major)
    w_rec = lay.weight(w_hh)
    w_proj = None if w_p is None else lay.weight(w_p)
    steps = xw.shape[1]

    def body(carry):
        t, h, c, hs, cs, acts = carry
        a = _gate_activations(lay.step_in(_at(xw, t)) + lay.times(h, w_rec), lay.gate_axis)
        c = lay.gate(a, 1) * c + lay.gate(a, 0) * lay.gate(a, 2)
        m = lay.gate(a, 3) * jnp.tanh(c)
        h = m if w_p is None else lay.times(m, w_proj)
        return t + 1, h, c, _put(hs, lay.step_out(h), t), _put(cs, c, t, axis=0), _put(acts, a, t, axis=0)

    h, c = lay.step_in(h0), lay.step_in(c0)
    hs = jnp.zeros(xw.shape[:2] + h0.shape[-1:], xw.dtype)
    cs = jnp.zeros((steps,) + c.shape, c.dtype)                        # time-major, in the loop layout
    acts = jnp.zeros((steps,) + lay.gates_shape(*c0.shape), xw.dtype)
    _, h, c, hs, cs, acts = _loop(body, (0, h, c, hs, cs, acts), steps)
    return (hs, (lay.step_out(h), lay.step_out(c))), (w_hh, w_p, h0, c0, hs, cs, acts)


def _fused_bwd(feature_major, residuals, cotangents):
    """Reverse loop carrying (dh, dc) only; weight gradients as single matmuls after the loop.

    Everything that does not depend on the incoming gradient is computed for all steps at once before the
    loop, so each step is: dh += dh_out; dm = dh (@ W_p^T); dc += dm * o * (1 - tanh(c)^2);
    dgates = [dc, dc, dc, dm] * q_t; dh_prev = dgates @ W_hh^T; dc_prev = dc * f.
    """
    lay = _Layout(feature_major)
    w_hh, w_p, h0, c0, hs, cs, acts = residuals     # hs [B, T, P]; cs, acts time-major in the loop layout
    dhs, (dh_last, dc_last) = cotangents
    i, f, g, o = (lay.gate(acts, k) for k in range(4))
    tanh_c = jnp.tanh(cs)
    c_prev = jnp.concatenate([lay.step_in(c0)[None], cs[:-1]], axis=0)
    dc_dm = o * (1 - tanh_c * tanh_c)                        # d c_t / d m_t, through m = o * tanh(c)
    # d(gate pre-activations) per unit of (dc, dc, dc, dm), in the loop layout
    q = jnp.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)],
                  axis=lay.gate_axis)
    w_rec_t = lay.weight(w_hh, transpose=True)
    w_proj_t = None if w_p is None else lay.weight(w_p, transpose=True)
    steps = hs.shape[1]

    def body(carry):
        n, dh, dc, dgates_all, dh_steps = carry
        t = steps - 1 - n                       # backwards through time
        dh = dh + lay.step_in(_at(dhs, t))      # gradient reaching h_t: from the output and from step t+1
        dm = dh if w_p is None else lay.times(dh, w_proj_t)
        dc = dc + dm * _at(dc_dm, t, axis=0)
        dgates = lay.flat_gates(jnp.stack([dc, dc, dc, dm], axis=lay.gate_axis) * _at(q, t, axis=0))
        dgates_all = _put(dgates_all, lay.step_out(dgates), t)
        if w_p is not None:
            dh_steps = _put(dh_steps, lay.step_out(dh), t, axis=0)
        return n + 1, lay.times(dgates, w_rec_t), dc * _at(f, t, axis=0), dgates_all, dh_steps

    dgates = jnp.zeros(hs.shape[:2] + w_hh.shape[-1:], hs.dtype)                       # [B, T, 4H]
    dh_steps = None if w_p is None else jnp.zeros((steps,) + dh_last.shape, hs.dtype)   # [T, B, P]
    _, dh0, dc0, dgates, dh_steps = _loop(
        body, (0, lay.step_in(dh_last), lay.step_in(dc_last), dgates, dh_steps), steps)
    h_prev = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)                         # [B, T, P]
    dw_hh = layers.weight_gradient(_flat(h_prev), _flat(dgates))
    if w_p is None:
        dw_p = None
    else:
        m = o * tanh_c
        dw_p = jnp.einsum("thb,tbp->hp" if feature_major else "tbh,tbp->hp", m, dh_steps)
    return dgates, dw_hh, dw_p, lay.step_out(dh0), lay.step_out(dc0)


def _loop(body, carry, steps: int):
    """carry = body(carry) `steps` times; carry[0] is the step counter, starting at 0.

    A plain while loop rather than `lax.scan` (the custom VJP never differentiates it): its counter is the
    only per-step scalar work, where a scan over `jnp.arange` added a gather of the step index per step.
    """
    return jax.lax.while_loop(lambda c: c[0] < steps, body, carry)


def _at(x, t, axis: int = 1):
    """x [B, T, F] at step t (0 <= t < T) -> [B, F]; axis=0 for a time-major x."""
    return jax.lax.dynamic_index_in_dim(x, t, axis=axis, keepdims=False, allow_negative_indices=False)


def _put(x, value, t, axis: int = 1):
    """x [B, T, F] with step t (0 <= t < T) set to value [B, F] (in place inside a loop); axis=0 for a
    time-major x."""
    return jax.lax.dynamic_update_index_in_dim(x, value, t, axis=axis, allow_negative_indices=False)


def _flat(x):
    """[B, T, F] -> [B * T, F]: batch-major, so a batch split over devices stays a contiguous split."""
    return x.reshape(-1, x.shape[-1])


_lstm_scan_fused.defvjp(_fused_fwd, _fused_bwd)


def lstm_scan(xw, w_hh, w_p, h0, c0, *, fused: bool = True, feature_major: bool | None = None):
    """LSTM recurrence: the custom-VJP path (`fused=True`, loop layout `feature_major`, None = by size) or
    the autodiff reference. Same shapes."""
    if fused:
        return lstm_scan_fused(xw, w_hh, w_p, h0, c0, feature_major)
    return lstm_scan_reference(xw, w_hh, w_p, h0, c0)


# ----------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------


def lstm_bias_init(key, hidden: int, *, forget_bias: float = 1.0, lstm_init: str = "default",
                   max_len: int = 256) -> jax.Array:
    """Gate bias [4H] (order i, f, g, o).

    "default": b_f = forget_bias (1.0 by default), all other biases 0.  A positive forget bias makes
    the cell start by *remembering* (f = sigmoid(1) ~ 0.73 instead of 0.5), so gradients through c
    do not vanish at the start of training (Gers et al. 2000; Jozefowicz et al. 2015 found it closes
    most of the gap to the GRU).
    "chrono": b_f ~ log(U(1, T_max - 1)), b_i = -b_f, with T_max = max_len (Tallec & Ollivier 2018):
    each unit's forgetting time 1/(1 - sigmoid(b_f)) = 1 + exp(b_f) is then spread uniformly over
    [2, T_max], the range of dependencies the model may need.  `forget_bias` is ignored then.
    """
    zeros = jnp.zeros((hidden,), jnp.float32)
    if lstm_init == "chrono":
        b_f = jnp.log(jax.random.uniform(key, (hidden,), jnp.float32, 1.0, max(max_len - 1.0, 1.0)))
        return jnp.concatenate([-b_f, b_f, zeros, zeros])
    if lstm_init != "default":
        raise ValueError(f"unknown lstm_init={lstm_init!r}; choose from default, chrono")
    return jnp.concatenate([zeros, jnp.full((hidden,), forget_bias, jnp.float32), zeros, zeros])


def _fan_in_uniform(key, shape):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for [in, out] kernels (the PyTorch RNN default)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _orthogonal_blocks(key, rows: int, cols: int, blocks: int):
    """[rows, blocks * cols] made of `blocks` orthogonal [rows, cols] matrices (one per gate)."""
    keys = jax.random.split(key, blocks)
    init = nnx.initializers.orthogonal()
    return jnp.concatenate([init(k, (rows, cols), jnp.float32) for k in keys], axis=1)


# ----------------------------------------------------------------------------------------------------
# Layers (batch-major)
# ----------------------------------------------------------------------------------------------------


class RNNLayer(nnx.Module):
    """Elman tanh RNN layer: x [B, T, in] -> h [B, T, H]; carry h [B, H]."""

    def __init__(self, in_features: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.hidden = hidden
        self.out_features = hidden
        self.dtype = jnp.dtype(dtype)
        self.w_ih = nnx.Param(_fan_in_uniform(rngs.params(), (in_features, hidden)))
        self.w_hh = nnx.Param(nnx.initializers.orthogonal()(rngs.params(), (hidden, hidden), jnp.float32))
        self.b = nnx.Param(jnp.zeros((hidden,), jnp.float32))

    def initial_carry(self, batch_size: int):
        return jnp.zeros((batch_size, self.hidden), self.dtype)

    def project(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> the input projection x @ W_ih + b [..., H], for all time steps at once."""
        return layers.dense(x.astype(self.dtype), self.w_ih[...].astype(self.dtype), self.b[...].astype(self.dtype))

    def recur(self, xw: jax.Array, carry=None):
        """xw [B, T, H] (from :meth:`project`), carry h0 [B, H] or None (zeros) -> (h [B, T, H], h_T)."""
        carry = self.initial_carry(xw.shape[0]) if carry is None else carry.astype(self.dtype)
        return rnn_scan(xw, self.w_hh[...].astype(self.dtype), carry)

    def __call__(self, x: jax.Array, carry=None):
        """x [B, T, in], carry h0 [B, H] or None (zeros) -> (h [B, T, H], h_T)."""
        return self.recur(self.project(x), carry)


class LSTMLayer(nnx.Module):
    """LSTM layer (Hochreiter & Schmidhuber 1997, with forget gate), optionally projected (LSTMP).

    x [B, T, in] -> h [B, T, P] with P = projection (if > 0) else hidden; carry (h [B, P], c [B, H]).
    Parameters: w_ih [in, 4H], w_hh [P, 4H], b [4H] (gates i, f, g, o), w_p [H, P] if projected.
    """

    def __init__(self, in_features: int, hidden: int, projection: int = 0, *, forget_bias: float = 1.0,
                 lstm_init: str = "default", max_len: int = 256, dtype=jnp.float32, fused: bool = True,
                 rngs: nnx.Rngs):
        self.hidden = hidden
        self.out_features = projection if projection > 0 else hidden
        self.dtype = jnp.dtype(dtype)
        self.fused = fused
        self.w_ih = nnx.Param(_fan_in_uniform(rngs.params(), (in_features, 4 * hidden)))
        self.w_hh = nnx.Param(_orthogonal_blocks(rngs.params(), self.out_features, hidden, 4))
        self.b = nnx.Param(lstm_bias_init(rngs.params(), hidden, forget_bias=forget_bias,
                                          lstm_init=lstm_init, max_len=max_len))
        self.w_p = nnx.Param(_fan_in_uniform(rngs.params(), (hidden, projection))) if projection > 0 else None

    def initial_carry(self, batch_size: int):
        return (jnp.zeros((batch_size, self.out_features), self.dtype),
                jnp.zeros((batch_size, self.hidden), self.dtype))

    def project(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> the input projection x @ W_ih + b [..., 4H]: all time steps' gates in one matmul,
        outside the recurrence."""
        dt = self.dtype
        dense = layers.dense_vjp if self.fused else layers.dense   # fused=False keeps forward mode (jvp)
        return dense(x.astype(dt), self.w_ih[...].astype(dt), self.b[...].astype(dt))

    def recur(self, xw: jax.Array, carry=None):
        """xw [B, T, 4H] (from :meth:`project`), carry (h0, c0) or None (zeros) -> (h [B, T, P], (h_T, c_T))."""
        dt = self.dtype
        carry = self.initial_carry(xw.shape[0]) if carry is None else jax.tree.map(lambda a: a.astype(dt), carry)
        w_p = None if self.w_p is None else self.w_p[...].astype(dt)
        return lstm_scan(xw, self.w_hh[...].astype(dt), w_p, *carry, fused=self.fused)

    def __call__(self, x: jax.Array, carry=None):
        """x [B, T, in], carry (h0, c0) or None (zeros) -> (h [B, T, P], (h_T, c_T))."""
        return self.recur(self.project(x), carry)


# ----------------------------------------------------------------------------------------------------
# Language models
# ----------------------------------------------------------------------------------------------------


# Language models called on tokens project the vocabulary instead of the tokens when the call has at least this
# many tokens per vocabulary entry (projects_by_vocabulary).
MIN_TOKENS_PER_VOCABULARY_ENTRY = 4


def projects_by_vocabulary(vocab_size: int, tokens: jax.Array, dropout_rate: float, dropout_key) -> bool:
    """Whether a recurrent LM's first layer should compute its input projection per vocabulary entry.

    Embedding then projecting is a row lookup followed by a matmul, so ``E[tokens] @ W_ih + b ==
    (E @ W_ih + b)[tokens]`` (:func:`vocabulary_projection`): with fewer vocabulary entries than tokens the
    right-hand side is the same function for a fraction of the matmul FLOPs (forward and both gradients:
    [V, d] instead of [B * T, d] rows; the gradient reaches E through a [V, 4H] scatter-add).  Used when
    the call has at least MIN_TOKENS_PER_VOCABULARY_ENTRY tokens per entry (each device of a data-parallel
    run projects the whole vocabulary: with up to that many devices, no more rows than its own tokens), as
    in a character model's training batches but not one-token generation steps or most BPE vocabularies,
    and not under embedding dropout (which acts between the lookup and the matmul).
    """
    dropout = dropout_rate > 0.0 and dropout_key is not None
    return not dropout and vocab_size * MIN_TOKENS_PER_VOCABULARY_ENTRY <= tokens.size


def vocabulary_projection(layer, embedding: layers.Embed, tokens: jax.Array) -> jax.Array:
    """``layer.project(embedding(tokens))`` computed as ``layer.project(E)[tokens]``: [B, T, 4H] (or [B, T, H]).

    The rows are gathered in float32, so that the gradient's scatter-add sums each entry's many tokens in
    float32 whatever the compute dtype (in bfloat16, W_ih's gradient was otherwise 12% off the float32 model's).
    """
    per_entry = layer.project(embedding.table())
    return jnp.take(per_entry.astype(jnp.float32), tokens, axis=0).astype(per_entry.dtype)


class RNNLM(nnx.Module):
    """Stacked Elman RNN language model (the vanishing-gradient baseline).

    embedding [V, d_model] -> num_layers recurrent layers (hidden_size) -> [projection to d_model if the
    top layer's width differs] -> logits = h @ E^T + bias (weights tied to the embedding, Press & Wolf
    2017).  Dropout (rate cfg.dropout) on the non-recurrent connections only (Zaremba et al. 2014): the
    embedding output, between layers and on the top layer's output.  Called on tokens, the first layer's
    input projection is computed per vocabulary entry where that is cheaper (:meth:`projects_by_vocabulary`).

    `cfg.projection_size` applies to LSTMLM only; `cfg.remat` is ignored (the recurrence stores only
    per-step activations).
    """

    def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs, fused: bool = True):
        self.dtype = layers.compute_dtype(cfg)
        self.dropout_rate = float(cfg.dropout)
        self.embedding = layers.Embed(vocab_size, cfg.d_model, dtype=self.dtype, rngs=rngs,
                                      std=layers.embedding_std(cfg, recurrent=True))
        stack = []
        width = cfg.d_model
        for _ in range(cfg.num_layers):
            stack.append(self._make_layer(cfg, width, rngs=rngs, fused=fused))
            width = stack[-1].out_features
        self.layers = nnx.List(stack)
        self.out_proj = (nnx.Param(_fan_in_uniform(rngs.params(), (width, cfg.d_model)))
                         if width != cfg.d_model else None)
        self.logit_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))

    def _make_layer(self, cfg, in_features, *, rngs, fused):
        del fused  # only the LSTM has a fused path
        return RNNLayer(in_features, cfg.hidden_size, dtype=self.dtype, rngs=rngs)

    def initial_carry(self, batch_size: int):
        """Zeros, one entry per layer: h [B, H] (RNN) or (h [B, P], c [B, H]) (LSTM)."""
        return tuple(layer.initial_carry(batch_size) for layer in self.layers)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> embeddings [B, T, d_model] (compute dtype)."""
        return self.embedding(tokens)

    def _stack(self, x, carry, dropout_key, *, first_projection=None):
        """x [B, T, d] -> (list of per-layer outputs [B, T, *], new carry, top output).

        `first_projection`: the first layer's input projection of x, already computed (x is then unused).
        """
        keys = layers.split_keys(dropout_key, len(self.layers) + 1)
        batch = (x if first_projection is None else first_projection).shape[0]
        carry = self.initial_carry(batch) if carry is None else carry
        h = x
        outputs, new_carry = [], []
        for i, (layer, layer_carry, key) in enumerate(zip(self.layers, carry, keys)):
            if i == 0 and first_projection is not None:
                h, c = layer.recur(first_projection, layer_carry)
            else:
                h, c = layer(layers.dropout(h, self.dropout_rate, key), layer_carry)
            outputs.append(h)
            new_carry.append(c)
        top = layers.dropout(h, self.dropout_rate, keys[-1])
        return outputs, tuple(new_carry), top

    def _logits(self, top, positions=None):
        """Top layer output [B, T, *] -> logits [B, T, V] float32 (tied to the embedding); [B, K, V] at positions."""
        top = layers.at_positions(top, positions)
        if self.out_proj is not None:
            top = top @ self.out_proj[...].astype(self.dtype)
        logits = self.embedding.attend(top)
        logits = logits + self.logit_bias[...].astype(self.dtype)
        return logits.astype(jnp.float32)

    def forward_from_embeddings(self, x, carry=None, *, mask=None, dropout_key=None, positions=None):
        """x [B, T, d_model] (e.g. from :meth:`embed`) -> (logits [B, T, V] float32, new carry).

        `mask` is accepted for the common interface and unused: the model is causal, so outputs at real
        tokens never depend on later padding (the returned carry is the state after the last position).
        positions: int [B, K] or None: logits at only these positions ([B, K, V]).
        """
        del mask
        _, new_carry, top = self._stack(x, carry, dropout_key)
        return self._logits(top, positions), new_carry

    def projects_by_vocabulary(self, tokens: jax.Array, dropout_key=None) -> bool:
        """Whether :meth:`__call__` computes the first layer's input projection per vocabulary entry
        (module function :func:`projects_by_vocabulary`)."""
        return projects_by_vocabulary(self.embedding.embedding.shape[0], tokens, self.dropout_rate, dropout_key)

    def __call__(self, tokens, carry=None, *, mask=None, dropout_key=None, positions=None):
        """tokens int [B, T] -> (logits [B, T, V] float32, new carry); carry None = zeros.

        Same function as ``forward_from_embeddings(embed(tokens))``; see :meth:`projects_by_vocabulary`.
        positions: int [B, K] or None: logits at only these positions ([B, K, V]).
        """
        if not self.projects_by_vocabulary(tokens, dropout_key):
            return self.forward_from_embeddings(self.embed(tokens), carry, mask=mask, dropout_key=dropout_key,
                                                positions=positions)
        first_projection = vocabulary_projection(self.layers[0], self.embedding, tokens)
        _, new_carry, top = self._stack(None, carry, dropout_key, first_projection=first_projection)
        return self._logits(top, positions), new_carry

    def step(self, token: jax.Array, carry=None):
        """One token per row, O(1) work: token int [B] -> (logits [B, V] float32, new carry)."""
        logits, carry = self(token[:, None], carry)
        return logits[:, 0], carry

    def hidden_states(self, tokens, *, mask=None, carry=None):
        """Contextual features: [embedding output [B, T, d], layer 1 output [B, T, *], ...] (no dropout)."""
        del mask
        x = self.embed(tokens)
        outputs, _, _ = self._stack(x, carry, None)
        return [x] + outputs


class LSTMLM(RNNLM):
    """Stacked LSTM language model (Zaremba et al. 2014), optionally with projected layers (LSTMP).

    Same structure as :class:`RNNLM`; each layer is an :class:`LSTMLayer` with hidden cfg.hidden_size,
    projection cfg.projection_size (0 = none), forget-gate bias cfg.forget_bias or the chrono init
    (cfg.lstm_init, T_max = cfg.max_len).  `fused=False` selects the autodiff reference recurrence.
    """

    def _make_layer(self, cfg, in_features, *, rngs, fused):
        return LSTMLayer(in_features, cfg.hidden_size, cfg.projection_size, forget_bias=cfg.forget_bias,
                         lstm_init=cfg.lstm_init, max_len=cfg.max_len, dtype=self.dtype, fused=fused, rngs=rngs)


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------


def layer_matmul_flops(kind: str, in_features: int, hidden: int, projection: int = 0) -> int:
    """Forward matmul FLOPs per token of one recurrent layer (2 per multiply-add; gate math not counted)."""
    if kind == "rnn":
        return 2 * (in_features * hidden + hidden * hidden)
    out = projection if projection > 0 else hidden
    return 2 * (in_features * 4 * hidden + out * 4 * hidden + (hidden * projection if projection > 0 else 0))


def flops_per_token(cfg, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of RNNLM / LSTMLM: 3x the forward matmul FLOPs (forward + backward).

    Forward = sum over layers of 2 * (input matmul + recurrent matmul + projection), plus the output
    projection to d_model if present and the tied output layer 2 * d_model * V.  `seq_len` does not
    enter (no attention); it is in the signature for the common interface.
    """
    del seq_len
    kind = "rnn" if cfg.name == "rnn" else "lstm"
    projection = 0 if kind == "rnn" else cfg.projection_size
    total, width = 0, cfg.d_model
    for _ in range(cfg.num_layers):
        total += layer_matmul_flops(kind, width, cfg.hidden_size, projection)
        width = projection if projection > 0 else cfg.hidden_size
    if width != cfg.d_model:
        total += 2 * width * cfg.d_model
    total += 2 * cfg.d_model * vocab_size
    return float(3 * total)
