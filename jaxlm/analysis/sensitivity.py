"""Gradient sensitivity: how strongly a prediction depends on each input embedding (Graves 2008, 2012).

S[T, t] = mean over sequences of || d log p(x* | context) / d e_t ||_2, the norm taken over the embedding
dimension of e_t (token + position embedding at input position t).  What T and x* are depends on how the
model predicts (``jaxlm.analysis.apply.model_kind``):

============== ==================================================== ===================================
kind           row T scores                                         distance d = T - t
============== ==================================================== ===================================
causal         log p(tokens[T + 1]) at output position T            d >= 0 (S = 0 exactly for t > T);
               (rnn, lstm, gpt)                                     d = 0 is the current input token
masked (bert)  log p(tokens[T]) with position T replaced by [MASK]  both signs; d = 0 is the [MASK]
bidirectional  log p_fwd(tokens[T]) from forward output T - 1 plus  both signs; S[T, T] = 0 (neither
(elmo)         log p_bwd(tokens[T]) from backward output T + 1      direction sees x_T); at T = 0 /
               (``direction`` picks one of the two)                 T = L - 1 only one side exists
============== ==================================================== ===================================

For a vanishing-gradient network S decays exponentially in d (Hochreiter 1991; Bengio et al. 1994);
Graves (2012, fig. 4.1/4.3) plots it as a heat map over inputs x outputs, and the decay against distance
is what :func:`sensitivity_by_distance` extracts.

Cost: causal and bidirectional models need ONE forward pass per batch of sequences and one vector-Jacobian
product per target position (vmapped over positions, ``target_chunk`` at a time); masked models need a
forward and backward pass per target position (the [MASK] moves).  All positions of 256 sequences of 128
tokens is ~127 backward passes over the batch; pass ``target_positions=[L - 2]`` for the last only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.analysis import apply

DIRECTIONS = ("both", "forward", "backward")


def default_positions(kind: str, length: int) -> np.ndarray:
    """Rows computed by default: every position with something to score (causal: all but the last)."""
    return np.arange(length - 1 if kind == "causal" else length)


def _check_positions(positions: np.ndarray, kind: str, length: int, direction: str) -> None:
    high = length - 2 if kind == "causal" else length - 1
    if positions.ndim != 1 or positions.size == 0 or positions.min() < 0 or positions.max() > high:
        raise ValueError(f"target_positions must be a non-empty list of positions in [0, {high}] for a {kind} "
                         f"model on {length} tokens, got {positions.tolist()}")
    if kind == "bidirectional" and direction == "forward" and positions.min() < 1:
        raise ValueError("the forward direction cannot score position 0 (nothing to its left)")
    if kind == "bidirectional" and direction == "backward" and positions.max() > length - 2:
        raise ValueError(f"the backward direction cannot score position {length - 1} (nothing to its right)")


def _gather_logp(logits, index, targets):
    """log_softmax(logits)[b, index[p], targets[b, p]] -> [B, P] (float32)."""
    logp = jax.nn.log_softmax(jnp.take(logits, index, axis=1).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _position_scores(out, tokens, positions, kind: str, direction: str):
    """[B, P] log-probabilities each row T of S differentiates (see the module table)."""
    length = tokens.shape[1]
    if kind == "causal":
        return _gather_logp(out, positions, jnp.take(tokens, positions + 1, axis=1))
    fwd, bwd = out
    targets = jnp.take(tokens, positions, axis=1)
    score = jnp.zeros(targets.shape, jnp.float32)
    if direction in ("both", "forward"):
        ok = (positions >= 1).astype(jnp.float32)
        score = score + ok * _gather_logp(fwd, jnp.clip(positions - 1, 0, length - 1), targets)
    if direction in ("both", "backward"):
        ok = (positions <= length - 2).astype(jnp.float32)
        score = score + ok * _gather_logp(bwd, jnp.clip(positions + 1, 0, length - 1), targets)
    return score


def _norms(grad, row_weight, per_row: bool):
    """grad [B, L, d] -> ||grad[b, t]||_2 with padding rows (weight 0) zeroed: per row [B, L], or summed over
    the rows [L] (float32)."""
    norms = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)), axis=-1))
    return norms * row_weight[:, None] if per_row else jnp.einsum("bl,b->l", norms, row_weight)


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "direction", "chunk", "per_row"))
def _single_pass_sums(graphdef, params, tokens, positions, row_weight, *, kind, direction, chunk, per_row):
    """Causal / bidirectional: one forward pass, one VJP per target position. -> [P, L] summed over the rows
    (per_row: [P, B, L])."""
    x = nnx.merge(graphdef, params).embed(tokens)

    def scores(x):
        out = apply.logits_from_embeddings(nnx.merge(graphdef, params), x)
        return _position_scores(out, tokens, positions, kind, direction)

    s, vjp = jax.vjp(scores, x)

    def one(i):
        (grad,) = vjp(jnp.zeros_like(s).at[:, i].set(1.0))
        return _norms(grad, row_weight, per_row)

    return jax.lax.map(one, jnp.arange(positions.shape[0]), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "mask_id", "chunk", "per_row"))
def _masked_sums(graphdef, params, tokens, positions, row_weight, *, mask_id, chunk, per_row):
    """Masked LM: per target position, mask it, forward, backward. -> [P, L] summed over the rows
    (per_row: [P, B, L])."""
    def one(p):
        target = jnp.take(tokens, p, axis=1)
        x = nnx.merge(graphdef, params).embed(tokens.at[:, p].set(mask_id))

        def score(x):   # the output layer only at p
            at_p = jnp.full((x.shape[0], 1), p, jnp.int32)
            logits = apply.logits_from_embeddings(nnx.merge(graphdef, params), x, at_p)
            return jnp.sum(_gather_logp(logits, jnp.zeros((1,), jnp.int32), target[:, None])[:, 0])

        return _norms(jax.grad(score)(x), row_weight, per_row)

    return jax.lax.map(one, positions, batch_size=chunk)


def gradient_sensitivity(graphdef, params, tokens, *, target_positions=None, objective: str | None = None,
                         mask_id: int | None = None, direction: str = "both", batch_size: int = 32,
                         target_chunk: int = 16, per_sequence: bool = False) -> np.ndarray:
    """S[i, t] = mean over sequences of ||d score(target_positions[i]) / d e_t||, see the module table.

    Args:
      graphdef, params: the model (``nnx.split(model, nnx.Param)``), run without dropout from a zero state.
      tokens: int [B, L] sequences (e.g. validation windows); the scored tokens are taken from them.
      target_positions: rows T to compute (default :func:`default_positions`: every scorable position, so
        row i is position i).
      objective: "causal_lm" | "masked_lm" | "bidirectional_lm" to override the kind inferred from the model.
      mask_id: the tokenizer's [MASK] id (required for masked models).
      direction: bidirectional models only: "both" (the ELMo joint log-likelihood), "forward", "backward".
      batch_size: sequences per device call; target_chunk: target positions vmapped together (memory knob:
        a call holds target_chunk x batch_size x L x d gradient floats).
      per_sequence: return every sequence's own S instead of their mean (for error bars over sequences).
    Returns:
      float64 [len(target_positions), L] (per_sequence: [B, len(target_positions), L]).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    kind = apply.kind_of(graphdef, params, objective)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose from {', '.join(DIRECTIONS)}")
    if kind == "masked" and mask_id is None:
        raise ValueError("a masked model needs mask_id (tokenizer.mask_id) to mask the target position")
    num, length = tokens.shape
    positions = (default_positions(kind, length) if target_positions is None
                 else np.asarray(target_positions, np.int32).reshape(-1))
    _check_positions(positions, kind, length, direction)
    if kind == "masked":
        fn = functools.partial(_masked_sums, graphdef, mask_id=int(mask_id), chunk=target_chunk,
                               per_row=per_sequence)
    else:
        fn = functools.partial(_single_pass_sums, graphdef, kind=kind, direction=direction, chunk=target_chunk,
                               per_row=per_sequence)
    batch_size = min(batch_size, num)
    total, each = np.zeros((len(positions), length), np.float64), []
    for start in range(0, num, batch_size):
        rows = tokens[start:start + batch_size]
        real = len(rows)
        weight = np.ones(batch_size, np.float32)
        if real < batch_size:  # pad the last call to the same shape (no recompilation), weight 0
            weight[real:] = 0.0
            rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - real, axis=0)])
        out = np.asarray(fn(params, jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(weight)), np.float64)
        if per_sequence:   # [P, B, L]: the real rows, sequence-major
            each.append(out[:, :real].transpose(1, 0, 2))
        else:
            total += out
    return np.concatenate(each) if per_sequence else total / num


