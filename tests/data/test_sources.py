"""Corpus sources: the built-in stdlib corpus is reproducible; local files read exactly; bad input is one line."""

import importlib.util
import json
import os
import pathlib

import pytest

from jaxlm.data import sources
from jaxlm.errors import UserError


def _error(source, read=sources.read_text):
    """The UserError message of ``read(source)``, checked to be one line naming the source value."""
    with pytest.raises(UserError) as error:
        read(source)
    message = str(error.value)
    assert "\n" not in message
    assert repr(source) in message, message
    return message


# ---------------------------------------------------------------------------------------------- builtin


def test_builtin_is_deterministic_nonempty_stdlib_code():
    first = sources.read_text("builtin", max_bytes=300_000)
    second = sources.read_text("builtin", max_bytes=300_000)
    assert first == second
    assert 290_000 < len(first.encode("utf-8")) <= 300_000
    assert first.startswith("# file: __future__.py\n")
    assert "\ndef " in first and "\nimport " in first and "\nclass " in first


def test_builtin_cap_zero_reads_every_file_in_sorted_order():
    text = sources.read_text("builtin", max_bytes=0)
    files = sources.builtin_files()
    assert files == sorted(files) and "os.py" in files and "json/decoder.py" in files
    headers = [line[len("# file: "):] for line in text.split("\n") if line.startswith("# file: ")]
    assert [h for h in headers if h in set(files)] == [h for h in files if h in set(headers)]
    assert "# file: os.py\n" + pathlib.Path(os.__file__).read_text(encoding="utf-8") in text
    capped = sources.read_text("builtin", max_bytes=1000)
    assert text.startswith(capped)


def test_builtin_excludes_tests_site_packages_idlelib():
    for rel in sources.builtin_files():
        parts = rel.split("/")[:-1]
        assert not {"test", "tests", "site-packages", "idlelib"} & set(parts), rel
        assert rel.endswith(".py")


def test_builtin_skips_non_utf8_files(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_bytes(b"y = '\xff'\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "c.py").write_text("skipped = True\n")
    monkeypatch.setattr(sources, "builtin_root", lambda: str(tmp_path))
    assert sources.read_text("builtin") == "# file: a.py\nx = 1\n"


# ---------------------------------------------------------------------------------------------- text


def test_text_file_is_read_exactly(tmp_path):
    content = "héllo\r\n  wörld\n\n日本\t\n"
    (tmp_path / "a.txt").write_bytes(content.encode("utf-8"))
    assert sources.read_text(f"text:{tmp_path / 'a.txt'}") == content


def test_text_glob_concatenates_sorted_matches(tmp_path):
    for name, body in [("b.txt", "second"), ("a.txt", "first"), ("c.md", "ignored")]:
        (tmp_path / name).write_text(body)
    (tmp_path / "d.txt").mkdir()  # a directory matching the glob is not a file
    assert sources.read_text(f"text:{tmp_path}/*.txt") == "first\n\nsecond"


def test_text_errors_name_the_value(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "empty.txt").write_text("")
    assert "no such file" in _error(f"text:{tmp_path}/missing.txt")
    assert "matches no file" in _error(f"text:{tmp_path}/*.nothing")
    assert "is a directory" in _error(f"text:{tmp_path}")
    message = _error(f"text:{tmp_path}/x.bin")
    assert "x.bin is not UTF-8 text (byte 0x89 at offset 0)" in message
    assert "NUL byte at offset 3" in _error(f"text:{tmp_path}/nul.txt")
    assert "empty" in _error(f"text:{tmp_path}/empty.txt")


# ---------------------------------------------------------------------------------------------- jsonl


def test_jsonl_joins_the_field_of_each_line(tmp_path):
    lines = [json.dumps({"text": "doc one\nline", "id": 1}), "", json.dumps({"text": "dóc two"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert sources.read_text(f"jsonl:{tmp_path}/d.jsonl:text") == "doc one\nline\n\ndóc two"


@pytest.mark.parametrize("line, needle", [
    ("{bad json", "line 2 is not JSON"),
    ("[1, 2]", "line 2 is a list"),
    ('{"body": "x"}', "line 2 has no field 'text' (its fields: body)"),
    ('{"text": 3}', "line 2 field 'text' is a int"),
])
def test_jsonl_bad_lines(tmp_path, line, needle):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    assert needle in _error(f"jsonl:{tmp_path}/d.jsonl:text")


def test_jsonl_bad_spec(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n')
    assert "jsonl:PATH:FIELD" in _error(f"jsonl:{tmp_path}/d.jsonl")
    assert "no such file" in _error(f"jsonl:{tmp_path}/missing.jsonl:text")
    assert "is a directory" in _error(f"jsonl:{tmp_path}:text")


def test_check_raises_what_read_text_raises_and_opens_no_file(tmp_path, monkeypatch):
    """sources.check (run before JAX is imported) gives read_text's own message for every form or path error,
    and passes every source read_text could read without opening a file (contents are read_text's job)."""
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n')
    for source in (f"text:{tmp_path}/missing.txt", f"text:{tmp_path}/*.nothing", f"text:{tmp_path}",
                   f"jsonl:{tmp_path}/d.jsonl", f"jsonl:{tmp_path}/missing.jsonl:text", f"jsonl:{tmp_path}:text",
                   "foo:bar", "builtin:x", "text:", ""):
        assert _error(source, sources.check) == _error(source), source

    def no_open(*args, **kwargs):
        raise AssertionError(f"opened {args[0]}")
    monkeypatch.setattr("builtins.open", no_open)
    for source in ("builtin", f"text:{tmp_path}/a.txt", f"text:{tmp_path}/*.txt", f"jsonl:{tmp_path}/d.jsonl:text",
                   "synthetic:copy"):
        assert sources.check(source) is None, source


# ---------------------------------------------------------------------------------------------- kinds


@pytest.mark.parametrize("source", ["foo:bar", "builtin:x", "text:", "jsonl:", "Builtin", ""])
def test_unknown_source_lists_the_known_ones(source):
    assert "builtin, text:PATH_OR_GLOB, jsonl:PATH:FIELD" in _error(source)


@pytest.mark.skipif(importlib.util.find_spec("jaxlm.data.synthetic") is not None,
                    reason="jaxlm.data.synthetic exists: its own tests cover synthetic sources")
def test_synthetic_without_module_is_user_error():
    assert "builtin, text:PATH_OR_GLOB or jsonl:PATH:FIELD" in _error("synthetic:copy")
