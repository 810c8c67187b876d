"""Corpus sources: turn a ``data.source`` string into one text string.

Sources (DESIGN.md "Data contract"):

- ``builtin``: the Python standard library's own ``.py`` sources, so the default run needs no download.
- ``text:PATH_OR_GLOB``: one UTF-8 file, or every file a glob matches (sorted), joined with a blank line.
- ``jsonl:PATH:FIELD``: one JSON object per line; the string field FIELD of each, joined with a blank line.
- ``synthetic:TASK``: long-range tasks from ``jaxlm.data.synthetic`` (when that module exists); those are
  token batches rather than text, so ``jaxlm.data.build_dataset`` hands the whole config to that module.

Every bad input raises ``UserError`` with one line that names the ``data.source`` value and what is allowed.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os

from jaxlm.errors import UserError

KNOWN_SOURCES = "builtin, text:PATH_OR_GLOB, jsonl:PATH:FIELD or synthetic:TASK"
DOCUMENT_SEPARATOR = "\n\n"
SYNTHETIC_MODULE = "jaxlm.data.synthetic"

# Directories of the standard library left out of ``builtin``: third-party code, the (huge, repetitive)
# regression tests and their data files (lib2to3/tests/data holds deliberately broken and non-UTF-8 files),
# and IDLE (a GUI application, not library code).
_BUILTIN_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def read_text(source: str, *, max_bytes: int = 0) -> str:
    """Read the corpus named by ``source`` (a ``data.source`` value) as one string.

    Args:
      source: ``builtin`` | ``text:PATH_OR_GLOB`` | ``jsonl:PATH:FIELD`` | ``synthetic:TASK``.
      max_bytes: ``builtin`` only (``data.max_corpus_bytes``): keep at most this many UTF-8 bytes; 0 = all.
        Local files are read whole: the user chose them.

    Returns:
      The corpus text, never empty.
    """
    kind, sep, arg = source.partition(":")
    if kind == "builtin" and not sep:
        text = builtin_text(max_bytes)
    elif kind == "text" and arg:
        text = _read_text_files(source, arg)
    elif kind == "jsonl" and arg:
        text = _read_jsonl(source, arg)
    elif kind == "synthetic" and arg:
        module = synthetic_module(source)
        if not hasattr(module, "read_text"):
            raise UserError(f"invalid data.source={source!r}: synthetic tasks produce token batches, not text; "
                            f"use jaxlm.data.build_dataset")
        text = module.read_text(arg)
    else:
        raise UserError(f"invalid data.source={source!r}: use {KNOWN_SOURCES}")
    if not text:
        raise UserError(f"invalid data.source={source!r}: the corpus is empty; give a source with some text")
    return text


def check(source: str) -> None:
    """The checks of :func:`read_text` that open no file: the form of ``source`` and that its files exist.

    Cheap, so a launch runs it before importing JAX (jaxlm.preflight); read_text checks the contents."""
    kind, sep, arg = source.partition(":")
    if kind == "text" and arg:
        _resolve_paths(source, arg)
    elif kind == "jsonl" and arg:
        _resolve_paths(source, _jsonl_path_and_field(source, arg)[0], allow_glob=False)
    elif not ((kind == "builtin" and not sep) or (kind == "synthetic" and arg)):
        raise UserError(f"invalid data.source={source!r}: use {KNOWN_SOURCES}")


def synthetic_module(source: str):
    """The ``jaxlm.data.synthetic`` module, or a UserError if this build does not have it yet."""
    if importlib.util.find_spec(SYNTHETIC_MODULE) is None:
        raise UserError(f"invalid data.source={source!r}: synthetic tasks are not available in this build; "
                        f"use builtin, text:PATH_OR_GLOB or jsonl:PATH:FIELD")
    return importlib.import_module(SYNTHETIC_MODULE)


def builtin_files() -> list[str]:
    """Relative paths of the standard-library ``.py`` files in the ``builtin`` corpus, sorted (posix form).

    Sorting the relative paths (not trusting ``os.walk`` order, which depends on the file system) is what
    makes the corpus identical on every run with the same Python.
    """
    root = builtin_root()
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _BUILTIN_EXCLUDED_DIRS]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(directory, name), root)
                paths.append(rel.replace(os.sep, "/"))
    return sorted(paths)


def builtin_root() -> str:
    """The standard library's directory: where ``os.py`` lives."""
    return os.path.dirname(os.path.abspath(os.__file__))


