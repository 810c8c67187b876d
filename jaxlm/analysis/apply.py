"""Run any jaxlm model the way the analyses need: which objective it predicts with, and its logits.

The models share ``embed(tokens)`` / ``forward_from_embeddings(x, ...)`` but return different things:
transformers return logits [B, T, V]; RNN/LSTM return ``(logits, carry)``; ELMo returns
``((forward_logits, backward_logits), None)``.  :func:`logits_from_embeddings` hides the difference, and
:func:`model_kind` says how a model predicts:

- "causal": logits at t predict token t + 1 (rnn, lstm, gpt);
- "masked": logits at t reconstruct a [MASK]ed token t (bert);
- "bidirectional": forward logits at t predict t + 1, backward logits at t predict t - 1 (elmo).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import elmo, layers, transformer

KINDS = ("causal", "masked", "bidirectional")
OBJECTIVE_KINDS = {"causal_lm": "causal", "masked_lm": "masked", "bidirectional_lm": "bidirectional"}


def model_kind(model, objective: str | None = None) -> str:
    """"causal" | "masked" | "bidirectional": from the objective name if given, else from the model class."""
    if objective:
        if objective not in OBJECTIVE_KINDS:
            raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVE_KINDS)}")
        return OBJECTIVE_KINDS[objective]
    if isinstance(model, transformer.Encoder):
        return "masked"
    if isinstance(model, elmo.ELMo):
        return "bidirectional"
    return "causal"


def kind_of(graphdef, params, objective: str | None = None) -> str:
    """:func:`model_kind` of the model a (graphdef, params) pair describes."""
    return model_kind(nnx.merge(graphdef, params), objective)


def _is_logits(x) -> bool:
    return isinstance(x, (jax.Array, jnp.ndarray)) and getattr(x, "ndim", 0) == 3


def split_output(out):
    """Normalise a forward pass's result to logits [B, T, V] or a (forward, backward) pair of them."""
    if not isinstance(out, tuple):
        return out
    first = out[0]
    if isinstance(first, (tuple, list)):            # ELMo: ((fwd, bwd), carry)
        return tuple(first)
    if len(out) == 2 and _is_logits(first) and _is_logits(out[1]) and out[1].shape == first.shape:
        return (first, out[1])                      # a bare (fwd, bwd) pair
    return first                                    # recurrent: (logits, carry)


def _run(forward, inputs, positions):
    """forward(inputs) -> logits or (fwd, bwd); with positions int [B, K] only there ([B, K, V]): jaxlm's models
    compute their output layer at those positions only, a model of one's own without a `positions` argument
    has its full logits gathered."""
    if positions is None:
        return split_output(forward(inputs))
    if "positions" in inspect.signature(forward).parameters:
        return split_output(forward(inputs, positions=positions))
    out = split_output(forward(inputs))
    gather = lambda x: layers.at_positions(x, positions)   # noqa: E731
    return tuple(map(gather, out)) if isinstance(out, tuple) else gather(out)


def logits_from_embeddings(model, x, positions=None):
    """``model.forward_from_embeddings(x)`` (no dropout, zero initial state) -> logits or (fwd, bwd);
    with positions int [B, K], only there ([B, K, V])."""
    return _run(model.forward_from_embeddings, x, positions)


def logits(model, tokens, positions=None):
    """``model(tokens)`` (no dropout, zero initial state) -> logits [B, T, V] or (fwd, bwd); with positions
    int [B, K], only there ([B, K, V])."""
    return _run(model, tokens, positions)


def predicting_logits(out, kind: str):
    """The logits a causal-style score uses: the forward direction for bidirectional models."""
    return out[0] if kind == "bidirectional" else out
