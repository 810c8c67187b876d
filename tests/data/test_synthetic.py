"""Synthetic tasks: every example has the stated dependency distance, found by scanning its token STRINGS
(independently of the generator's index arithmetic); batches are deterministic and sharded consistently."""

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data
from jaxlm.data import synthetic
from jaxlm.errors import UserError


def make_config(task, *, distance=7, seq_len=16, num_symbols=3, filler="random", seed=0):
    c = config_lib.default_config()
    c.data.source = f"synthetic:{task}"
    c.data.distance, c.data.seq_len, c.data.num_symbols, c.data.filler = distance, seq_len, num_symbols, filler
    c.seed = seed
    return c


def strings(ds, row):
    return [ds.tokenizer.token_str(i) for i in row]


def check_recall(toks, d):
    bos = toks.index("[BOS]")
    q = toks.index("?")
    assert toks[q + 2] == "[EOS]"
    assert toks[q + 1] == toks[bos + 1]                  # the answer is the cue
    assert q - (bos + 1) == d                            # cue d tokens back from where the answer is predicted
    return [q]                                           # target index = input position of the prediction


def check_copy(toks, d, k):
    bos = toks.index("[BOS]")
    q = toks.index("?")
    answers = toks[q + 1:q + 1 + k]
    assert toks[q + 1 + k] == "[EOS]"
    assert answers == toks[bos + 1:bos + 1 + k]
    for j in range(k):                                   # answer j at q + 1 + j, its source at bos + 1 + j
        assert (q + 1 + j) - (bos + 1 + j) - 1 == d
    return list(range(q, q + k))


CLOSERS = {")": "(", "]": "[", "}": "{", ">": "<"}


def check_dyck(toks, d):
    stack, q = [], None
    for i, t in enumerate(toks):
        if t in CLOSERS.values():
            stack.append((i, t))
        elif t in CLOSERS:
            pos, opener = stack.pop()
            assert CLOSERS[t] == opener, "every closer matches the innermost open bracket"
            if q is not None and i == q + 1:
                assert q - pos == d, "the answer's opener is d tokens back from the query"
                assert toks[i + 1] == "[EOS]"
                return [q]
        elif t == "?":
            q = i
    raise AssertionError(f"no answer after the query in {toks}")


def check_adding(toks, d, n):
    eq = toks.index("=")
    marked = [i for i, t in enumerate(toks) if t.endswith("*")]
    assert len(marked) == 2 and marked[0] < marked[1] < eq
    assert eq - marked[0] == d
    total = sum(int(toks[i][:-1]) for i in marked)
    assert toks[eq + 1] == f"S{total}" and toks[eq + 2] == "[EOS]"
    assert all(t.isdigit() and int(t) < n for t in toks[1:eq] if not t.endswith("*"))
    return [eq]


@pytest.mark.parametrize("filler", ["random", "blank"])
@pytest.mark.parametrize("task", synthetic.TASKS)
@pytest.mark.parametrize("distance", [2, 9])
def test_examples_have_the_stated_distance(task, filler, distance):
    c = make_config(task, distance=distance, seq_len=synthetic.min_seq_len(task, distance, 4) + 3, filler=filler)
    ds = data.build_dataset(c, None)   # through the data package's dispatch
    assert isinstance(ds, synthetic.SyntheticDataset)
    batch = ds.train_batch(3, 32)
    assert batch["tokens"].shape == (32, c.data.seq_len + 1) and batch["tokens"].dtype == np.int32
    assert batch["weights"].shape == (32, c.data.seq_len) and batch["weights"].dtype == np.float32
    k = min(4, distance)
    for row, w in zip(batch["tokens"], batch["weights"]):
        toks = strings(ds, row)
        if task == "recall":
            targets = check_recall(toks, distance)
        elif task == "copy":
            targets = check_copy(toks, distance, k)
        elif task == "dyck":
            targets = check_dyck(toks, distance)
        else:
            targets = check_adding(toks, distance, c.data.num_symbols)
        np.testing.assert_array_equal(np.flatnonzero(w), targets)
    assert 0 <= batch["tokens"].min() and batch["tokens"].max() < ds.tokenizer.vocab_size


