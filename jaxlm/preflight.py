"""Checks of a launch's inputs that need neither JAX nor the data's contents, run before the heavy imports.

A mistyped corpus path or workdir then fails in a fraction of a second instead of after ~5 s of start-up
(importing JAX, Flax, Orbax). Each check raises the UserError the mode itself would raise at that point, with
the same functions and messages; whatever needs the data or the checkpoint's contents is left to the mode.
"""

from __future__ import annotations

import os

from jaxlm import config as config_lib
from jaxlm.data import sources, tokenizers
from jaxlm.errors import UserError

RUN_MODES = ("eval", "sample", "analyze")   # modes that read a trained run's workdir


def check(config, workdir: str, mode: str) -> None:
    """UserError if `mode` would fail at once on `config`'s data source or on the run in `workdir`."""
    if mode == "train" and "study" not in config:
        sources.check(config.data.source)
    elif mode in RUN_MODES:
        check_run(workdir)


def check_run(workdir: str):
    """A trained run's workdir: it exists, its config.json and tokenizer read, and it holds a checkpoint step.
    Returns (the run's config, its tokenizer), the tokenizer None for a synthetic task (its vocabulary needs
    JAX to build)."""
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir!r} does not exist")
    config = config_lib.load(workdir)
    synthetic = config.data.source.startswith("synthetic:")
    tokenizer = None if synthetic else tokenizers.load_tokenizer(config.data, workdir)
    directory = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))):
        raise no_checkpoint(workdir)
    return config, tokenizer


def no_checkpoint(workdir: str) -> UserError:
    """The error of a mode that needs a trained run where none was saved."""
    return UserError(f"no checkpoint in workdir {workdir!r}: train there first (python launch.py --workdir=...)")
