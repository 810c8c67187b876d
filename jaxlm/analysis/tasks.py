"""Accuracy on the distance-controlled synthetic tasks (``jaxlm.data.synthetic``), per distance.

Accuracy is the fraction of answer tokens whose argmax prediction is right, scored the way each objective
predicts (the definitions are in ``jaxlm.data.synthetic``'s docstring): causal models at the position before
the answer; bert with every answer replaced by [MASK]; elmo by its forward direction.  For copy, each of the
k answers counts; ``sequence_accuracy`` is the fraction of examples with every answer right.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.analysis import apply
from jaxlm.data import synthetic


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "mask_id"))
def _answer_counts(graphdef, params, tokens, weights, *, kind, mask_id):
    """(correct answers [B], answers [B]) for one synthetic batch."""
    model = nnx.merge(graphdef, params)
    if kind == "masked":
        masked, scored = synthetic.mask_answers(tokens, weights, mask_id)
        targets = tokens[:, :-1]
        predictions = jnp.argmax(apply.logits(model, masked), axis=-1)
    else:
        scored, targets = weights > 0, tokens[:, 1:]
        predictions = jnp.argmax(apply.predicting_logits(apply.logits(model, tokens[:, :-1]), kind), axis=-1)
    correct = (predictions == targets) & scored
    return jnp.sum(correct, axis=1), jnp.sum(scored, axis=1)


def evaluate_accuracy(graphdef, params, batches, *, objective: str | None = None, mask_id: int | None = None) -> dict:
    """Answer accuracy over synthetic batches ({"tokens", "weights"}, e.g. ``dataset.eval_batches(...)``).

    Args:
      objective: "causal_lm" | "masked_lm" | "bidirectional_lm" (default: inferred from the model class).
      mask_id: the [MASK] id, required for masked models.
    Returns:
      {"accuracy", "stderr" (binomial, over answers), "sequence_accuracy", "num_answers", "num_examples"}.
    """
    kind = apply.kind_of(graphdef, params, objective)
    if kind == "masked" and mask_id is None:
        raise ValueError("a masked model needs mask_id to mask the answers")
    correct, total = [], []
    for batch in batches:
        c, n = _answer_counts(graphdef, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["weights"]),
                              kind=kind, mask_id=None if mask_id is None else int(mask_id))
        correct.append(np.asarray(c))
        total.append(np.asarray(n))
    correct, total = np.concatenate(correct), np.concatenate(total)
    answers = int(total.sum())
    accuracy = float(correct.sum() / max(answers, 1))
    return {"accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / max(answers, 1)),
            "sequence_accuracy": float(np.mean(correct == total)), "num_answers": answers,
            "num_examples": int(len(total))}


def with_distance(config, distance: int):
    """A copy of ``config`` with data.distance = distance (same task, alphabet, filler and seq_len)."""
    out = config.copy_and_resolve_references()
    out.data.distance = int(distance)
    return out


def accuracy_at_distance(graphdef, params, config, distances, *, num_batches: int | None = None,
                         batch_size: int | None = None, objective: str | None = None) -> dict[int, dict]:
    """Accuracy on the held-out examples of ``config``'s synthetic task at each distance d.

    The task, alphabet, filler and data.seq_len come from ``config`` (so the examples sit where the model
    saw them in training); a d that does not fit data.seq_len raises the synthetic module's UserError.

    Args:
      graphdef, params: a model trained on ``config`` (or any model with its vocabulary).
      config: the run's config (``data.source = synthetic:TASK``).
      distances: the d to evaluate (e.g. [config.data.distance], or a grid to probe generalisation).
      num_batches, batch_size: default config.train.eval_batches and config.train.batch_size.
      objective: default the config's objective (``config.objective_name``).
    Returns:
      {d: evaluate_accuracy(...) dict}; ``chance_accuracy(config)`` is the reference.
    """
    objective = objective or config_lib.objective_name(config)
    num_batches = num_batches or config.train.eval_batches
    batch_size = batch_size or config.train.batch_size
    out = {}
    for d in distances:
        dataset = synthetic.build_dataset(with_distance(config, d))
        out[int(d)] = evaluate_accuracy(graphdef, params, dataset.eval_batches(batch_size, num_batches),
                                        objective=objective, mask_id=dataset.tokenizer.mask_id)
    return out


def run_accuracy_at_distance(run, distances=None, **kwargs) -> dict[int, dict]:
    """:func:`accuracy_at_distance` for a ``jaxlm.runs.TrainedRun`` (default: its own training distance)."""
    distances = [run.config.data.distance] if distances is None else distances
    return accuracy_at_distance(run.graphdef, run.params, run.config, distances, **kwargs)


def chance_accuracy(config) -> float:
    """1 / data.num_symbols: the accuracy of guessing without the source token (every task, see synthetic)."""
    return 1.0 / config.data.num_symbols
