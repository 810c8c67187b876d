"""Synthetic tasks whose dependency distance is a config value (``data.source=synthetic:TASK``).

Each batch row is ONE example laid out at the END of a window of ``seq_len + 1`` tokens (earlier slots are
``[PAD]``, or task context for dyck/adding) and closed by ``[EOS]``.  With d = ``data.distance`` and
n = ``data.num_symbols``, every answer token at window index ``a`` depends on a source token at index
``a - 1 - d``: there are exactly d tokens strictly between source and answer, and a causal model, which
predicts the answer at input position ``a - 1``, must look exactly d tokens back.

Tasks (``_`` = blank filler, ``?`` = query marker; shown for d = 4):

- ``recall`` (delayed recall): ``[BOS] c f f f ? c [EOS]``.  The cue c (one of n symbols) comes first, then
  d - 1 distractors and the query; the answer is the cue.  Distractors are random symbols
  (``data.filler=random``: they look like cues, the harder variant) or the blank ``_`` (``blank``).
- ``copy``: ``[BOS] s1 .. sk f .. f ? s1 .. sk [EOS]``, k = min(4, d) symbols (``data.copy_length`` if the
  config has it), d - k fillers; each of the k answers is d + 1 positions after its source.
- ``dyck`` (bracket matching): ``[BOS] <prefix> ( <balanced span of d - 1> ? ) [EOS]``.  n bracket types.
  The span between the opener and the query is a balanced bracket word padded with blanks (or only
  blanks for ``filler=blank``); the prefix is a random bracket sequence that leaves openers unmatched.
  At ``?`` the innermost unmatched opener is the one d tokens back; the answer is its closing bracket.
- ``adding`` (Hochreiter & Schmidhuber 1997, discretised): ``[BOS] v v V v .. v V v .. v = S [EOS]``.
  Values are integers 0..n-1 (value i stands for (i + 0.5) / n of the original U(0, 1) inputs); a marked
  value (``V`` = token "i*") replaces the original's marker channel.  The first marked value is d tokens
  before ``=``, the second uniformly at random strictly between it and ``=`` (so the two are 1..d-1 apart);
  the answer is the exact sum as one of 2n - 1 sum tokens ``S0 .. S{2n-2}`` (bucket width 1/n of the
  original real-valued target).  ``data.filler`` does not apply: the distractors are the unmarked values.

Batch format (the text Dataset's, plus weights): ``{"tokens": int32 [B, seq_len + 1], "weights": float32
[B, seq_len]}``; ``weights[t] = 1`` iff target ``tokens[t + 1]`` is an answer.  How accuracy is defined per
objective (``jaxlm.analysis.tasks`` implements it):

- causal_lm (rnn, lstm, gpt): argmax of the logits at input position ``a - 1`` equals the answer, i.e. the
  usual next-token accuracy restricted to ``weights``; the answer is predicted at the query (or, for copy,
  at the previous answer).
- masked_lm (bert): every answer token in the inputs ``tokens[:, :-1]`` is replaced by ``[MASK]`` (all of
  them, deterministically: :func:`mask_answers`), and the argmax at those positions must equal the answer.
  The ``[EOS]`` after the answer is what keeps the answer inside the inputs ``tokens[:, :-1]``.
- bidirectional_lm (elmo): the FORWARD direction, scored as causal_lm (the backward direction only sees the
  ``[EOS]`` to the right of the answer, so it carries no information about the source).

Chance accuracy is 1/n for every task (for adding, the likeliest sum n - 1 has probability 1/n).

Batches are pure functions of (config.seed, step, process): training rows come from one random stream per
(seed, step); evaluation rows from a separate stream that does not depend on the seed (every seed is scored
on the same held-out examples).  The streams are disjoint as random streams; with a small alphabet and
distance an identical example can still occur in both (recall at d = 1 has only n * n distinct examples).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from jaxlm.data import batching, tokenizers
from jaxlm.errors import UserError

TASKS = ("recall", "copy", "dyck", "adding")
FILLERS = ("random", "blank")
COPY_LENGTH = 4          # symbols to copy unless the config has data.copy_length
_STREAM_TAG = 0x5EED5    # first entropy word of every synthetic random stream
_TRAIN, _EVAL = 0, 1
_NUM_PROMPT_EXAMPLES = 4


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


class SyntheticTokenizer:
    """Whitespace-separated task tokens, then the six special tokens (same interface as the text tokenizers).

    ``encode("a _ _ ?")`` -> ids; ``decode`` joins the tokens with spaces (special tokens skipped).  Special
    tokens may be typed in ``encode`` as "[BOS]" etc.  The vocabulary is a pure function of (task, n), so it
    is rebuilt from the config rather than read from the workdir.
    """

    name = "synthetic"

    def __init__(self, task: str, tokens):
        self.task = task
        self.tokens = tuple(tokens)
        self.vocab_size = len(self.tokens) + len(tokenizers.SPECIAL_TOKENS)
        ids = range(len(self.tokens), self.vocab_size)
        for attr, i in zip(("pad_id", "mask_id", "cls_id", "sep_id", "bos_id", "eos_id"), ids):
            setattr(self, attr, int(i))
        self.special_ids = tuple(ids)
        self._strings = self.tokens + tuple(tokenizers.SPECIAL_TOKENS)
        self._ids = {s: i for i, s in enumerate(self._strings)}

    def id(self, token: str) -> int:
        """The id of one token string (e.g. "?")."""
        return self._ids[token]

    def encode(self, text: str) -> np.ndarray:
        ids = []
        for token in text.split():
            if token not in self._ids:
                raise UserError(f"unknown token {token!r} for synthetic:{self.task}; the vocabulary is "
                                f"{' '.join(self.tokens)} (tokens separated by spaces)")
            ids.append(self._ids[token])
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        return " ".join(self._strings[i] for i in ids if 0 <= i < len(self.tokens))

    def token_str(self, token_id: int) -> str:
        return self._strings[int(token_id)]

    def save(self, path: str) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"type": self.name, "task": self.task, "tokens": list(self.tokens)}, f)
        os.replace(tmp, path)


def _symbol_names(n: int) -> list[str]:
    return [chr(ord("a") + i) for i in range(n)] if n <= 26 else [f"s{i}" for i in range(n)]


def _bracket_names(n: int) -> tuple[list[str], list[str]]:
    if n <= 4:
        return list("([{<"[:n]), list(")]}>"[:n])
    return [f"({i}" for i in range(n)], [f"){i}" for i in range(n)]


def task_tokens(task: str, n: int) -> list[str]:
    """The task's token strings in id order (before the special tokens)."""
    if task in ("recall", "copy"):
        return _symbol_names(n) + ["_", "?"]
    if task == "dyck":
        opens, closes = _bracket_names(n)
        return opens + closes + ["_", "?"]
    return [str(i) for i in range(n)] + [f"{i}*" for i in range(n)] + ["="] + [f"S{i}" for i in range(2 * n - 1)]