def test_fillers_random_vs_blank():
    rows = {f: data.build_dataset(make_config("recall", filler=f), None).train_batch(0, 64)["tokens"]
            for f in ("random", "blank")}
    blank = data.build_dataset(make_config("recall"), None).tokenizer.id("_")
    d = 7
    middle = slice(-d - 2, -3)   # the d - 1 distractors
    assert (rows["blank"][:, middle] == blank).all()
    assert len(np.unique(rows["random"][:, middle])) == 3 and not (rows["random"][:, middle] == blank).any()


def test_answers_are_balanced_over_symbols():
    ds = data.build_dataset(make_config("dyck", num_symbols=4), None)
    answers = ds.train_batch(0, 4000)["tokens"][:, -2]
    counts = np.bincount(answers - 4, minlength=4)
    assert counts.min() > 850, counts                     # uniform over the 4 closers (expected 1000 each)


def test_batches_are_deterministic_and_sharded():
    ds = data.build_dataset(make_config("copy"), None)
    a, b = ds.train_batch(5, 8), ds.train_batch(5, 8)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], ds.train_batch(6, 8)["tokens"])
    shards = [ds.train_batch(5, 8, process_index=i, process_count=2)["tokens"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards), a["tokens"])
    # a different seed trains on different examples but is evaluated on the same ones
    other = data.build_dataset(make_config("copy", seed=1), None)
    assert not np.array_equal(other.train_batch(5, 8)["tokens"], a["tokens"])
    e1, e2 = ds.eval_batches(8, 2), other.eval_batches(8, 2)
    for x, y in zip(e1, e2):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert not np.array_equal(e1[0]["tokens"], e1[1]["tokens"])
    assert not np.array_equal(e1[0]["tokens"], ds.train_batch(0, 8)["tokens"])


def test_seq_len_too_short_names_both_keys():
    need = synthetic.min_seq_len("recall", 10)
    data.build_dataset(make_config("recall", distance=10, seq_len=need), None)
    with pytest.raises(UserError, match=r"data\.distance=10.*data\.seq_len"):
        data.build_dataset(make_config("recall", distance=10, seq_len=need - 1), None)
    with pytest.raises(UserError, match=r"data\.distance"):
        data.build_dataset(make_config("adding", distance=1), None)
    with pytest.raises(UserError, match=r"data\.filler"):
        data.build_dataset(make_config("recall", filler="noise"), None)
    with pytest.raises(UserError, match=r"synthetic:recall"):
        data.build_dataset(make_config("nosuchtask"), None)
    with pytest.raises(UserError, match=r"train\.stateful"):
        data.build_dataset(make_config("recall"), None).train_batch(0, 4, stateful=True)
    with pytest.raises(UserError, match=r"train\.stateful"):
        data.build_dataset(make_config("recall"), None).eval_batches(4, 1, stateful=True)


def test_tokenizer_contract():
    tok = data.build_dataset(make_config("adding"), None).tokenizer
    assert tok.vocab_size == 3 + 3 + 1 + 5 + 6
    assert len(set(tok.special_ids)) == 6 and min(tok.special_ids) == tok.vocab_size - 6
    ids = tok.encode("1 2* = S3")
    assert tok.decode(ids) == "1 2* = S3"
    assert tok.decode(np.r_[tok.bos_id, ids, tok.pad_id]) == "1 2* = S3"
    with pytest.raises(UserError, match="unknown token"):
        tok.encode("9")


def test_mask_answers_hides_exactly_the_answers():
    ds = data.build_dataset(make_config("copy"), None)
    batch = ds.train_batch(0, 4)
    inputs, selected = synthetic.mask_answers(batch["tokens"], batch["weights"], ds.tokenizer.mask_id)
    inputs, selected = np.asarray(inputs), np.asarray(selected)
    originals = batch["tokens"][:, :-1]
    q = ds.tokenizer.id("?")
    for row, sel, orig in zip(inputs, selected, originals):
        qpos = int(np.flatnonzero(orig == q)[0])
        np.testing.assert_array_equal(np.flatnonzero(sel), np.arange(qpos + 1, qpos + 5))
        assert (row[sel] == ds.tokenizer.mask_id).all()
        np.testing.assert_array_equal(row[~sel], orig[~sel])