def sensitivity_by_distance(sensitivity, *, target_positions=None, bidirectional: bool = False):
    """Fold S over the distance d = T - t (the curve of Graves' figure, plotted log-log).

    Args:
      sensitivity: [P, L] from :func:`gradient_sensitivity`.
      target_positions: the position T of each row (default row i = position i, as by default).
      bidirectional: keep negative d (inputs after T: bert, elmo); False keeps d >= 0 only.
    Returns:
      (distances int [K], mean float64 [K], std float64 [K]): mean and standard deviation over the
      (T, t) pairs at each distance (each entry already averaged over sequences).
    """
    s = np.asarray(sensitivity, np.float64)
    rows = np.arange(s.shape[0]) if target_positions is None else np.asarray(target_positions).reshape(-1)
    d = rows[:, None] - np.arange(s.shape[1])[None, :]
    keep = np.ones_like(d, bool) if bidirectional else d >= 0
    d, v = d[keep], s[keep]
    distances, index = np.unique(d, return_inverse=True)
    count = np.bincount(index)
    mean = np.bincount(index, weights=v) / count
    var = np.maximum(np.bincount(index, weights=v * v) / count - mean**2, 0.0)
    return distances, mean, np.sqrt(var)


def ratio_stderr(per_sequence: np.ndarray, reference: int) -> np.ndarray:
    """Jackknife standard error over sequences of mean(a[:, k]) / mean(a[:, reference]), for each column k.

    per_sequence: [N, K], one row per sequence (e.g. each sequence's S by distance); N >= 2.  Leaving one
    sequence out at a time gives N ratios R_i; the error is sqrt((N - 1) / N * sum (R_i - mean R_i)^2)
    (Efron & Stein 1981), which needs no assumption about how a ratio of means is distributed.
    """
    a = np.asarray(per_sequence, np.float64)
    n = a.shape[0]
    if n < 2:
        return np.zeros(a.shape[1])
    rest = (a.sum(axis=0, keepdims=True) - a) / (n - 1)          # [N, K]: means without sequence i
    ratios = rest / rest[:, reference:reference + 1]
    return np.sqrt((n - 1) / n * np.sum((ratios - ratios.mean(axis=0)) ** 2, axis=0))


def relative_sensitivity(distances, mean, *, reference: int = 1) -> np.ndarray:
    """mean / mean at d = reference (the S(d)/S(1) ratio used to compare models of different scale)."""
    distances = np.asarray(distances)
    if reference not in distances:
        raise ValueError(f"reference distance {reference} is not among the distances")
    return np.asarray(mean) / np.asarray(mean)[distances == reference][0]