def build_tokenizer(data_cfg) -> SyntheticTokenizer:
    """The tokenizer of ``data.source=synthetic:TASK`` (a pure function of the task and data.num_symbols)."""
    task = parse_task(data_cfg.source)
    _check_symbols(data_cfg.num_symbols)
    return SyntheticTokenizer(task, task_tokens(task, data_cfg.num_symbols))


def load_tokenizer(data_cfg, workdir: str | None = None) -> SyntheticTokenizer:
    """Same as :func:`build_tokenizer` (nothing is read from ``workdir``); for symmetry with the text tokenizers."""
    del workdir
    return build_tokenizer(data_cfg)


# ----------------------------------------------------------------------------------------------------------------
# Layout and validation
# ----------------------------------------------------------------------------------------------------------------


def parse_task(source: str) -> str:
    kind, _, task = source.partition(":")
    if kind != "synthetic" or task not in TASKS:
        raise UserError(f"invalid data.source={source!r}: synthetic tasks are {', '.join('synthetic:' + t for t in TASKS)}")
    return task


def _check_symbols(n) -> None:
    if not isinstance(n, int) or n < 2:
        raise UserError(f"invalid data.num_symbols={n!r}: synthetic tasks need an integer >= 2")


def copy_length(data_cfg) -> int:
    """k, the number of copied symbols: min(data.copy_length or 4, data.distance)."""
    return max(1, min(int(data_cfg.get("copy_length", COPY_LENGTH)), int(data_cfg.distance)))


