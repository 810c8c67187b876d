"""Tokenizers: bytes (fixed), chars (built from the corpus) and byte-level BPE (HF ``tokenizers``).

All three share one interface (contracts.md "Data"): ``name``, ``vocab_size`` (special tokens included),
``pad_id, mask_id, cls_id, sep_id, bos_id, eos_id``, ``special_ids``; ``encode(text) -> np.int32[N]`` (adds no
special token), ``decode(ids) -> str`` (skips special tokens), ``token_str(id)`` (for tables) and ``save(path)``.
The six special tokens take the ids right after the byte / character / learned BPE vocabulary.

Tokenizers built from data are saved as ``WORKDIR/tokenizer.json`` (plain JSON, never pickle) so that
resuming and sampling use exactly the vocabulary the model was trained with.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import tokenizers as hf

from jaxlm.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]")
TOKENIZER_FILE = "tokenizer.json"
_SPECIAL_ATTRS = ("pad_id", "mask_id", "cls_id", "sep_id", "bos_id", "eos_id")


class _Specials:
    """Sets ``pad_id`` ... ``eos_id`` and ``special_ids`` from the id of each entry of SPECIAL_TOKENS."""

    def _set_special_ids(self, ids):
        for attr, i in zip(_SPECIAL_ATTRS, ids):
            setattr(self, attr, int(i))
        self.special_ids = tuple(int(i) for i in ids)
        self._special_names = dict(zip(self.special_ids, SPECIAL_TOKENS))


class ByteTokenizer(_Specials):
    """UTF-8 bytes: ids 0-255 are the bytes, 256-261 the special tokens. Covers any text, needs no file."""

    name = "bytes"

    def __init__(self):
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self._set_special_ids(range(256, self.vocab_size))

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of ``text`` as int32 [num_bytes] (vectorised: 4 MB in milliseconds)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Text of the byte ids, special tokens skipped; invalid UTF-8 (a sample cut mid-character) -> U+FFFD."""
        ids = _check_ids(ids, self.vocab_size)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """The byte as a character if it is ASCII, else ``<0xNN>`` (a lone byte of a multi-byte character)."""
        token_id = int(token_id)
        if token_id in self._special_names:
            return self._special_names[token_id]
        return chr(token_id) if token_id < 128 else f"<0x{token_id:02X}>"

    def save(self, path: str) -> None:
        _write_json(path, {"type": self.name})


class CharTokenizer(_Specials):
    """Characters (Unicode code points): the sorted characters of a text, then the special tokens.

    Encoding is a vectorised ``np.searchsorted`` of the text's code points in the sorted vocabulary, so a
    4 MB text encodes in well under a second.
    """

    name = "chars"

    def __init__(self, chars, *, path: str | None = None):
        """Args: chars: distinct single characters in code-point order; path: the file they came from (errors)."""
        self.chars = tuple(chars)
        self.path = path
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self.vocab_size = len(self.chars) + len(SPECIAL_TOKENS)
        self._set_special_ids(range(len(self.chars), self.vocab_size))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise UserError("cannot build a char vocabulary from an empty text; give data.source some text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text``, int32 [num_chars]; a character outside the vocabulary is a UserError."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, points)
        found = self._codepoints[np.minimum(ids, len(self.chars) - 1)] == points
        if not found.all():
            offset = int(np.argmin(found))
            char = text[offset]
            where = f"the vocabulary in {self.path}" if self.path else "the char vocabulary"
            raise UserError(f"character {char!r} (U+{ord(char):04X}) at offset {offset} is not in {where} "
                            f"(built from the training text); remove it, or use data.tokenizer=bytes or bpe "
                            f"(they cover any text) in a new workdir")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """The characters of the ids, special tokens skipped."""
        ids = _check_ids(ids, self.vocab_size)
        points = self._codepoints[ids[ids < len(self.chars)]]
        return points.astype(np.uint32).tobytes().decode("utf-32-le")

    def token_str(self, token_id: int) -> str:
        token_id = int(token_id)
        return self._special_names.get(token_id) or self.chars[token_id]

    def save(self, path: str) -> None:
        _write_json(path, {"type": self.name, "chars": list(self.chars)})


