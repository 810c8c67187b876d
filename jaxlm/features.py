"""Contextual features from a trained run: per-token representations of any layer, and ELMo's biLM layers.

The seed's "embeddings representing words in context": the same call works for gpt, bert, rnn, lstm and
elmo runs, so a probe trained on one model's features can be trained on another's unchanged.

    from jaxlm import features
    feats = features.contextual_features("runs/bert", ["def f(x):", "return x"], layer=-1)   # [T_i, d] each
    reps = features.elmo_embeddings("runs/elmo", ["import os"])                          # [L+1, T, 2d]
    mix = scalar_mix.ScalarMix(reps[0].shape[0], rngs=nnx.Rngs(0)); task_input = mix(jnp.asarray(reps[0]))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib, runs
from jaxlm.errors import UserError


def _load(run_or_workdir) -> runs.TrainedRun:
    return run_or_workdir if isinstance(run_or_workdir, runs.TrainedRun) else runs.load(run_or_workdir)


def _encode_batch(run: runs.TrainedRun, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Texts -> right-padded ids [N, T], mask [N, T] and lengths (each text cut to the model's max_len)."""
    if isinstance(texts, str):
        texts = [texts]
    ids = [np.asarray(run.tokenizer.encode(t), np.int32)[: run.config.model.max_len] for t in texts]
    if not ids or any(len(x) == 0 for x in ids):
        raise UserError("contextual features need non-empty texts")
    width = max(len(x) for x in ids)
    tokens = np.full((len(ids), width), run.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
        tokens[i, : len(x)], mask[i, : len(x)] = x, True
    return tokens, mask, [len(x) for x in ids]


def contextual_features(run_or_workdir, texts: list[str], layer: int = -1) -> list[np.ndarray]:
    """Per-token representations of `layer` (0 = embeddings, -1 = top) for each text: a list of [T_i, width].

    width is d_model for transformers, the recurrent output width for rnn/lstm, 2*d for elmo ([fwd; bwd]).
    """
    run = _load(run_or_workdir)
    tokens, mask, lengths = _encode_batch(run, texts)
    states = run.model.hidden_states(jnp.asarray(tokens), mask=jnp.asarray(mask))
    if not -len(states) <= layer < len(states):
        raise UserError(f"invalid layer={layer}: the {run.config.model.name} run has layers 0..{len(states) - 1}")
    chosen = np.asarray(jax.device_get(states[layer]), np.float32)
    return [chosen[i, :n] for i, n in enumerate(lengths)]


def elmo_embeddings(run_or_workdir, texts: list[str]) -> list[np.ndarray]:
    """ELMo's per-layer biLM representations for each text: a list of [num_layers + 1, T_i, 2d] arrays.

    Layer 0 is the token embedding duplicated to [x; x]; layer l is [forward_l; backward_l] (Peters et al.
    2018). Combine them for a task with `jaxlm.models.scalar_mix.ScalarMix` (ELMo eq. 1).
    """
    run = _load(run_or_workdir)
    if run.config.model.name != "elmo":
        raise UserError(f"elmo_embeddings needs an elmo run; this one is {run.config.model.name!r} "
                        "(use contextual_features for any model)")
    tokens, mask, lengths = _encode_batch(run, texts)
    reps = np.asarray(jax.device_get(run.model.embeddings(jnp.asarray(tokens), jnp.asarray(mask))), np.float32)
    return [reps[:, i, :n] for i, n in enumerate(lengths)]


def fill_mask(run_or_workdir, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each "[MASK]" in `text`, the top_k fillers with probabilities, from a masked-LM run (bert, or any
    model trained with objective.name=masked_lm)."""
    run = _load(run_or_workdir)
    objective = config_lib.objective_name(run.config)
    if objective != "masked_lm":
        raise UserError(f"fill-in-the-blank needs a masked_lm run (bert); this one is {run.config.model.name!r} "
                        f"trained with {objective}")
    tok = run.tokenizer
    pieces = text.split("[MASK]")
    if len(pieces) == 1:
        raise UserError(f"--prompt={text!r} has no [MASK] to fill (write e.g. 'To be or [MASK] to be')")
    ids, positions = [], []
    for i, piece in enumerate(pieces):
        ids.extend(int(t) for t in tok.encode(piece))
        if i < len(pieces) - 1:
            positions.append(len(ids))
            ids.append(tok.mask_id)
    ids = ids[: run.config.model.max_len]
    logits, _ = run.model(jnp.asarray([ids], jnp.int32))
    probs = np.asarray(jax.nn.softmax(logits[0].astype(jnp.float32), axis=-1))
    special = np.zeros(probs.shape[-1], bool)
    special[list(tok.special_ids)] = True
    out = []
    for p in positions:
        if p >= len(ids):
            break
        row = np.where(special, 0.0, probs[p])
        top = np.argsort(-row)[:top_k]
        out.append([(tok.token_str(int(i)), float(row[i])) for i in top])
    return out
