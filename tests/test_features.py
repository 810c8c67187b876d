"""Contextual features, ELMo embeddings and BERT fill-in-the-blank on small trained runs."""

import numpy as np
import pytest

from jaxlm import features
from jaxlm.config import default_config
from jaxlm.errors import UserError
from jaxlm.train import loop

TEXT = "to be or not to be, that is the question. " * 60


def tiny_run(tmp_path_factory, name, steps, **overrides):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text(TEXT)
    c = default_config()
    c.model.name, c.model.num_layers, c.model.d_model, c.model.num_heads = name, 2, 32, 2
    c.model.hidden_size, c.model.max_len = 48, 32
    c.data.source, c.data.tokenizer, c.data.seq_len = f"text:{corpus}", "chars", 32
    c.train.steps, c.train.batch_size, c.train.log_every = steps, 16, 10
    c.train.eval_every = c.train.checkpoint_every = steps
    c.train.eval_batches, c.train.sample_length = 1, 0
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 10, 0.0
    for key, value in overrides.items():
        section, leaf = key.split("__")
        c[section][leaf] = value
    workdir = str(tmp_path_factory.mktemp(name))
    loop.train(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    return tiny_run(tmp_path_factory, "gpt", 2)


def test_features_do_not_depend_on_batch_padding_or_the_future(gpt_run):
    """A text's features are the same alone, batched with a longer text, and as a prefix of a longer text."""
    alone = features.contextual_features(gpt_run, ["to be"], layer=-1)[0]
    batched = features.contextual_features(gpt_run, ["to be", "to be or not to be"], layer=-1)
    assert alone.shape == (5, 32) and batched[1].shape == (18, 32)
    np.testing.assert_allclose(alone, batched[0], atol=1e-5)
    np.testing.assert_allclose(alone, batched[1][:5], atol=1e-5)
    first = features.contextual_features(gpt_run, ["to be"], layer=0)[0]
    assert not np.allclose(first, alone)
    with pytest.raises(UserError, match="layer=7"):
        features.contextual_features(gpt_run, ["to be"], layer=7)


def test_elmo_embeddings_have_the_stated_shape_and_padding_does_not_leak(tmp_path_factory):
    run = tiny_run(tmp_path_factory, "elmo", 2)
    reps = features.elmo_embeddings(run, ["to be", "that is the question"])
    assert reps[0].shape == (3, 5, 64) and reps[1].shape == (3, 20, 64)   # [L+1, T, 2d]
    np.testing.assert_allclose(reps[0][0, :, :32], reps[0][0, :, 32:])    # layer 0 = [x; x]
    alone = features.elmo_embeddings(run, ["to be"])[0]
    np.testing.assert_allclose(alone, reps[0], atol=1e-5)                 # the backward pass saw no padding
    with pytest.raises(UserError, match="elmo"):
        features.elmo_embeddings(tiny_run(tmp_path_factory, "lstm", 1), ["x"])


def test_bert_fills_in_the_blank_of_the_text_it_learned(tmp_path_factory):
    run = tiny_run(tmp_path_factory, "bert", 700, objective__mask_prob=0.3, model__d_model=64, train__batch_size=32)
    tables = features.fill_mask(run, "to be or n[MASK]t to be, that is the question.", top_k=3)
    assert len(tables) == 1 and len(tables[0]) == 3
    probs = [p for _, p in tables[0]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert tables[0][0][0] == "o", tables


def test_fill_mask_serves_any_masked_lm_run_and_refuses_a_causal_one(tmp_path_factory, gpt_run):
    """An lstm trained with objective.name=masked_lm fills blanks like bert: the table is the softmax of its logits
    at the [MASK] (specials excluded), recomputed here from a plain forward pass; a causal_lm run is refused."""
    import jax
    import jax.numpy as jnp
    from jaxlm import runs
    workdir = tiny_run(tmp_path_factory, "lstm", 2, objective__name="masked_lm")
    table = features.fill_mask(workdir, "to b[MASK] or", top_k=4)[0]
    run = runs.load(workdir)
    ids = [*run.tokenizer.encode("to b"), run.tokenizer.mask_id, *run.tokenizer.encode(" or")]
    probs = np.asarray(jax.nn.softmax(run.model(jnp.asarray([ids], jnp.int32))[0][0, 4]), np.float64)
    probs[list(run.tokenizer.special_ids)] = 0.0
    want = np.argsort(-probs)[:4]
    assert [t for t, _ in table] == [run.tokenizer.token_str(int(i)) for i in want]
    np.testing.assert_allclose([p for _, p in table], probs[want], rtol=1e-5)
    with pytest.raises(UserError, match="causal_lm"):
        features.fill_mask(gpt_run, "to b[MASK]", top_k=2)
