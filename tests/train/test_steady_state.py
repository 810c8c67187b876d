"""Issue 8: once a run has taken its first steps, evaluated and checkpointed, it compiles nothing more (no
retrace of the train or eval step, of sampling, of the checkpoint transfer), and between two metric fetches
the step loop reads no device value (a read waits for the device: the host would stop queueing steps)."""

import os

import jax
import pytest
from jax._src import array as jax_array   # ArrayImpl._value: every device-to-host read goes through it

from jaxlm import config as config_lib, parallel, step_cache
from jaxlm.bench import COMPILE_EVENTS
from jaxlm.train import loop

STEPS, LOG_EVERY, EVAL_AND_SAVE_EVERY = 13, 2, 4


def _config(model: str, corpus: str):
    c = config_lib.default_config()
    c.model.name, c.model.num_layers, c.model.d_model = model, 1, 32
    c.model.hidden_size, c.model.max_len = 32, 32
    c.data.source, c.data.seq_len = "text:" + corpus, 16
    c.train.steps, c.train.batch_size, c.train.log_every = STEPS, 4, LOG_EVERY
    c.train.eval_every = c.train.checkpoint_every = EVAL_AND_SAVE_EVERY
    c.train.eval_batches, c.train.sample_length = 2, 8 if model == "gpt" else 0
    c.train.stateful = model == "lstm"
    config_lib.validate(c)
    return c


@pytest.mark.parametrize("model, stored_steps", [("gpt", False), ("lstm", False), ("bert", False), ("gpt", True),
                                                  ("lstm", True)])
def test_after_the_first_eval_and_save_nothing_compiles_and_steps_are_not_waited_for(model, stored_steps, corpus,
                                                                                     tmp_path, monkeypatch):
    if stored_steps:   # the train and eval steps go through step_cache.py, as with launch.py's compilation cache
        monkeypatch.setattr(step_cache, "cache_dir", lambda: str(tmp_path / "steps"))
    timeline = []   # ("compile", event), ("step", n) as train step n is queued, ("read",), ("save", n)

    def on_event(event, duration_secs, **_):
        if event in COMPILE_EVENTS:
            timeline.append(("compile", event))

    read = jax_array.ArrayImpl._value

    def recorded_read(self):
        timeline.append(("read",))
        return read.fget(self)

    train_step, save = parallel.DataParallel.train_step, loop._save

    def recorded_train_step(self, state, batch):
        out = train_step(self, state, batch)
        timeline.append(("step", sum(kind == "step" for kind, *_ in timeline) + 1))
        return out

    def recorded_save(run, step):
        save(run, step)
        timeline.append(("save", step))

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(recorded_read))
    monkeypatch.setattr(parallel.DataParallel, "train_step", recorded_train_step)
    monkeypatch.setattr(loop, "_save", recorded_save)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        metrics = loop.train(_config(model, corpus), str(tmp_path / "run"))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)

    assert metrics["train/steps_trained"] == STEPS
    if stored_steps:
        stored = {name.split("-")[0] for name in os.listdir(tmp_path / "steps")}
        assert stored == {"train_step", "eval_step"}, stored
    saves = [i for i, (kind, *_) in enumerate(timeline) if kind == "save"]
    assert [timeline[i][1] for i in saves] == [4, 8, 12, 13]
    assert any(kind == "compile" for kind, *_ in timeline[:saves[0]])   # the listener sees the first compile
    # After the first eval (step 4) and save: steps 5-13 (the last log window is partial), two more evals
    # with samples, three saves. None of it may trace or compile anything.
    assert [event for kind, *event in timeline[saves[0]:] if kind == "compile"] == []

    # Between queueing a step that ends no log window and queueing the next, nothing is read from the device.
    steps = [i for i, (kind, *_) in enumerate(timeline) if kind == "step"]
    assert len(steps) == STEPS
    for n, (at, following) in enumerate(zip(steps, steps[1:]), start=1):
        reads = sum(kind == "read" for kind, *_ in timeline[at:following])
        if n % LOG_EVERY:
            assert reads == 0, f"step {n}: {reads} device reads before the next step was queued"
        else:
            assert reads > 0, f"step {n} ends a log window: its metrics are fetched"   # the counter works
