"""Load a trained run from its workdir — config, tokenizer, model and parameters — without its training data.

Sampling, evaluation, analysis and feature extraction all start here, so a run stays usable after the
corpus it was trained on has moved.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from jaxlm import checkpoint, models, preflight
from jaxlm.data import synthetic
from jaxlm.train import optim, state as state_lib


@dataclasses.dataclass
class TrainedRun:
    config: object
    tokenizer: object
    graphdef: object
    params: object
    step: int

    @property
    def model(self) -> nnx.Module:
        """A stateful NNX model holding the trained parameters (for interactive use)."""
        return nnx.merge(self.graphdef, self.params)


def load(workdir: str) -> TrainedRun:
    """The latest complete checkpoint of the run in `workdir`, with the config it was trained with."""
    config, tokenizer = preflight.check_run(workdir)
    if tokenizer is None:   # a synthetic task: the vocabulary is a function of the task alone
        tokenizer = synthetic.load_tokenizer(config.data, workdir)
    model = models.build_model(config.model, tokenizer.vocab_size, config.seed, abstract=True)   # values: restored
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.make_optimizer(config.optim, config.train.steps, flat=False)   # the per-leaf form checkpoints hold
    carry = model.initial_carry(config.train.batch_size) if config.train.stateful else None
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(state_lib.checkpoint_target(params, tx, config.seed, carry))
    finally:
        ckpt.close()
    if restored is None:
        raise preflight.no_checkpoint(workdir)
    step, state, _ = restored
    return TrainedRun(config=config, tokenizer=tokenizer, graphdef=graphdef, params=state.params, step=int(step))
