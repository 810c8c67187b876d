"""A second Ctrl-C that cuts an async checkpoint save short still stops the run as an interrupt (exit 130)."""

import types

import pytest

from jaxlm.train import loop


def test_interrupt_survives_a_checkpointer_that_cannot_close(monkeypatch):
    closed = []

    class BrokenCheckpointer:   # as Orbax after a KeyboardInterrupt inside its writer thread's start()
        def close(self):
            closed.append(1)
            if len(closed) == 1:
                raise RuntimeError("cannot join thread before it is started")

    run = types.SimpleNamespace(stopped_at=None, checkpointer=BrokenCheckpointer(),
                                writer=types.SimpleNamespace(close=lambda: closed.append("writer")))
    monkeypatch.setattr(loop, "setup", lambda *a, **k: run)
    monkeypatch.setattr(loop, "_log_start", lambda run: None)

    def second_ctrl_c(run, signals):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "_train_loop", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):   # launch.py turns this into exit 130, not a RuntimeError traceback
        loop.train(None, "unused")
    assert closed[0] == 1 and "writer" in closed