def min_seq_len(task: str, distance: int, k: int = 1) -> int:
    """Smallest data.seq_len that holds one example: [BOS], the dependency of length d, query, answer(s), [EOS]."""
    return distance + (k + 2 if task == "copy" else 3)


def answer_targets(task: str, seq_len: int, k: int = 1) -> np.ndarray:
    """Target indices t (weights[t] = 1, answer at window index t + 1): the same for every row."""
    count = k if task == "copy" else 1
    return np.arange(seq_len - 1 - count, seq_len - 1)


def _validate(config, task: str) -> None:
    d = config.data
    _check_symbols(d.num_symbols)
    if d.filler not in FILLERS:
        raise UserError(f"invalid data.filler={d.filler!r}: choose from {', '.join(FILLERS)}")
    least = 2 if task == "adding" else 1
    if not isinstance(d.distance, int) or d.distance < least:
        raise UserError(f"invalid data.distance={d.distance!r}: synthetic:{task} needs an integer >= {least}")
    need = min_seq_len(task, d.distance, copy_length(d))
    if d.seq_len < need:
        raise UserError(f"invalid data.distance={d.distance}: synthetic:{task} needs data.seq_len >= {need} "
                        f"(got data.seq_len={d.seq_len}); raise data.seq_len (and model.max_len) or lower data.distance")


# ----------------------------------------------------------------------------------------------------------------
# Generators: (rng, batch, window, d, n, filler, tokenizer) -> int32 [batch, window]
# ----------------------------------------------------------------------------------------------------------------


def _frame(batch: int, window: int, tok) -> np.ndarray:
    out = np.full((batch, window), tok.pad_id, np.int32)
    out[:, -1] = tok.eos_id
    return out


def _fillers(rng, shape, n: int, filler: str, tok) -> np.ndarray:
    if filler == "blank":
        return np.full(shape, tok.id("_"), np.int32)
    return rng.integers(0, n, shape, dtype=np.int32)


def _recall(rng, batch, window, d, n, filler, tok, k=1):
    out = _frame(batch, window, tok)
    cue = rng.integers(0, n, batch, dtype=np.int32)
    a = window - 2
    out[:, a - 2 - d] = tok.bos_id
    out[:, a - 1 - d] = cue
    out[:, a - d:a - 1] = _fillers(rng, (batch, d - 1), n, filler, tok)
    out[:, a - 1] = tok.id("?")
    out[:, a] = cue
    return out


def _copy(rng, batch, window, d, n, filler, tok, k=1):
    out = _frame(batch, window, tok)
    first = window - 1 - k                      # first answer
    src = first - 1 - d                         # first source
    symbols = rng.integers(0, n, (batch, k), dtype=np.int32)
    out[:, src - 1] = tok.bos_id
    out[:, src:src + k] = symbols
    out[:, src + k:first - 1] = _fillers(rng, (batch, d - k), n, filler, tok)
    out[:, first - 1] = tok.id("?")
    out[:, first:first + k] = symbols
    return out