def builtin_text(max_bytes: int = 0) -> str:
    """The ``builtin`` corpus: each stdlib file as ``# file: REL_PATH`` + its source, joined with a blank line.

    Files that are not UTF-8 are skipped. With ``max_bytes > 0`` reading stops once the corpus holds that
    many UTF-8 bytes (the last file is cut on a character boundary), so the default 4 MB cap reads only
    the first part of the sorted file list and costs a few tens of milliseconds.
    """
    root = builtin_root()
    parts, size = [], 0
    for rel in builtin_files():
        try:
            with open(os.path.join(root, *rel.split("/")), "rb") as f:
                raw = f.read()
            body = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        part = (DOCUMENT_SEPARATOR if parts else "") + f"# file: {rel}\n" + body
        encoded = part.encode("utf-8")
        if max_bytes and size + len(encoded) >= max_bytes:
            # errors="ignore" only drops a multi-byte character cut in half at the very end.
            parts.append(encoded[: max_bytes - size].decode("utf-8", errors="ignore"))
            break
        parts.append(part)
        size += len(encoded)
    return "".join(parts)


def _read_text_files(source: str, pattern: str) -> str:
    """``text:PATH_OR_GLOB``: one file as is, or the sorted glob matches joined with a blank line."""
    paths = _resolve_paths(source, pattern)
    return DOCUMENT_SEPARATOR.join(_read_utf8(source, p) for p in paths)


def _read_jsonl(source: str, arg: str) -> str:
    """``jsonl:PATH:FIELD``: the string field FIELD of each JSON line, documents joined with a blank line."""
    path, field = _jsonl_path_and_field(source, arg)
    (path,) = _resolve_paths(source, path, allow_glob=False)
    docs = []
    for lineno, line in enumerate(_read_utf8(source, path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid data.source={source!r}: {where} is not JSON ({e.msg}); "
                            f"give one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"invalid data.source={source!r}: {where} is a {type(record).__name__}, "
                            f"not a JSON object with a {field!r} field")
        if field not in record:
            keys = ", ".join(sorted(map(str, record))[:10]) or "none"
            raise UserError(f"invalid data.source={source!r}: {where} has no field {field!r} (its fields: {keys})")
        if not isinstance(record[field], str):
            raise UserError(f"invalid data.source={source!r}: {where} field {field!r} is a "
                            f"{type(record[field]).__name__}, not a string")
        docs.append(record[field])
    return DOCUMENT_SEPARATOR.join(docs)


def _jsonl_path_and_field(source: str, arg: str) -> tuple[str, str]:
    """``PATH:FIELD`` of a ``jsonl:PATH:FIELD`` source."""
    path, sep, field = arg.rpartition(":")
    if not sep or not path or not field:
        raise UserError(f"invalid data.source={source!r}: use jsonl:PATH:FIELD (FIELD = the JSON key holding the text)")
    return path, field


def _resolve_paths(source: str, pattern: str, *, allow_glob: bool = True) -> list[str]:
    """The files a PATH or GLOB names (sorted), or a UserError saying why there are none."""
    pattern = os.path.expanduser(pattern)
    if allow_glob and glob.has_magic(pattern):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"invalid data.source={source!r}: the glob {pattern!r} matches no file")
        return paths
    if os.path.isdir(pattern):
        hint = "a file or a glob such as " + os.path.join(pattern, "*.txt") if allow_glob else "a .jsonl file"
        raise UserError(f"invalid data.source={source!r}: {pattern} is a directory; give {hint}")
    if not os.path.isfile(pattern):
        raise UserError(f"invalid data.source={source!r}: no such file {pattern}")
    return [pattern]


def _read_utf8(source: str, path: str) -> str:
    """A file's text, or a UserError if it cannot be read or is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"invalid data.source={source!r}: cannot read {path} ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"invalid data.source={source!r}: {path} is not UTF-8 text "
                        f"(byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise UserError(f"invalid data.source={source!r}: {path} is binary, not text (NUL byte at offset {nul})")
    return text
