"""Every experiments/*.py parses, validates, builds its model and trains one step; comparisons are fair."""

import glob
import importlib.util
import os

import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib, models
from jaxlm.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def param_count(config, vocab_size=103):
    model = nnx.eval_shape(lambda: models.build_model(config.model, vocab_size, 0))
    return models.count_params(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_builds_and_trains_one_step(path, tmp_path):
    config = load(path)
    config_lib.validate(config)
    source = config.data.source
    if source.startswith("text:") and not glob.glob(source[5:]):
        pytest.skip(f"{source} is absent on this machine")
    config.train.steps, config.train.eval_batches, config.train.sample_length = 1, 1, 4
    config.train.batch_size = 4
    config.data.max_corpus_bytes = 200_000     # the step, not the corpus, is under test
    if config.data.tokenizer == "bpe":
        config.data.vocab_size = 512
    metrics = loop.train(config, str(tmp_path))
    assert np.isfinite(metrics["eval/loss"])
    assert os.path.isdir(tmp_path / "checkpoints" / "1")


@pytest.mark.parametrize("name", ["rnn_char", "lstm_char", "elmo_char", "bert_char"])
def test_char_models_match_the_gpt_parameter_count(name):
    """LSTM-vs-transformer comparisons are fair only at matched capacity: within 10% of gpt_char."""
    gpt = param_count(load(os.path.join(ROOT, "experiments", "gpt_char.py")))
    other = param_count(load(os.path.join(ROOT, "experiments", f"{name}.py")))
    assert abs(other - gpt) / gpt < 0.10, (name, other, gpt)


def test_only_a_bert_trained_as_a_causal_lm_is_flagged():
    """A bidirectional encoder under causal_lm sees each target (a leak the run log names); no shipped
    experiment, and no other model/objective pairing, draws a note."""
    assert all(config_lib.caveats(load(path)) == [] for path in EXPERIMENTS)
    bert = load(os.path.join(ROOT, "experiments", "bert_char.py"))
    for name, objective in [("bert", ""), ("bert", "masked_lm"), ("gpt", "causal_lm"), ("gpt", "masked_lm"),
                            ("lstm", "masked_lm"), ("bert", "causal_lm")]:
        bert.model.name, bert.objective.name = name, objective
        notes = config_lib.caveats(bert)
        leaks = (name, objective) == ("bert", "causal_lm")
        assert len(notes) == leaks and all("sees the token it predicts" in n for n in notes), (name, objective, notes)


def test_a_position_encoding_that_cannot_act_is_flagged():
    """rope/none on a recurrent model change nothing, and none on a bert leaves it a bag of words: both noted."""
    config = load(os.path.join(ROOT, "experiments", "gpt_char.py"))
    expected = {("gpt", "rope"): "", ("gpt", "none"): "", ("bert", "rope"): "", ("lstm", "learned"): "",
                ("lstm", "rope"): "has no effect on model.name=lstm", ("elmo", "none"): "has no effect",
                ("bert", "none"): "bag of words"}
    for (name, encoding), needle in expected.items():
        config.model.name, config.model.position_encoding = name, encoding
        config.objective.name = "bidirectional_lm" if name == "elmo" else ""
        notes = config_lib.caveats(config)
        assert (len(notes), needle in "".join(notes)) == (bool(needle), True), (name, encoding, notes)