def _bracket_walk(rng, batch: int, length: int, n: int, *, balanced: bool, blank_prob: float = 0.2):
    """Random bracket sequences [batch, length] as (kind, type): kind 0 blank, 1 open, 2 close.

    Closes always match the innermost open bracket of the same row.  ``balanced``: every bracket opened is
    closed within the span (opens only while there is room to close, forced closes at the end).
    """
    kind = np.zeros((batch, length), np.int8)
    types = np.zeros((batch, length), np.int32)
    stack = np.zeros((batch, length + 1), np.int32)
    depth = np.zeros(batch, np.int64)
    rows = np.arange(batch)
    for i in range(length):  # a stack machine per position, vectorised over rows (generation, not a model)
        left = length - i
        can_open = depth + 2 <= left if balanced else np.ones(batch, bool)
        can_close = depth > 0
        can_blank = depth <= left - 1 if balanced else np.ones(batch, bool)
        w = np.stack([can_blank * blank_prob, can_open * (1 - blank_prob) / 2, can_close * (1 - blank_prob) / 2], 1)
        u = rng.random(batch) * w.sum(1)
        choice = (u[:, None] >= np.cumsum(w, 1)).sum(1).clip(0, 2)
        new_type = rng.integers(0, n, batch, dtype=np.int32)
        opening, closing = choice == 1, choice == 2
        stack[rows[opening], depth[opening]] = new_type[opening]
        types[:, i] = np.where(opening, new_type, 0)
        depth = depth + opening
        types[closing, i] = stack[rows[closing], depth[closing] - 1]
        depth = depth - closing
        kind[:, i] = choice
    return kind, types


def _bracket_tokens(kind, types, n, tok):
    return np.where(kind == 1, types, np.where(kind == 2, n + types, tok.id("_"))).astype(np.int32)


def _dyck(rng, batch, window, d, n, filler, tok, k=1):
    out = _frame(batch, window, tok)
    a = window - 2
    opener = a - 1 - d
    out[:, 0] = tok.bos_id
    if filler == "blank":
        out[:, 1:opener] = tok.id("_")
        out[:, opener + 1:a - 1] = tok.id("_")
    else:
        out[:, 1:opener] = _bracket_tokens(*_bracket_walk(rng, batch, opener - 1, n, balanced=False), n, tok)
        out[:, opener + 1:a - 1] = _bracket_tokens(*_bracket_walk(rng, batch, d - 1, n, balanced=True), n, tok)
    kind = rng.integers(0, n, batch, dtype=np.int32)
    out[:, opener] = kind
    out[:, a - 1] = tok.id("?")
    out[:, a] = n + kind
    return out


def _adding(rng, batch, window, d, n, filler, tok, k=1):
    del filler
    out = _frame(batch, window, tok)
    a = window - 2
    rows = np.arange(batch)
    values = rng.integers(0, n, (batch, a - 2), dtype=np.int32)    # window indices 1 .. a - 2
    first = a - 1 - d
    second = rng.integers(first + 1, a - 1, batch)                  # strictly between first and "="
    total = values[:, first - 1] + values[rows, second - 1]
    values[:, first - 1] += n                                       # marked value i -> token "i*"
    values[rows, second - 1] += n
    out[:, 0] = tok.bos_id
    out[:, 1:a - 1] = values
    out[:, a - 1] = tok.id("=")
    out[:, a] = 2 * n + 1 + total                                   # "S{total}"
    return out


_GENERATORS = {"recall": _recall, "copy": _copy, "dyck": _dyck, "adding": _adding}


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------


