"""The data pipeline: source text -> tokenizer -> train/valid tokens -> step-indexed batches.

``build_dataset(config, workdir)`` is the one entry point the trainer uses. Batches are pure functions of
(config.seed, step, process index) (DESIGN.md "Data contract"), so a resumed run replays the same batches.

How the corpus is split:
  1. the text is cut at ``1 - data.valid_fraction`` of its characters; the BPE merges are learned from the
     first (training) part only, so validation statistics never leak into the tokenizer;
  2. the char vocabulary is the set of characters of the WHOLE text: a character that occurs only in the
     validation part still gets an id (otherwise evaluation would crash). Only which characters exist, no
     frequency, comes from the validation text; such a character's embedding is simply never trained;
  3. the whole text is encoded and the TOKENS are split at the same fraction (``batching.split_tokens``),
     so train and valid are contiguous and disjoint, valid last (nanoGPT's split).
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from jaxlm.data import batching
from jaxlm.data import sources
from jaxlm.data import tokenizers
from jaxlm.errors import UserError

TOKEN_CACHE_FILE = "token_cache.npz"


class Dataset:
    """Train/valid token arrays of one corpus plus the batch functions the trainer calls.

    Attributes:
      tokenizer: the tokenizer the tokens were encoded with (``jaxlm.data.tokenizers``).
      train_tokens, valid_tokens: int32 [N_train], [N_valid].
      seq_len: tokens a model sees per example; batch rows hold ``seq_len + 1`` (inputs + shifted targets).
      seed: ``config.seed``; random batches are drawn from (seed, step).
    """

    def __init__(self, tokenizer, train_tokens: np.ndarray, valid_tokens: np.ndarray, *, seq_len: int, seed: int):
        self.tokenizer = tokenizer
        self.train_tokens = np.asarray(train_tokens, dtype=np.int32)
        self.valid_tokens = np.asarray(valid_tokens, dtype=np.int32)
        self.seq_len = seq_len
        self.seed = seed

    def train_batch(self, step: int, batch_size: int, *, stateful: bool = False,
                    process_index: int = 0, process_count: int = 1) -> dict:
        """This process's share of training batch ``step``.

        ``stateful=False``: random windows from (seed, step). ``stateful=True``: ``batch_size`` contiguous
        streams, row b of step k + 1 continuing row b of step k (``batching.stream_windows``).

        Returns:
          {"tokens": int32 [batch_size // process_count, seq_len + 1]}.
        """
        kwargs = dict(step=step, batch_size=batch_size, length=self.seq_len + 1,
                      process_index=process_index, process_count=process_count, split="train")
        if stateful:
            return {"tokens": batching.stream_windows(self.train_tokens, **kwargs)}
        return {"tokens": batching.random_windows(self.train_tokens, seed=self.seed, **kwargs)}

    def eval_batches(self, batch_size: int, num_batches: int, *, stateful: bool = False, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        """``num_batches`` evaluation batches, identical on every call.

        ``stateful=False``: windows evenly spread over the valid split. ``stateful=True``: consecutive windows
        of ``batch_size`` contiguous valid streams, so a recurrent model can carry its state across batches.
        """
        if stateful:
            return [{"tokens": batching.stream_windows(self.valid_tokens, step=k, batch_size=batch_size,
                                                       length=self.seq_len + 1, process_index=process_index,
                                                       process_count=process_count, split="valid")}
                    for k in range(num_batches)]
        windows = batching.eval_windows(self.valid_tokens, batch_size=batch_size, num_batches=num_batches,
                                        length=self.seq_len + 1, process_index=process_index,
                                        process_count=process_count, split="valid")
        return [{"tokens": w} for w in windows]


def build_dataset(config, workdir: str | None) -> Dataset:
    """Read ``config.data.source``, build (or load) the tokenizer in ``workdir``, encode and split.

    ``synthetic:TASK`` sources are handed whole to ``jaxlm.data.synthetic.build_dataset(config, workdir)``.
    Raises UserError (one line) for bad sources and for splits too short for one window.
    """
    data = config.data
    if data.source.partition(":")[0] == "synthetic":
        return sources.synthetic_module(data.source).build_dataset(config, workdir)
    text = sources.read_text(data.source, max_bytes=data.max_corpus_bytes)
    train_chars = len(text) - int(round(len(text) * data.valid_fraction))
    tokenizer = tokenizers.build_tokenizer(data, text[:train_chars], workdir, charset_text=text)
    tokens = _encode(tokenizer, text, workdir)
    train, valid = batching.split_tokens(tokens, data.valid_fraction)
    for name, split in (("train", train), ("valid", valid)):
        if len(split) < data.seq_len + 1:
            raise UserError(f"invalid data.seq_len={data.seq_len}: the {name} split of data.source={data.source!r} "
                            f"has {len(split)} tokens ({tokenizer.name}), fewer than one window of "
                            f"seq_len + 1 = {data.seq_len + 1}; "
                            f"lower data.seq_len, change data.valid_fraction or use a larger corpus")
    return Dataset(tokenizer, train, valid, seq_len=data.seq_len, seed=config.seed)


def _encode(tokenizer, text: str, workdir: str | None) -> np.ndarray:
    """``tokenizer.encode(text)``, cached in WORKDIR/token_cache.npz for BPE (the only slow encoder: ~2 s / 4 MB).

    The cache is keyed on a hash of the tokenizer file and the text, so a changed corpus or vocabulary is
    re-encoded; it holds plain arrays (loaded with allow_pickle=False).
    """
    if tokenizer.name != "bpe" or workdir is None:
        return tokenizer.encode(text)
    digest = hashlib.sha256(tokenizer.hf.to_str().encode("utf-8") + b"\0" + text.encode("utf-8")).hexdigest()
    key = np.frombuffer(digest.encode("ascii"), dtype=np.uint8)
    path = os.path.join(workdir, TOKEN_CACHE_FILE)
    try:
        with np.load(path, allow_pickle=False) as cached:
            if np.array_equal(cached["key"], key):
                return cached["tokens"].astype(np.int32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, partial or foreign: re-encode
        pass
    tokens = tokenizer.encode(text)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    tmp = os.path.join(workdir, f"token_cache.{os.getpid()}.tmp.npz")
    np.savez(tmp, key=key, tokens=tokens.astype(dtype))
    os.replace(tmp, path)
    return tokens
