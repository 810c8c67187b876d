"""Context ablation: how much of its context a trained model uses (Khandelwal et al. 2018, "Sharp Nearby,
Fuzzy Far Away: How Neural Language Models Use Context").

Each window w [L + 1] gives one target, its LAST token w[L], and a context of L tokens w[:L].  For each
distance d, the context FARTHER than d tokens from the target (w[:L - d]) is perturbed and the loss
-log p(w[L] | perturbed context) is measured:

- ``drop``: the far context is removed; the model reads only the last d tokens (transformers: a truncated
  input; recurrent models: run from the zero state on the last d tokens, which is the same computation).
- ``shuffle``: the far tokens are permuted (independently in each window): word order beyond d destroyed,
  word identity kept.
- ``random``: the far tokens are replaced by tokens drawn uniformly from the non-special vocabulary.
- ``mask`` (transformers only): the far tokens stay where they are but are hidden from attention (a key mask
  in every layer), so the target keeps its position.  ``drop`` moves a transformer's target to position
  d - 1, so with learned absolute positions its curve mixes how the loss depends on position into how it
  depends on context; ``mask`` holds the position fixed (and shows the model a pattern it never trained on:
  a late position with few visible keys).  Recurrent models have no positions: for them ``drop`` is clean.

A distance d >= L perturbs nothing, so its loss IS the full-context loss (computed identically, bit for bit).
How the target is predicted: causal models (rnn, lstm, gpt) from the output at the last context position;
bert from a [MASK] appended after the context (so the input is L + 1 tokens: pass windows that fit
model.max_len); elmo from its forward direction (the backward one has nothing to the right of the target).

:func:`effective_context` is the smallest d whose loss is within a relative tolerance of the BEST loss over
all d: an undertrained model can be worse with its full context than with a shorter one, so "within 1% of
full context" would be the wrong reference.  :func:`paired_increase` gives each d's loss change against the full
context with a paired standard error (the same windows at every d).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.analysis import apply
from jaxlm.models import transformer

MODES = ("drop", "shuffle", "random")        # every model
TRANSFORMER_MODES = ("mask",)                # models whose attention takes a key mask (jaxlm.models.transformer)


def distance_grid(length: int, *, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to and including ``length`` (a log grid for the ablation curves)."""
    grid, d = [], max(1, start)
    while d < length:
        grid.append(d)
        d *= 2
    return grid + [length]


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "mask_id"))
def _losses(graphdef, params, contexts, targets, visible=None, *, kind, mask_id):
    """-log p(target | context) [B] for contexts int [B, c] (target predicted after the last context token);
    visible: int scalar or None: a transformer sees only the last `visible` context tokens (key mask)."""
    model = nnx.merge(graphdef, params)
    length = contexts.shape[1]
    if kind == "masked":
        contexts = jnp.concatenate([contexts, jnp.full((contexts.shape[0], 1), mask_id, contexts.dtype)], axis=1)
    last = jnp.full((contexts.shape[0], 1), contexts.shape[1] - 1, jnp.int32)   # the output layer only there
    if visible is None:
        out = apply.logits(model, contexts, last)
    else:   # bert's appended [MASK] (position `length`) stays visible
        keys = jnp.broadcast_to(jnp.arange(contexts.shape[1]) >= length - visible, contexts.shape)
        out = apply.split_output(model(contexts, mask=keys, positions=last))
    out = apply.predicting_logits(out, kind)
    logp = jax.nn.log_softmax(out[:, 0].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def default_batch_size(context_len: int, vocab_size: int) -> int:
    """Windows per device call: up to 1024 (fewer, larger calls: recurrent scans pay per time step, not per row),
    capped so the [B, c, V] logits plus [B, 8 heads, c, c] attention scores stay within ~256 MB of float32."""
    per_window = context_len * (vocab_size + 8 * context_len)
    return int(max(16, min(1024, (1 << 26) // max(per_window, 1))))


def last_token_losses(graphdef, params, contexts, targets, *, kind: str, mask_id: int | None = None,
                      batch_size: int = 256, visible: int | None = None) -> np.ndarray:
    """Per-window loss [N] (float64) of predicting ``targets`` [N] after ``contexts`` [N, c], in fixed-size calls;
    visible: a transformer attends to the last `visible` context tokens only (None: all)."""
    contexts, targets = np.asarray(contexts, np.int32), np.asarray(targets, np.int32)
    num = len(contexts)
    batch_size = min(batch_size, num)
    fn = functools.partial(_losses, graphdef, kind=kind, mask_id=None if mask_id is None else int(mask_id))
    shown = None if visible is None else jnp.int32(visible)   # traced: one compile for every d
    out = []
    for start in range(0, num, batch_size):
        c, t = contexts[start:start + batch_size], targets[start:start + batch_size]
        real = len(c)
        if real < batch_size:  # same shape as the other calls: no recompilation
            c = np.concatenate([c, np.repeat(c[:1], batch_size - real, axis=0)])
            t = np.concatenate([t, np.repeat(t[:1], batch_size - real)])
        out.append(np.asarray(fn(params, jnp.asarray(c), jnp.asarray(t), shown))[:real])
    return np.concatenate(out).astype(np.float64)


def perturb(contexts: np.ndarray, distance: int, mode: str, rng: np.random.Generator, *,
            replacement_ids: np.ndarray | None = None) -> np.ndarray:
    """The contexts [N, L] with everything farther than ``distance`` from the target dropped/shuffled/randomised.

    ``drop`` returns [N, min(distance, L)]; the other modes keep the shape.  distance >= L returns the input.
    """
    length = contexts.shape[1]
    if distance >= length:
        return contexts
    far, near = contexts[:, :length - distance], contexts[:, length - distance:]
    if mode == "drop":
        return near
    if mode == "shuffle":
        far = rng.permuted(far, axis=1)
    elif mode == "random":
        far = rng.choice(replacement_ids, size=far.shape).astype(contexts.dtype)
    else:
        raise ValueError(f"mode={mode!r}; choose from {', '.join(MODES)}")
    return np.concatenate([far, near], axis=1)


def context_ablation_losses(graphdef, params, windows, *, distances, mode: str = "drop", objective: str | None = None,
                            tokenizer=None, vocab_size: int | None = None, special_ids=(), mask_id: int | None = None,
                            batch_size: int | None = None, seed: int = 0) -> dict[int, np.ndarray]:
    """Per-window losses {d: float64 [N]} (same windows for every d, so differences between d are paired)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, L + 1] with L >= 1, got shape {windows.shape}")
    if mode not in MODES + TRANSFORMER_MODES:
        raise ValueError(f"mode={mode!r}; choose from {', '.join(MODES + TRANSFORMER_MODES)}")
    if mode in TRANSFORMER_MODES and not is_transformer(graphdef, params):
        raise ValueError(f"mode={mode!r} hides tokens from attention: it needs a transformer (gpt, bert); "
                         "recurrent models have no positions to keep, use 'drop'")
    if any(int(d) < 1 for d in distances):
        raise ValueError(f"distances must be >= 1 (a prediction needs some context), got {list(distances)}")
    if tokenizer is not None:
        vocab_size, special_ids, mask_id = tokenizer.vocab_size, tokenizer.special_ids, tokenizer.mask_id
    kind = apply.kind_of(graphdef, params, objective)
    if kind == "masked" and mask_id is None:
        raise ValueError("a masked model needs mask_id (or tokenizer) to mask the target")
    replacement_ids = None
    if mode == "random":
        if vocab_size is None:
            raise ValueError("mode='random' needs vocab_size (or tokenizer) to draw replacement tokens")
        replacement_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, np.int64))
    contexts, targets = windows[:, :-1], windows[:, -1]
    length = contexts.shape[1]
    if batch_size is None:
        batch_size = default_batch_size(length, vocab_size or int(np.max(windows)) + 1)
    cache: dict[int, np.ndarray] = {}
    results = {}
    for d in distances:
        key = min(int(d), length)  # every d >= L is the unperturbed full context: computed once
        if key not in cache:
            rng = np.random.default_rng([seed, key])
            if mode == "mask":   # the whole context, its far part hidden from attention (none at d >= L)
                perturbed, visible = contexts, (key if key < length else None)
            else:
                perturbed, visible = perturb(contexts, key, mode, rng, replacement_ids=replacement_ids), None
            cache[key] = last_token_losses(graphdef, params, perturbed, targets, kind=kind, mask_id=mask_id,
                                           batch_size=batch_size, visible=visible)
        results[int(d)] = cache[key]
    return results


def is_transformer(graphdef, params) -> bool:
    """Whether the model's attention takes a key mask (the ``mask`` mode's requirement)."""
    return isinstance(nnx.merge(graphdef, params), transformer.Transformer)


def summarize(losses: dict[int, np.ndarray]) -> dict[int, tuple[float, float]]:
    """{d: per-window losses} -> {d: (mean, standard error of the mean)}."""
    out = {}
    for d, v in losses.items():
        stderr = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        out[int(d)] = (float(np.mean(v)), stderr)
    return out


def paired_increase(losses: dict[int, np.ndarray], reference: int) -> dict[int, tuple[float, float]]:
    """{d: per-window losses} -> {d: (mean of loss_d - loss_reference, its standard error)} over the same windows.

    Every d scores the same windows, so a window's own difficulty cancels in the difference: its standard error
    is the one to read a change of loss by (the per-d errors of :func:`summarize` include that difficulty, and
    are several times larger where windows vary more than the effect of the context does).
    """
    ref = np.asarray(losses[int(reference)], np.float64)
    return summarize({d: np.asarray(v, np.float64) - ref for d, v in losses.items()})


def context_ablation(graphdef, params, windows, *, distances, mode: str = "drop", objective: str | None = None,
                     tokenizer=None, vocab_size: int | None = None, special_ids=(), mask_id: int | None = None,
                     batch_size: int | None = None, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Loss at the last token of each window with the context beyond d perturbed: {d: (mean loss, stderr)}.

    Args:
      graphdef, params: the model; objective overrides the kind inferred from it ("causal_lm", ...).
      windows: int [N, L + 1] (e.g. validation windows); the last token of each is the target.
      distances: ints >= 1 (see :func:`distance_grid`); every d >= L gives the full-context loss.
      mode: "drop" | "shuffle" | "random" (module doc).
      tokenizer: supplies vocab_size, special_ids and mask_id (or pass them): "random" draws from the
        non-special ids; bert needs mask_id.
      batch_size: windows per device call (None: :func:`default_batch_size`); seed: the shuffles and random
        replacements.
    Returns:
      {d: (mean loss in nats, standard error over windows)}.
    """
    return summarize(context_ablation_losses(
        graphdef, params, windows, distances=distances, mode=mode, objective=objective, tokenizer=tokenizer,
        vocab_size=vocab_size, special_ids=special_ids, mask_id=mask_id, batch_size=batch_size, seed=seed))


def effective_context_interval(losses: dict[int, np.ndarray], tolerance: float = 0.01, *, level: float = 0.9,
                               resamples: int = 400, seed: int = 0) -> tuple[int, int]:
    """The central `level` interval of :func:`effective_context` over bootstrap resamples of the windows.

    losses: {d: per-window losses} (as from :func:`context_ablation_losses`).  Each resample draws N windows with
    replacement, the same ones at every d (the pairing is kept), and recomputes the effective context; the
    interval's ends are grid distances.  A wide interval means the windows cannot resolve the effective context.
    """
    ds = sorted(int(d) for d in losses)
    table = np.stack([np.asarray(losses[d], np.float64) for d in ds])            # [K, N]
    picks = np.random.default_rng(seed).integers(0, table.shape[1], (resamples, table.shape[1]))
    means = np.stack([table[:, p].mean(axis=1) for p in picks], axis=1)           # [K, resamples]
    within = means <= means.min(axis=0) * (1.0 + tolerance)
    effective = np.asarray(ds)[np.argmax(within, axis=0)]                        # the first d within tolerance
    tail = (1.0 - level) / 2
    return (int(np.quantile(effective, tail, method="lower")),
            int(np.quantile(effective, 1.0 - tail, method="higher")))


def effective_context(results: dict, tolerance: float = 0.01) -> int:
    """Smallest d whose mean loss <= (1 + tolerance) * the best mean loss over ALL d in ``results``.

    ``results`` maps d -> (mean, stderr) (as from :func:`context_ablation`) or d -> mean.
    """
    if not results:
        raise ValueError("no ablation results")
    means = {int(d): float(v[0] if isinstance(v, (tuple, list)) else v) for d, v in results.items()}
    best = min(means.values())
    return min(d for d, m in means.items() if m <= best * (1.0 + tolerance))
