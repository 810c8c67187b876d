"""Tokenizers: exact round trips, specials after the vocabulary, tokenizer.json save/load, one-line errors."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tokenizers as hf

from jaxlm.data import tokenizers
from jaxlm.errors import UserError

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
TRICKY = ("héllo  wörld\n\n\t x [PAD] [EOS] 日本語 🎉\r\n  end   \n\n\n    def f(x):\n\treturn x  # ünï\n"
          "   trailing spaces   \n\u00a0nbsp \u2028ls \x00nul \x1cfs\n")


def _data_cfg(tokenizer, vocab_size=0):
    return ml_collections.ConfigDict({"tokenizer": tokenizer, "vocab_size": vocab_size})


def _training_text():
    """A few KB with repeated words (so BPE has merges to learn) and non-ASCII text."""
    words = "the quick brown fox jumps over the lazy dog; naïve café, déjà vu — 東京 と 大阪".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(150)]
    return "\n".join(lines) + "\n    indented(code) = [1, 2, 3]\n" * 20


def _assert_one_line(error, *needles):
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def _assert_specials(tok, first):
    assert tok.special_ids == tuple(range(first, first + 6)) == (
        tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    assert tok.vocab_size == first + 6
    assert [tok.token_str(i) for i in tok.special_ids] == list(tokenizers.SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------- bytes


def test_bytes_round_trip_and_ids_are_utf8_bytes():
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(TRICKY)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, list(TRICKY.encode("utf-8")))
    assert tok.decode(ids) == TRICKY
    _assert_specials(tok, 256)


def test_bytes_decode_skips_specials_and_replaces_cut_characters():
    tok = tokenizers.ByteTokenizer()
    ids = np.concatenate([[tok.bos_id], tok.encode("é!"), [tok.eos_id, tok.pad_id]])
    assert tok.decode(ids) == "é!"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # half a character (a cut sample): no crash
    assert tok.token_str(ord("a")) == "a" and tok.token_str(0xC3) == "<0xC3>"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


# ---------------------------------------------------------------------------------------------- chars


def test_chars_vocab_is_sorted_charset_then_specials():
    tok = tokenizers.CharTokenizer.from_text("banana\n")
    assert tok.chars == ("\n", "a", "b", "n")
    np.testing.assert_array_equal(tok.encode("banana\n"), [2, 1, 3, 1, 3, 1, 0])
    _assert_specials(tok, 4)
    assert tok.decode([tok.bos_id, 2, 1, tok.eos_id]) == "ba"


def test_chars_round_trip_non_ascii_and_save_load_identical(tmp_path):
    tok = tokenizers.build_tokenizer(_data_cfg("chars"), TRICKY, str(tmp_path))
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved == {"type": "chars", "chars": sorted(set(TRICKY))}
    loaded = tokenizers.load_tokenizer(_data_cfg("chars"), str(tmp_path))
    assert loaded.chars == tok.chars and loaded.special_ids == tok.special_ids
    np.testing.assert_array_equal(loaded.encode(TRICKY), tok.encode(TRICKY))


def test_chars_build_reuses_existing_tokenizer_json(tmp_path):
    first = tokenizers.build_tokenizer(_data_cfg("chars"), "abc", str(tmp_path))
    again = tokenizers.build_tokenizer(_data_cfg("chars"), "xyz", str(tmp_path))  # resume: file wins
    assert again.chars == first.chars == ("a", "b", "c")


def test_chars_charset_text_widens_the_vocabulary():
    tok = tokenizers.build_tokenizer(_data_cfg("chars"), "abc", None, charset_text="abcz")
    assert tok.chars == ("a", "b", "c", "z")


def test_chars_unknown_character_is_a_one_line_user_error():
    tok = tokenizers.CharTokenizer.from_text("abc")
    with pytest.raises(UserError) as error:
        tok.encode("ab\nc")
    _assert_one_line(error, "'\\n'", "U+000A", "offset 2", "data.tokenizer=bytes")
    with pytest.raises(UserError) as error:
        tok.encode("abcé")  # beyond the largest code point in the vocabulary
    _assert_one_line(error, "'é'", "offset 3")


def test_chars_encoding_is_vectorised_and_fast():
    text = "".join(chr(c) for c in range(32, 400)) * 11_000  # ~4 M characters
    tok = tokenizers.CharTokenizer.from_text(text[:368])
    import time
    start = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - start < 2.0
    assert len(ids) == len(text) and tok.decode(ids[:1000]) == text[:1000]


# ---------------------------------------------------------------------------------------------- bpe


@pytest.fixture(scope="module")
def bpe():
    return tokenizers.BpeTokenizer.train(_training_text(), 400)


def test_bpe_learns_merges_and_specials_follow_the_vocabulary(bpe):
    assert 256 < bpe.vocab_size <= 400
    _assert_specials(bpe, bpe.vocab_size - 6)
    text = "the quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))  # merges were learned and are used


def test_bpe_round_trips_exactly(bpe):
    for text in [TRICKY, _training_text(), "", " ", "\n", "   leading", "[MASK][SEP]", "a" * 1000]:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32
        assert bpe.decode(ids) == text


def test_bpe_literal_special_strings_are_text_not_special_ids(bpe):
    ids = bpe.encode("[PAD] [MASK] [CLS] [SEP] [BOS] [EOS]")
    assert not set(ids.tolist()) & set(bpe.special_ids)


def test_bpe_specials_are_single_ids_and_decode_skips_them(bpe):
    assert len(set(bpe.special_ids)) == 6
    for token, i in zip(tokenizers.SPECIAL_TOKENS, bpe.special_ids):
        assert bpe.hf.token_to_id(token) == i
    body = bpe.encode("the fox")
    assert bpe.decode(np.concatenate([[bpe.bos_id], body, [bpe.eos_id, bpe.pad_id]])) == "the fox"


def test_bpe_chunked_encode_equals_hf_whole_text_encode(bpe, monkeypatch):
    monkeypatch.setattr(tokenizers.BpeTokenizer, "_CHUNK_CHARS", 64)  # many chunks in a few KB
    text = _training_text() + TRICKY + _training_text()
    assert len(tokenizers._safe_chunks(text, 64)) > 10
    np.testing.assert_array_equal(bpe.encode(text), bpe.hf.encode(text, add_special_tokens=False).ids)


def test_bpe_save_load_identical_and_hf_format(bpe, tmp_path):
    cfg = _data_cfg("bpe", 400)
    built = tokenizers.build_tokenizer(cfg, _training_text(), str(tmp_path))
    path = tmp_path / "tokenizer.json"
    assert built.hf.to_str() == bpe.hf.to_str()  # training is deterministic
    assert hf.Tokenizer.from_file(str(path)).get_vocab_size() == built.vocab_size  # HF's own format
    loaded = tokenizers.load_tokenizer(cfg, str(tmp_path))
    assert loaded.vocab_size == built.vocab_size and loaded.special_ids == built.special_ids
    np.testing.assert_array_equal(loaded.encode(TRICKY), built.encode(TRICKY))
    assert loaded.decode(loaded.encode(TRICKY)) == TRICKY
    strings = [(loaded.token_str(i), built.token_str(i)) for i in range(built.vocab_size)]
    assert all(a == b for a, b in strings)


def test_bpe_token_str_is_readable(bpe):
    ids = bpe.encode(" the")
    assert "".join(bpe.token_str(i) for i in ids) == " the"
    assert bpe.token_str(bpe.encode("é")[0]) in ("é", "\\xc3")


def test_bpe_too_small_vocab_is_user_error():
    with pytest.raises(UserError) as error:
        tokenizers.BpeTokenizer.train("abc", 100)
    _assert_one_line(error, "data.vocab_size=100")


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tinyshakespeare.txt not present")
def test_bpe_on_tinyshakespeare_round_trips():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    tok = tokenizers.BpeTokenizer.train(text[:200_000], 1000)
    assert tok.vocab_size == 1000
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # a real compression (~2.3 chars per token at 1000), not bytes


# ---------------------------------------------------------------------------------------------- loading


def test_load_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(UserError) as error:
        tokenizers.load_tokenizer(_data_cfg("chars"), str(tmp_path))
    _assert_one_line(error, str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"type": "chars", "chars": ["ab"]}',
                                     '{"type": "chars", "chars": ["b", "a"]}', "\x89PNG"])
def test_load_malformed_tokenizer_names_the_path(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content, encoding="latin-1")
    with pytest.raises(UserError) as error:
        tokenizers.load_tokenizer(_data_cfg("chars"), str(tmp_path))
    _assert_one_line(error, str(tmp_path / "tokenizer.json"))


def test_load_malformed_bpe_json_names_the_path(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(UserError) as error:
        tokenizers.load_tokenizer(_data_cfg("bpe", 400), str(tmp_path))
    _assert_one_line(error, str(tmp_path / "tokenizer.json"), "malformed")


def test_load_type_mismatch_is_user_error(tmp_path):
    tokenizers.build_tokenizer(_data_cfg("chars"), "abc", str(tmp_path))
    with pytest.raises(UserError) as error:
        tokenizers.load_tokenizer(_data_cfg("bpe", 400), str(tmp_path))
    _assert_one_line(error, "data.tokenizer='bpe'", "chars tokenizer")
    with pytest.raises(UserError):
        tokenizers.build_tokenizer(_data_cfg("bpe", 400), "abc", str(tmp_path))


def test_bytes_needs_no_file(tmp_path):
    tok = tokenizers.build_tokenizer(_data_cfg("bytes"), "abc", str(tmp_path))
    assert tok.vocab_size == 262 and not os.listdir(tmp_path)
    assert tokenizers.load_tokenizer(_data_cfg("bytes"), str(tmp_path)).vocab_size == 262
