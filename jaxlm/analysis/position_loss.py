"""Loss by position: how a left-to-right model's next-token loss falls as it sees more of its window.

Position t of a window predicts token t + 1 from the t + 1 tokens before it, so the curve is the loss as a
function of the context available in unaltered text (the per-token loss plot of long-context papers), where a
context ablation alters the text.  It also shows what an ablation cannot tell apart from context use: a
position the model fits worse for reasons of its own (a learned position table's last row, trained by one
target per window; README, "The long-range study").  Causal models and ELMo's forward direction; a masked LM
predicts no next token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.analysis import apply, context

KINDS = ("causal", "bidirectional")


@functools.partial(jax.jit, static_argnames=("graphdef", "kind"))
def _window_losses(graphdef, params, windows, *, kind):
    """windows int [B, L + 1] -> -log p(w[t + 1] | w[:t + 1]) float32 [B, L]."""
    out = apply.predicting_logits(apply.logits(nnx.merge(graphdef, params), windows[:, :-1]), kind)
    logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]


def losses_by_position(graphdef, params, windows, *, kind: str, vocab_size: int,
                       batch_size: int | None = None) -> np.ndarray:
    """Per-window, per-position losses float64 [N, L] of windows int [N, L + 1], in equal-sized calls
    (batch_size None: :func:`context.default_batch_size`, which the vocabulary size enters)."""
    if kind not in KINDS:
        raise ValueError(f"loss by position needs a left-to-right model ({', '.join(KINDS)}), got kind={kind!r}")
    windows = np.asarray(windows, np.int32)
    num, length = windows.shape[0], windows.shape[1] - 1
    batch_size = min(batch_size or context.default_batch_size(length, vocab_size), num)
    out = []
    for start in range(0, num, batch_size):
        chunk = windows[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:   # the same shape as the other calls: no recompilation
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        out.append(np.asarray(_window_losses(graphdef, params, jnp.asarray(chunk), kind=kind))[:real])
    return np.concatenate(out).astype(np.float64)


def summarize(losses: np.ndarray) -> dict:
    """{"mean", "stderr"}: per position over the windows (index t: a context of t + 1 tokens); "last_excess":
    [mean, paired stderr] of the last position's loss minus the window's mean over the second half (positions
    L/2 .. L-2), window by window: how much worse the last position is fitted than its neighbours."""
    n, length = losses.shape
    excess = losses[:, -1] - losses[:, length // 2:-1].mean(axis=1) if length >= 4 else np.zeros(n)
    stderr = lambda x: float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0   # noqa: E731
    return {"mean": losses.mean(axis=0).tolist(),
            "stderr": (losses.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(length)).tolist(),
            "last_excess": [float(excess.mean()), stderr(excess)], "num_windows": int(n)}