class SyntheticDataset:
    """Step-indexed batches of one synthetic task; the same interface as ``jaxlm.data.Dataset``.

    Attributes:
      tokenizer: :class:`SyntheticTokenizer`.
      task, distance, num_symbols, filler, seq_len, seed, copy_length: the task parameters.
      targets: int [k] target indices scored in every row (``weights[:, targets] == 1``).
      train_tokens, valid_tokens: int32 1-D, a few examples (padding stripped) end to end, for sampling prompts.
    """

    def __init__(self, config):
        data = config.data
        self.task = parse_task(data.source)
        _validate(config, self.task)
        self.tokenizer = build_tokenizer(data)
        self.distance, self.num_symbols, self.filler = int(data.distance), int(data.num_symbols), data.filler
        self.seq_len, self.seed = int(data.seq_len), int(config.seed)
        self.copy_length = copy_length(data) if self.task == "copy" else 1
        self.targets = answer_targets(self.task, self.seq_len, self.copy_length)
        self.task_index = TASKS.index(self.task)
        self.train_tokens = self._prompt_tokens(self._generate(self._train_entropy(0), _NUM_PROMPT_EXAMPLES))
        self.valid_tokens = self._prompt_tokens(self._generate(self._eval_entropy(0), _NUM_PROMPT_EXAMPLES))

    def _train_entropy(self, step: int) -> list[int]:
        return [_STREAM_TAG, self.task_index, _TRAIN, self.seed % 2**32, int(step)]

    def _eval_entropy(self, index: int) -> list[int]:
        return [_STREAM_TAG, self.task_index, _EVAL, int(index)]

    def _generate(self, entropy, batch: int) -> np.ndarray:
        rng = np.random.default_rng(entropy)
        return _GENERATORS[self.task](rng, batch, self.seq_len + 1, self.distance, self.num_symbols,
                                      self.filler, self.tokenizer, k=self.copy_length)

    def _prompt_tokens(self, windows: np.ndarray) -> np.ndarray:
        return windows[windows != self.tokenizer.pad_id].astype(np.int32)

    def weights(self, batch: int) -> np.ndarray:
        """float32 [batch, seq_len]: 1 at the answer targets, 0 elsewhere."""
        w = np.zeros((batch, self.seq_len), np.float32)
        w[:, self.targets] = 1.0
        return w

    def _batch(self, entropy, batch_size: int, process_index: int, process_count: int) -> dict:
        rows = batching.local_rows(batch_size, process_count, process_index)
        tokens = self._generate(entropy, batch_size)[rows]   # the global batch, then this process's rows
        return {"tokens": tokens, "weights": self.weights(len(tokens))}

    def train_batch(self, step: int, batch_size: int, *, stateful: bool = False, process_index: int = 0,
                    process_count: int = 1) -> dict:
        """This process's rows of training batch ``step``: {"tokens": int32 [B_local, seq_len + 1], "weights"}."""
        self._refuse_stateful(stateful)
        return self._batch(self._train_entropy(step), batch_size, process_index, process_count)

    def _refuse_stateful(self, stateful: bool) -> None:
        if stateful:
            raise UserError(f"invalid train.stateful=True with data.source=synthetic:{self.task}: synthetic "
                            f"examples are independent windows, not streams; set train.stateful=False")

    def eval_batches(self, batch_size: int, num_batches: int, *, stateful: bool = False, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        """``num_batches`` held-out batches (a stream independent of the training one and of the seed)."""
        self._refuse_stateful(stateful)
        return [self._batch(self._eval_entropy(i), batch_size, process_index, process_count)
                for i in range(num_batches)]


def build_dataset(config, workdir: str | None = None) -> SyntheticDataset:
    """The dataset of ``config.data.source = synthetic:TASK`` (``workdir`` is unused: nothing is built from data)."""
    del workdir
    return SyntheticDataset(config)


# ----------------------------------------------------------------------------------------------------------------
# Masked-LM view of a batch
# ----------------------------------------------------------------------------------------------------------------


def answer_mask(weights):
    """bool [B, seq_len] over the INPUTS ``tokens[:, :-1]``: True where the input holds an answer token.

    Target t is input t + 1, so this is ``weights`` shifted right by one (works on NumPy or JAX arrays).
    """
    w = jnp.asarray(weights) > 0
    return jnp.concatenate([jnp.zeros_like(w[:, :1]), w[:, :-1]], axis=1)


def mask_answers(tokens, weights, mask_id: int):
    """The masked-LM inputs of a synthetic batch: every answer replaced by ``[MASK]``, nothing else changed.

    Args:
      tokens: int [B, seq_len + 1] (batch["tokens"]); weights: [B, seq_len] (batch["weights"]).
    Returns:
      (inputs int32 [B, seq_len], selected bool [B, seq_len]): score ``masked_lm_loss(logits, tokens[:, :-1],
      selected)``.  Deterministic (no 80/10/10): the answer must come from the context alone.
    """
    inputs = jnp.asarray(tokens, jnp.int32)[:, :-1]
    selected = answer_mask(weights)
    return jnp.where(selected, jnp.int32(mask_id), inputs), selected
