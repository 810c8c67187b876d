"""Training objectives as pure math on logits: causal LM, masked LM (BERT), bidirectional LM (ELMo).

Every loss returns float32 scalars ``(loss_sum, count, correct_sum)`` rather than a mean: summing the
three over devices / micro-batches and dividing once keeps the mean exact however the batch is split.
Cross-entropy is in nats, a float32 log-softmax (logsumexp - target logit) whatever the logits' dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# A row selects more than max_selected(T, p) positions for masked-LM with at most this probability.
SELECTION_CAP_TAIL = 1e-9


def _weighted_ce(logits, targets, weights):
    """(sum_i w_i * -log p(target_i), sum_i w_i, sum_i w_i * [target_i is an argmax]), all float32.

    The log-softmax is evaluated only at the target, -log p(t) = logsumexp(x) - x[t] (float32,
    max-subtracted inside logsumexp): the same value as ``-log_softmax(x)[t]`` without materialising a
    second [B, T, V] array; with the argmax replaced by ``x[t] >= max(x)`` this is 3.5-4x faster
    forward+backward on CPU at V = 256..8192 (exact ties, which argmax would break by index, count as correct).
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), jnp.sum(correct * w)


def causal_lm_loss(logits, targets, weights=None):
    """Next-token cross-entropy.

    Args:
      logits: [B, T, V] (position t scores the token that follows it).
      targets: int [B, T] (the next tokens, i.e. the input shifted left by one).
      weights: [B, T] float or bool, which positions count (None = all).
    Returns:
      (loss_sum, count, correct_sum) float32 scalars; mean loss = loss_sum / count.
    """
    return _weighted_ce(logits, targets, weights)


def masked_lm_loss(logits, targets, selected):
    """BERT masked-LM cross-entropy over exactly the selected positions.

    Args:
      logits: [B, T, V] from the encoder run on the corrupted inputs (or [B, K, V] at gathered positions).
      targets: int [B, T], the ORIGINAL tokens (or [B, K] at those positions).
      selected: bool [B, T] from :func:`mask_tokens` (True = position was selected for prediction; or the
        `real` slots of :func:`selected_positions`).
    Returns:
      (loss_sum, count, correct_sum) float32 scalars.
    """
    return _weighted_ce(logits, targets, selected)


def max_selected(length: int, mask_prob: float, tail: float = SELECTION_CAP_TAIL) -> int:
    """The smallest K with P(Binomial(length, mask_prob) > K) <= tail: a per-row cap on masked-LM selections.

    Like BERT's max_predictions_per_seq it gives the prediction positions a static count (so the MLM head
    runs at K positions instead of `length`), but set in the binomial tail, so it practically never binds.
    """
    if mask_prob <= 0.0:
        return 0
    if mask_prob >= 1.0:
        return length
    log_p, log_q = math.log(mask_prob), math.log1p(-mask_prob)
    log_pmf = [math.lgamma(length + 1) - math.lgamma(k + 1) - math.lgamma(length - k + 1) + k * log_p
               + (length - k) * log_q for k in range(length + 1)]
    above = 0.0   # P(X > k), summed from the top so small terms are not lost
    for k in range(length, -1, -1):
        if above > tail:
            return k + 1
        above += math.exp(log_pmf[k])
    return 0


def selected_positions(selected, count: int):
    """bool [B, T] with at most `count` True per row -> (positions int32 [B, count], real bool [B, count]).

    Each row's selected positions in increasing order, then padding slots (real False) pointing at unselected
    positions; gathering a [B, T, ...] array at `positions` and weighting by `real` keeps exactly the selection.
    """
    positions = jnp.argsort(~selected, axis=1, stable=True)[:, :count].astype(jnp.int32)
    return positions, jnp.take_along_axis(selected, positions, axis=1)


def _unit_interval(bits):
    """uint32 random bits -> float32 uniform on [0, 1) in steps of 2^-23 (as jax.random.uniform makes them)."""
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def mask_tokens(tokens, rng, *, mask_prob: float, mask_id: int, vocab_size: int, special_ids, valid=None,
                max_per_row: int | None = None):
    """BERT corruption (Devlin et al. 2019, section 3.1 / appendix A.1).

    Each eligible token (real, i.e. `valid`, and not a special token) is selected independently with
    probability `mask_prob` (a per-token Bernoulli, so the number selected varies around mask_prob * N).
    Of the selected: 80% become `mask_id`, 10% a token drawn uniformly from the NON-special vocabulary
    (possibly the original token, as in BERT), 10% are left unchanged.  Unselected tokens never change.
    With `max_per_row` (see :func:`max_selected`) a row keeps only its first max_per_row selections.

    Args:
      tokens: int [B, T] original tokens.
      rng: PRNG key; the result is a deterministic function of (tokens, rng).
      mask_prob: selection probability, e.g. 0.15.
      mask_id: the [MASK] id.
      vocab_size: vocabulary size including specials.
      special_ids: ids never selected and never drawn as random replacements (static sequence of ints).
      valid: bool [B, T], True = real token (False = padding), or None for all real.
      max_per_row: at most this many selected positions per row (None = no cap).
    Returns:
      (inputs int32 [B, T], selected bool [B, T]).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    special = np.asarray(sorted(set(int(s) for s in special_ids)), np.int32)
    ordinary = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), special)  # static, built at trace time
    if ordinary.size == 0:
        raise ValueError(f"vocab_size={vocab_size} has no non-special token to draw random replacements from")
    eligible = ~jnp.isin(tokens, jnp.asarray(special)) if special.size else jnp.ones(tokens.shape, bool)
    if valid is not None:
        eligible = eligible & jnp.asarray(valid, bool)
    # one draw of random bits for all three decisions: each draw is a threefry kernel, and three draws (randint
    # takes two) cost ~0.5 s more compile than one on a 2-core CPU
    bits = jax.random.bits(rng, (3, *tokens.shape), jnp.uint32)
    selected = (_unit_interval(bits[0]) < mask_prob) & eligible
    if max_per_row is not None:
        selected = selected & (jnp.cumsum(selected, axis=1) <= max_per_row)
    u = _unit_interval(bits[1])
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    random_tokens = jnp.asarray(ordinary)[(bits[2] % ordinary.size).astype(jnp.int32)]   # modulo bias < V / 2^32
    inputs = jnp.where(to_mask, jnp.int32(mask_id), jnp.where(to_random, random_tokens, tokens))
    return inputs, selected


def bidirectional_lm_loss(fwd_logits, bwd_logits, tokens, mask=None):
    """ELMo biLM loss (Peters et al. 2018): forward next-token plus backward previous-token cross-entropy.

    Forward logits at t predict tokens[t+1]; backward logits at t predict tokens[t-1].  A pair counts
    only if both positions are real (mask True), so padding is never a target nor a context of one.

    Args:
      fwd_logits, bwd_logits: [B, T, V].
      tokens: int [B, T].
      mask: bool [B, T] (True = real) or None for all real.
    Returns:
      {"forward": (loss_sum, count, correct_sum), "backward": (loss_sum, count, correct_sum)}, float32.
    """
    real = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    pair = real[:, :-1] & real[:, 1:]  # pair (t, t+1) both real
    return {
        "forward": _weighted_ce(fwd_logits[:, :-1], tokens[:, 1:], pair),
        "backward": _weighted_ce(bwd_logits[:, 1:], tokens[:, :-1], pair),
    }
