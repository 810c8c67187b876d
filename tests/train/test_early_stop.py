"""train.stop_at_accuracy: training ends at the first logged train/accuracy that reaches it, and stays ended."""

import json
import os

from jaxlm import config as config_lib
from jaxlm.train import loop


def _recall_config(stop_at: float):
    c = config_lib.default_config()
    c.model.name, c.model.num_layers, c.model.d_model, c.model.max_len = "gpt", 1, 32, 16
    c.data.source, c.data.distance, c.data.num_symbols = "synthetic:recall", 4, 4
    c.data.seq_len = 7
    c.train.steps, c.train.batch_size, c.train.log_every = 400, 32, 10
    c.train.eval_every = c.train.checkpoint_every = 400
    c.train.eval_batches, c.train.sample_length = 2, 0
    c.train.stop_at_accuracy = stop_at
    c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 10
    config_lib.validate(c)
    return c


def _logged_accuracy(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["train/accuracy"]) for r in rows if "train/accuracy" in r]


def test_stops_at_the_first_log_reaching_the_threshold_and_a_rerun_does_not_train_on(tmp_path):
    workdir = str(tmp_path / "run")
    metrics = loop.train(_recall_config(0.95), workdir)
    stopped = metrics["train/steps_trained"]
    logged = _logged_accuracy(workdir)
    assert stopped < 400, "recall at d = 4 with 4 symbols is learned well within 400 steps"
    assert logged[-1] == (stopped, logged[-1][1]) and logged[-1][1] >= 0.95
    assert all(acc < 0.95 for _, acc in logged[:-1])          # the first crossing, not a later one
    assert stopped % 10 == 0                                   # decided at a log boundary
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    again = loop.train(_recall_config(0.95), workdir)
    assert again["train/steps_trained"] == stopped
    assert _logged_accuracy(workdir) == logged                 # no further training step was logged
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    stricter = loop.train(_recall_config(0.9999), workdir)     # a stricter threshold trains on from there
    assert stricter["train/steps_trained"] > stopped
    stopped = stricter["train/steps_trained"]
    on = _recall_config(0.0)                                   # switched off: it trains on to train.steps
    on.train.steps = stopped + 10
    assert loop.train(on, workdir)["train/steps_trained"] == stopped + 10


def test_off_by_default_trains_every_step(tmp_path):
    c = _recall_config(0.0)
    c.train.steps = c.train.eval_every = c.train.checkpoint_every = 30
    assert loop.train(c, str(tmp_path))["train/steps_trained"] == 30