class BpeTokenizer(_Specials):
    """Byte-level BPE (GPT-2 style) from HF ``tokenizers``: exact round trip, no normaliser, no prefix space.

    The learned vocabulary is the 256 byte symbols plus merges; the special tokens are added after training,
    so they get the ids right after it. ``encode_special_tokens`` is on: a literal "[PAD]" in the corpus is
    ordinary text, never the padding id (otherwise encode/decode would not round-trip it).
    """

    name = "bpe"
    _CHUNK_CHARS = 1 << 16

    def __init__(self, tokenizer: hf.Tokenizer, *, path: str | None = None):
        self.hf = tokenizer
        self.hf.encode_special_tokens = True
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            missing = SPECIAL_TOKENS[ids.index(None)]
            raise UserError(f"malformed tokenizer {path or ''}: special token {missing} is missing; "
                            f"delete the file to rebuild it")
        self._set_special_ids(ids)
        self._byte_of_char = {c: b for b, c in _bytes_to_unicode().items()}

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BpeTokenizer":
        """Learn ``vocab_size - 6`` byte-level BPE symbols from ``text``, then add the 6 special tokens.

        The vocabulary can come out smaller than ``vocab_size`` when the text has too few distinct pairs.
        Training is deterministic: the same text gives the same tokenizer.json.
        """
        if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise UserError(f"invalid data.vocab_size={vocab_size}: bpe needs at least "
                            f"{256 + len(SPECIAL_TOKENS) + 1} (256 bytes + special tokens + merges)")
        if not text:
            raise UserError("cannot train a bpe vocabulary on an empty text; give data.source some text")
        tokenizer = hf.Tokenizer(hf.models.BPE())
        tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                         initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
                                         special_tokens=[])
        tokenizer.train_from_iterator(_safe_chunks(text, cls._CHUNK_CHARS), trainer=trainer)
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, int32 [num_tokens]: exactly HF's ``encode(text).ids``, computed faster.

        The text is cut into ~64K-character chunks at points where the byte-level pre-tokenizer always
        splits (after a newline followed by visible ASCII), and the chunks are encoded in parallel.
        """
        chunks = _safe_chunks(text, self._CHUNK_CHARS)
        if not chunks:
            return np.zeros([0], np.int32)
        encodings = self.hf.encode_batch_fast(chunks, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        return self.hf.decode(ids.tolist(), skip_special_tokens=True)

    def token_str(self, token_id: int) -> str:
        """The token's text; bytes that are part of a character split across tokens show as ``\\xNN``."""
        token_id = int(token_id)
        if token_id in self._special_names:
            return self._special_names[token_id]
        raw = bytes(self._byte_of_char[c] for c in self.hf.id_to_token(token_id))
        return raw.decode("utf-8", errors="backslashreplace")

    def save(self, path: str) -> None:
        """HF's own JSON format (``tokenizers.Tokenizer.from_file`` reads it)."""
        _atomic_write(path, self.hf.to_str(pretty=True))


def tokenizer_path(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_FILE)


def build_tokenizer(data_cfg, train_text: str, workdir: str | None, *, charset_text: str | None = None):
    """The tokenizer for ``data_cfg.tokenizer``: loaded from WORKDIR/tokenizer.json if it exists, else built.

    Args:
      data_cfg: the ``config.data`` slice (``tokenizer``, ``vocab_size``).
      train_text: the training split's text: the BPE merges and the char vocabulary are learned from it.
      workdir: where tokenizer.json is saved / loaded; None = neither (tests).
      charset_text: chars only: a text whose every character the vocabulary must contain (default
        ``train_text``). ``build_dataset`` passes the whole corpus so that a character seen only in the
        validation split still has an id; only the set of characters, no statistic, comes from it.
    """
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if data_cfg.tokenizer not in ("chars", "bpe"):
        raise UserError(f"invalid data.tokenizer={data_cfg.tokenizer!r}: choose from bytes, chars, bpe")
    if workdir is not None and os.path.exists(tokenizer_path(workdir)):
        return load_tokenizer(data_cfg, workdir)
    if data_cfg.tokenizer == "chars":
        tokenizer = CharTokenizer.from_text(train_text if charset_text is None else charset_text)
    else:
        tokenizer = BpeTokenizer.train(train_text, data_cfg.vocab_size)
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(tokenizer_path(workdir))
        tokenizer.path = tokenizer_path(workdir)
    return tokenizer


def load_tokenizer(data_cfg, workdir: str):
    """The tokenizer a run in ``workdir`` was trained with (bytes needs no file)."""
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    path = tokenizer_path(workdir)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        content = json.loads(raw)
    except FileNotFoundError:
        raise UserError(f"no tokenizer at {path}: train a run in this workdir first "
                        f"(data.tokenizer={data_cfg.tokenizer} builds it from the data)") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"malformed tokenizer {path}: {_one_line(e)}; delete it to rebuild from the data") from None
    kind = _file_type(content)
    if kind != data_cfg.tokenizer:
        raise UserError(f"invalid data.tokenizer={data_cfg.tokenizer!r}: {path} holds a {kind} tokenizer; "
                        f"use data.tokenizer={kind} or a new workdir")
    if kind == "chars":
        chars = content.get("chars")
        if (not isinstance(chars, list) or not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars)
                or any(a >= b for a, b in zip(chars, chars[1:]))):
            raise UserError(f"malformed tokenizer {path}: 'chars' must be a list of distinct single characters "
                            f"in code-point order; delete it to rebuild from the data")
        return CharTokenizer(chars, path=path)
    try:
        tokenizer = hf.Tokenizer.from_str(raw)
    except Exception as e:  # the Rust side raises plain Exception
        raise UserError(f"malformed tokenizer {path}: {_one_line(e)}; delete it to rebuild from the data") from None
    return BpeTokenizer(tokenizer, path=path)


def _file_type(content) -> str:
    """'chars', 'bpe', 'bytes' or a description of what the JSON holds."""
    if isinstance(content, dict) and isinstance(content.get("type"), str):
        return content["type"]
    if isinstance(content, dict) and isinstance(content.get("model"), dict) and content["model"].get("type") == "BPE":
        return "bpe"
    return "unknown"


def _safe_chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at byte-level pre-tokenizer boundaries.

    After a newline that is followed by visible ASCII, the GPT-2 pre-tokenizer regex always starts a new
    pre-token (whitespace runs never absorb a following visible character, and the optional leading space
    of a word is a literal space, not a newline), and BPE never merges across pre-tokens, so encoding the
    pieces gives exactly the ids of encoding the whole text.
    """
    boundary = re.compile(r"\n(?=[!-~])")
    chunks, start = [], 0
    while start < len(text):
        match = boundary.search(text, start + size) if len(text) - start > size else None
        end = match.end() if match else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, which byte-level BPE uses to spell tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    return ids


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _write_json(path: str, content) -> None:
    _atomic_write(path, json.dumps(content, ensure_ascii=False, indent=1))


def _atomic_write(path: str, text: str) -> None:
    """Write via a per-process temporary file and rename, so readers (and other processes) never see half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
