"""All Orbax code: async, keep-N checkpoints of the training state, and a restore that survives damage.

Layout (one Orbax step per directory; see JAX-NOTES.md section 4)::

    DIR/STEP/state/...        the state pytree (StandardSave: params, opt_state, step, rng, carry)
    DIR/STEP/meta/metadata    a JSON dict saved beside it (config, metrics, ...)

Why this wrapper exists rather than calling ``ocp.CheckpointManager`` directly:

* Orbax's ``latest_step()`` does not validate a step, so :meth:`Checkpointer.restore_latest` tries steps newest
  first and falls back past any step that fails to restore, logging a warning that names it.
* Orbax reports a failed async write as a long traceback from a background thread (often wrapped in a
  tensorstore ``ValueError``); :meth:`Checkpointer.save`, :meth:`~Checkpointer.wait` and
  :meth:`~Checkpointer.close` turn any I/O failure into a one-line :class:`jaxlm.errors.UserError`. Old steps
  are only deleted (keep-N) after a newer save has completed, so a failed save leaves them intact.
* ``save()`` of an existing step returns False silently in Orbax; here it is an explicit, logged no-op.
* A ``kill -9`` mid-save leaves ``STEP.orbax-checkpoint-tmp``; Orbax never lists it as a step, and the
  primary process removes such leftovers when a :class:`Checkpointer` is created.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import json
import logging
import os
import re
import shutil
import sys
import types
import warnings
from typing import NoReturn

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager as ocp_manager

from jaxlm.errors import UserError

log = logging.getLogger(__name__)

_TMP_GLOB = "*.orbax-checkpoint-tmp*"   # Orbax's in-progress step directories (final name + this suffix)
_STATE, _META = "state", "meta"
# tensorstore reports OS errors inside ValueError messages, e.g. "... No space left on device [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_IO_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED")
_MAX_REASON = 300
_ORBAX_DIR = f"{os.sep}orbax{os.sep}"


class Checkpointer:
    """Saves and restores the training state under ``directory`` (normally WORKDIR/checkpoints).

    Args:
      directory: checkpoint root; created if missing (UserError if that is impossible).
      keep: how many of the newest complete steps to keep (Orbax ``max_to_keep``).
      async_save: write in a background thread; :meth:`save` returns once the arrays are copied to host.
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._pending: int | None = None   # step of an async save not yet known to have finished
        self._unusable: set[int] = set()   # steps restore_latest fell back past (set aside if saved again)
        self._closed = False
        _install_quiet_orbax_logging()
        if jax.process_index() == 0:
            _remove_leftover_tmp_dirs(self.directory)
        # Step directories are created in save() itself: when that fails (unwritable or full disk) Orbax's
        # asynchronous variant leaves its writer threads waiting ~5 min for a signal, blocking interpreter exit.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))
        except Exception as exc:  # noqa: BLE001 - translated below when it is an I/O failure
            reason = _io_reason(exc)
            if reason is None:
                raise
            raise UserError(f"could not create checkpoint directory {self.directory}: {reason}") from exc

    def steps(self) -> list[int]:
        """Complete steps on disk, ascending (an async save still in flight is not listed)."""
        pending = self._pending
        return sorted(s for s in self._manager.all_steps()
                      if s != pending or os.path.isdir(os.path.join(self.directory, str(s))))

    def save(self, step: int, state, meta: dict | None = None, *, force: bool = False) -> None:
        """Writes `state` (a pytree of arrays) and `meta` (a JSON-able dict) as step `step`.

        Asynchronous by default: returns after the arrays are copied off the device; an I/O failure in the
        background surfaces as a UserError from the next save(), wait() or close(). Saving a step that already
        exists (or is being written) is a logged no-op. There is no save-interval policy here (the training
        loop decides when to save), so `force` changes nothing; it is accepted for symmetry with Orbax.
        """
        del force
        step = int(step)
        meta = json.loads(json.dumps({} if meta is None else meta))   # TypeError now, not in a background thread
        self.wait()
        if step in self._unusable and step in self._manager.all_steps():
            self._set_aside(step)   # a resumed run re-trained past a damaged step: save the good one
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)})
        try:
            # force=True: bypass Orbax's own save policy, which would also silently skip steps below the latest.
            saved = self._manager.save(step, args=args, force=True)
        except ocp_manager.StepAlreadyExistsError:
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return
        except Exception as exc:  # noqa: BLE001 - _save_failed re-raises
            self._save_failed(step, exc)
        if saved:
            self._pending = step

    def wait(self) -> None:
        """Blocks until the async save in flight (if any) is on disk; UserError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as exc:  # noqa: BLE001 - _save_failed re-raises
            self._save_failed(self._pending, exc)
        self._pending = None

    def restore_latest(self, target) -> tuple[int, object, dict] | None:
        """The newest step that restores cleanly, as ``(step, state, meta)``; None if there is no step at all.

        Args:
          target: a pytree with the saved structure whose leaves are arrays or ``jax.ShapeDtypeStruct`` (with
            ``.sharding`` to restore onto a new device layout); it supplies container types (optax
            NamedTuples, dataclasses), shapes, dtypes and shardings.
        A step that fails to restore (truncated, deleted or garbage files, missing metadata) is logged as a
        warning naming it and the previous step is tried. UserError if steps exist but none restores.
        """
        self.wait()
        self._manager.reload()   # see steps written or damaged by others since construction
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        _install_quiet_unraisable_hook()
        _install_quiet_asyncio_logging()
        first_error = None
        for i, step in enumerate(steps):
            restored, reason = self._try_restore(step, target)
            if restored is not None:
                return (step, *restored)
            self._unusable.add(step)
            first_error = first_error or f"step {step}: {reason}"
            then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier step"
            log.warning("checkpoint step %d in %s is unusable (%s); %s", step, self.directory, reason, then)
        raise UserError(f"no usable checkpoint in {self.directory}: steps {sorted(steps)} all fail to restore "
                        f"({first_error}); move that directory away, or train with --restart (sets the old run aside), "
                        "to start from scratch")

    def close(self) -> None:
        """Waits for the save in flight, then releases Orbax's threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _try_restore(self, step: int, target):
        """``((state, meta), None)``, or ``(None, reason)`` when the step is unusable (any exception)."""
        with _restore_echoes_muted() as muted:
            try:
                return self._restore(step, target), None
            except Exception as exc:  # noqa: BLE001 - whatever the damage, the step is unusable
                reason = _one_line(exc)
            muted.collect = True   # now that the exception (and the frames it holds) is gone
        return None, reason

    def _restore(self, step: int, target):
        # Without state/_METADATA Orbax guesses the tree (lists for tuples) and fails with a misleading
        # structure error, or may even succeed for some trees: treat the step as damaged up front.
        for name in (os.path.join(_STATE, "_METADATA"), os.path.join(_META, "metadata")):
            if not os.path.isfile(os.path.join(self.directory, str(step), name)):
                raise FileNotFoundError(f"{name} is missing")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
        meta = restored[_META]
        if not isinstance(meta, dict):
            raise ValueError(f"meta/metadata holds {type(meta).__name__}, not a JSON object")
        return restored[_STATE], meta

    def _set_aside(self, step: int) -> None:
        """Renames the unusable step STEP to STEP.unusable[-N] (kept for inspection; Orbax ignores the name)."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst, n = f"{src}.unusable", 1
            while os.path.exists(dst):
                dst, n = f"{src}.unusable-{n}", n + 1
            os.rename(src, dst)
            log.warning("set the unusable checkpoint step %d aside as %s; saving step %d again", step, dst, step)
        self._unusable.discard(step)
        self._manager.reload()

    def _save_failed(self, step: int | None, exc: Exception) -> NoReturn:
        """Re-raises a failed save: a one-line UserError for I/O failures, the original error otherwise."""
        self._pending = None
        try:
            self._manager.reload()   # Orbax forgot the steps it meant to delete after this save; they remain
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        if step is not None and jax.process_index() == 0:
            for path in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(path, ignore_errors=True)   # a partial write only takes space
        reason = _io_reason(exc)
        if reason is None:
            raise exc
        which = f"step {step}" if step is not None else "a step"
        raise UserError(f"could not write checkpoint {which} to {self.directory}: {reason}") from exc


def _remove_leftover_tmp_dirs(directory: str) -> None:
    """Deletes in-progress step directories left by a killed run (never listed as steps; they only take space)."""
    for path in glob.glob(os.path.join(glob.escape(directory), _TMP_GLOB)):
        log.info("removing incomplete checkpoint %s (a save that never finished)", path)
        shutil.rmtree(path, ignore_errors=True)


def _io_reason(exc: BaseException) -> str | None:
    """'No space left on device'-style reason if `exc` (or its cause chain) is an I/O failure, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc.strerror or _one_line(exc)
        text = str(exc)
        match = _OS_ERROR_CODE.search(text)
        if match:
            code = int(match.group(1))
            return os.strerror(code) if code in errno.errorcode else _one_line(exc)
        for status in _IO_STATUSES:
            if status in text:
                return _one_line(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


class _StripOrbaxTracebacks(logging.Filter):
    """Keeps Orbax's log lines but drops their tracebacks: a failed background write is reported by us as one
    line, and Orbax otherwise prints the same stack from several threads. Kept when absl logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _ORBAX_DIR in record.pathname and not logging.getLogger("absl").isEnabledFor(
                logging.DEBUG):
            record.exc_info = None
            record.exc_text = None
        return True


def _install_quiet_orbax_logging() -> None:
    absl_logger = logging.getLogger("absl")   # Orbax logs through absl.logging, which uses this stdlib logger
    if not any(isinstance(f, _StripOrbaxTracebacks) for f in absl_logger.filters):
        absl_logger.addFilter(_StripOrbaxTracebacks())


class _DropOrbaxUnretrievedTasks(logging.Filter):
    """asyncio's 'Task/Future exception was never retrieved' for the sibling reads of a restore that already
    failed (a Future's message names no orbax file, only the OCDBT database it was reading)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
                    and ("orbax" in message or "OCDBT" in message))


def _install_quiet_asyncio_logging() -> None:
    """Keeps the filter above on for good: the abandoned reads may be garbage collected long after the restore."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxUnretrievedTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropOrbaxUnretrievedTasks())


@contextlib.contextmanager
def _restore_echoes_muted():
    """Mutes the echoes of a failed restore; the failure itself is still reported (by our warning).

    When one array of a step fails to read, Orbax drops its other read tasks unretrieved: once garbage collected
    they log 'Task exception was never retrieved' tracebacks and 'coroutine ... was never awaited' warnings.
    Setting ``.collect`` makes the exit collect them while these filters are on.
    """
    muted = types.SimpleNamespace(collect=False)
    asyncio_logger = logging.getLogger("asyncio")
    drop = _DropOrbaxUnretrievedTasks()
    asyncio_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
            yield muted
            if muted.collect:
                gc.collect()
    finally:
        asyncio_logger.removeFilter(drop)


def _install_quiet_unraisable_hook() -> None:
    """Silences the unraisable exceptions a failed restore leaves behind; all others go to the previous hook.

    Those are 'Event loop is closed' RuntimeErrors from tensorstore callbacks that fire after Orbax closed its
    loop, and errors raised while the garbage collector closes Orbax's abandoned read coroutines. They print
    bare tracebacks up to seconds after the failure (already reported by our warning), so the hook stays.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_jaxlm_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        code = getattr(unraisable.object, "cr_code", None)   # set when the object is a coroutine
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        if code is not None and _ORBAX_DIR in code.co_filename:
            return
        previous(unraisable)

    hook._jaxlm_quiet = True
    sys.unraisablehook = hook
