"""Batches: pure functions of (seed, step, process); shards tile the global batch; streams continue; Dataset."""

import os
import time

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm.data import batching
from jaxlm.errors import UserError

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
TOKENS = np.arange(1000, dtype=np.int32) * 7 % 1009  # distinct values: a window's position is recoverable


def _position(window):
    """Start offset in TOKENS of a window, asserting it is a contiguous slice."""
    start = int(np.flatnonzero(TOKENS == window[0])[0])
    np.testing.assert_array_equal(window, TOKENS[start:start + len(window)])
    return start


# ---------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("n, fraction, n_valid", [(1000, 0.1, 100), (1001, 0.1, 100), (10, 0.25, 2), (7, 0.0, 0)])
def test_split_is_contiguous_disjoint_valid_last(n, fraction, n_valid):
    tokens = np.arange(n)
    train, valid = batching.split_tokens(tokens, fraction)
    assert len(valid) == n_valid
    np.testing.assert_array_equal(np.concatenate([train, valid]), tokens)


# ---------------------------------------------------------------------------------------------- random


def test_random_windows_are_a_pure_function_of_seed_and_step():
    def batch(seed, step):
        return batching.random_windows(TOKENS, seed=seed, step=step, batch_size=8, length=17)

    a = batch(0, 5)
    assert a.shape == (8, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, batch(0, 5))
    assert not np.array_equal(a, batch(0, 6)) and not np.array_equal(a, batch(1, 5))
    starts = [_position(row) for row in a]
    expected = np.random.default_rng((0, 5)).integers(0, len(TOKENS) - 17 + 1, size=8)
    np.testing.assert_array_equal(starts, expected)


def test_random_windows_cover_the_whole_split():
    starts = np.concatenate([[_position(r) for r in batching.random_windows(
        TOKENS, seed=3, step=s, batch_size=16, length=10)] for s in range(200)])
    assert starts.min() < 10 and starts.max() > len(TOKENS) - 10 - 10  # both ends are reachable


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_random_windows_process_shards_tile_the_global_batch(process_count):
    full = batching.random_windows(TOKENS, seed=1, step=9, batch_size=8, length=5)
    shards = [batching.random_windows(TOKENS, seed=1, step=9, batch_size=8, length=5,
                                      process_index=i, process_count=process_count) for i in range(process_count)]
    assert all(s.shape == (8 // process_count, 5) for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards), full)


# ---------------------------------------------------------------------------------------------- streams


def test_stream_windows_continue_across_steps_and_wrap_in_their_span():
    batch, length = 4, 9
    span = len(TOKENS) // batch
    steps = [batching.stream_windows(TOKENS, step=k, batch_size=batch, length=length) for k in range(80)]
    for b in range(batch):
        np.testing.assert_array_equal(steps[0][b], TOKENS[b * span:b * span + length])
        for k in range(len(steps) - 1):
            assert steps[k + 1][b, 0] == steps[k][b, -1]
        # Concatenating the rows (minus the one-token overlap) walks the stream span cyclically.
        walk = np.concatenate([steps[0][b]] + [s[b, 1:] for s in steps[1:]])
        expected = TOKENS[b * span + np.arange(len(walk)) % span]
        np.testing.assert_array_equal(walk, expected)


def test_stream_windows_shards_tile_the_global_batch():
    full = batching.stream_windows(TOKENS, step=13, batch_size=6, length=11)
    shards = [batching.stream_windows(TOKENS, step=13, batch_size=6, length=11, process_index=i, process_count=3)
              for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), full)


# ---------------------------------------------------------------------------------------------- eval


def test_eval_windows_are_deterministic_and_evenly_spread():
    batches = batching.eval_windows(TOKENS, batch_size=4, num_batches=3, length=20)
    assert len(batches) == 3 and all(b.shape == (4, 20) for b in batches)
    starts = np.array([_position(row) for b in batches for row in b])
    assert starts[0] == 0 and starts[-1] == len(TOKENS) - 20
    gaps = np.diff(starts)
    assert gaps.min() >= 89 and gaps.max() <= 90  # (1000 - 20) / 11 = 89.1
    again = batching.eval_windows(TOKENS, batch_size=4, num_batches=3, length=20)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a, b)
    shards = [batching.eval_windows(TOKENS, batch_size=4, num_batches=3, length=20, process_index=i,
                                    process_count=2) for i in range(2)]
    for i, b in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([shards[0][i], shards[1][i]]), b)


# ---------------------------------------------------------------------------------------------- errors


