"""Deterministic, step-indexed batches of token windows: pure functions of (tokens, seed, step, process).

Resuming needs no iterator state: the batch of step k is recomputed from k (DESIGN.md "Data contract").
Each function first lays out the GLOBAL batch, then process ``process_index`` keeps its rows
``[process_index * local, (process_index + 1) * local)``, ``local = batch_size // process_count``, so the
processes' shards concatenated in process order are exactly the one-process batch.

A window of ``length`` tokens holds the inputs and the shifted targets of one example: for a causal LM,
``length = seq_len + 1`` (inputs ``w[:-1]``, targets ``w[1:]``).
"""

from __future__ import annotations

import numpy as np

from jaxlm.errors import UserError


def split_tokens(tokens: np.ndarray, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous train/valid split: the first ``1 - valid_fraction`` of the tokens train, the LAST part validates.

    As nanoGPT does (``data[:int(n * 0.9)]`` / ``data[int(n * 0.9):]``): one cut, so the splits are disjoint,
    and the same tokens always give the same split.

    Returns:
      (train [N - n_valid], valid [n_valid]) views of ``tokens``, ``n_valid = round(N * valid_fraction)``.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"invalid data.valid_fraction={valid_fraction}: must be in [0, 1)")
    tokens = np.asarray(tokens)
    n_train = len(tokens) - int(round(len(tokens) * valid_fraction))
    return tokens[:n_train], tokens[n_train:]


def random_windows(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, length: int,
                   process_index: int = 0, process_count: int = 1, split: str = "train") -> np.ndarray:
    """Windows at uniformly random starts drawn from ``np.random.default_rng((seed, step))``.

    Args:
      tokens: int [N], the split to sample from.
      seed, step: the batch is a pure function of these (and of ``tokens``).
      batch_size: GLOBAL batch size (divisible by ``process_count``).
      length: tokens per window (``seq_len + 1``).
      split: name used in error messages.

    Returns:
      int32 [batch_size // process_count, length]; row i is ``tokens[s_i : s_i + length]``.
    """
    local = local_rows(batch_size, process_count, process_index)
    _check_length(tokens, length, split)
    rng = np.random.default_rng((int(seed) % 2**64, int(step)))
    starts = rng.integers(0, len(tokens) - length + 1, size=batch_size)
    return _gather(tokens, starts[local], length)


def stream_windows(tokens: np.ndarray, *, step: int, batch_size: int, length: int,
                   process_index: int = 0, process_count: int = 1, split: str = "train") -> np.ndarray:
    """Consecutive windows of ``batch_size`` contiguous streams, for stateful (truncated-BPTT) training.

    Stream b owns ``tokens[b * span : (b + 1) * span]`` with ``span = N // batch_size``. Row b of step k is
    the stream's tokens from offset ``k * (length - 1)`` on, wrapping around to the stream's start when it
    runs out. Consecutive windows overlap by one token: the last target of step k is the first input of
    step k + 1, so a recurrent state carried from step k continues exactly where it stopped.

    Returns:
      int32 [batch_size // process_count, length].
    """
    local = local_rows(batch_size, process_count, process_index)
    span = len(tokens) // batch_size
    if span < length:
        raise UserError(f"the {split} split has {len(tokens)} tokens: {batch_size} streams (train.batch_size) of "
                        f"{span} tokens each are shorter than one window of {length} (data.seq_len + 1); "
                        f"lower train.batch_size or data.seq_len, or use a larger data.source")
    rows = np.arange(batch_size)[local]
    offsets = (int(step) * (length - 1) + np.arange(length, dtype=np.int64)) % span
    return np.asarray(tokens)[rows[:, None] * span + offsets[None, :]].astype(np.int32)


def eval_windows(tokens: np.ndarray, *, batch_size: int, num_batches: int, length: int,
                 process_index: int = 0, process_count: int = 1, split: str = "valid") -> list[np.ndarray]:
    """``num_batches`` batches of windows whose starts are evenly spread from the first to the last token.

    Deterministic (integer arithmetic, no randomness), so every evaluation scores the same tokens and
    eval losses are comparable across steps and runs. Windows overlap when the split holds fewer than
    ``batch_size * num_batches * length`` tokens.

    Returns:
      A list of ``num_batches`` int32 arrays [batch_size // process_count, length].
    """
    local = local_rows(batch_size, process_count, process_index)
    _check_length(tokens, length, split)
    total = batch_size * num_batches
    starts = np.arange(total, dtype=np.int64) * (len(tokens) - length) // max(total - 1, 1)
    return [_gather(tokens, starts[i * batch_size:(i + 1) * batch_size][local], length) for i in range(num_batches)]


def local_rows(batch_size: int, process_count: int, process_index: int) -> slice:
    """The rows of the global batch that process ``process_index`` keeps."""
    if batch_size <= 0 or batch_size % process_count:
        raise UserError(f"invalid train.batch_size={batch_size}: must be a positive multiple of the "
                        f"number of processes ({process_count})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _check_length(tokens: np.ndarray, length: int, split: str) -> None:
    if len(tokens) < length:
        raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than one window of {length} "
                        f"(data.seq_len + 1); lower data.seq_len, change data.valid_fraction, "
                        f"or use a larger data.source")


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """int32 [len(starts), length]: row i = tokens[starts[i] : starts[i] + length]."""
    return np.asarray(tokens)[starts[:, None] + np.arange(length)[None, :]].astype(np.int32)