def _assert_user_error(fn, *needles):
    with pytest.raises(UserError) as error:
        fn()
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_too_short_splits_name_the_sizes():
    short = np.arange(10)
    _assert_user_error(lambda: batching.random_windows(short, seed=0, step=0, batch_size=2, length=11),
                       "10 tokens", "window of 11", "data.seq_len")
    _assert_user_error(lambda: batching.eval_windows(short, batch_size=2, num_batches=1, length=11),
                       "valid split", "10 tokens")
    _assert_user_error(lambda: batching.stream_windows(short, step=0, batch_size=4, length=3),
                       "4 streams", "2 tokens each", "train.batch_size")
    _assert_user_error(lambda: batching.random_windows(TOKENS, seed=0, step=0, batch_size=6, length=3,
                                                       process_count=4),
                       "train.batch_size=6", "(4)")


# ---------------------------------------------------------------------------------------------- Dataset


def _config(source, tokenizer="chars", seq_len=16, **data):
    config = config_lib.default_config()
    config.data.source, config.data.tokenizer, config.data.seq_len = source, tokenizer, seq_len
    for key, value in data.items():
        config.data[key] = value
    return config


def test_dataset_chars_with_a_valid_only_character(tmp_path):
    text = "abcab cabc\n" * 50 + "zé!"  # z, é and ! occur only in the validation tail
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    dataset = data.build_dataset(_config(f"text:{tmp_path}/c.txt"), str(tmp_path / "run"))
    tok = dataset.tokenizer
    assert {"z", "é", "!"} <= set(tok.chars)
    assert tok.decode(np.concatenate([dataset.train_tokens, dataset.valid_tokens])) == text
    assert len(dataset.valid_tokens) == round(len(text) * 0.1)
    batch = dataset.train_batch(3, 8)
    assert batch["tokens"].shape == (8, 17) and batch["tokens"].dtype == np.int32
    np.testing.assert_array_equal(batch["tokens"], dataset.train_batch(3, 8)["tokens"])
    evals = dataset.eval_batches(2, 3)
    assert len(evals) == 3 and evals[0]["tokens"].shape == (2, 17)
    np.testing.assert_array_equal(evals[-1]["tokens"][-1], dataset.valid_tokens[-17:])
    stream = [dataset.train_batch(k, 4, stateful=True)["tokens"] for k in range(2)]
    np.testing.assert_array_equal(stream[1][:, 0], stream[0][:, -1])
    assert os.path.exists(tmp_path / "run" / "tokenizer.json")


def test_dataset_shards_concatenate_to_the_global_batch():
    dataset = data.build_dataset(_config("builtin", "bytes", max_corpus_bytes=50_000), None)
    full = dataset.train_batch(7, 8)["tokens"]
    shards = [dataset.train_batch(7, 8, process_index=i, process_count=2)["tokens"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards), full)
    assert dataset.tokenizer.decode(dataset.train_tokens[:8]) == "# file: "


def test_dataset_builtin_bytes_default_is_fast():
    start = time.perf_counter()
    dataset = data.build_dataset(config_lib.default_config(), None)
    assert time.perf_counter() - start < 2.0
    assert len(dataset.train_tokens) == 3_600_000 and len(dataset.valid_tokens) == 400_000


def test_dataset_bpe_token_cache_is_reused_and_keyed_on_the_text(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 300)
    run = str(tmp_path / "run")
    config = _config(f"text:{tmp_path}/a.txt", "bpe", vocab_size=300)
    first = data.build_dataset(config, run)
    assert os.path.exists(os.path.join(run, data.TOKEN_CACHE_FILE))
    second = data.build_dataset(config, run)
    np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
    (tmp_path / "a.txt").write_text("the dog sat on the log\n" * 300)  # same vocabulary file, new text
    third = data.build_dataset(config, run)
    assert third.tokenizer.decode(third.train_tokens).startswith("the dog")


def test_dataset_too_short_for_seq_len(tmp_path):
    (tmp_path / "s.txt").write_text("x" * 100)
    _assert_user_error(lambda: data.build_dataset(_config(f"text:{tmp_path}/s.txt", seq_len=64), None),
                       "data.seq_len=64", "valid split", "10 tokens (chars)", "= 65")


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tinyshakespeare.txt not present")
def test_dataset_tinyshakespeare_chars_matches_nanogpt_vocabulary(tmp_path):
    dataset = data.build_dataset(_config(f"text:{SHAKESPEARE}"), str(tmp_path))
    assert dataset.tokenizer.vocab_size == 65 + 6  # nanoGPT's shakespeare_char has 65 characters
    assert len(dataset.train_tokens) + len(dataset.valid_tokens) == 1115394
