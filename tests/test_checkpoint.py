"""Checkpointer: exact round trip, keep-N, no-op re-save, fallback past damaged steps, clear I/O errors."""

import asyncio
import contextlib
import errno
import gc
import glob
import logging
import os
import subprocess
import sys
import textwrap
import types

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import checkpoint
from jaxlm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class _State:   # the shape of jaxlm.train.state.TrainState, kept local so this test only depends on checkpoint.py
    step: jax.Array
    params: object
    opt_state: object
    rng: jax.Array
    carry: object = None


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(16, 32, rngs=rngs)   # kernel > 1 KiB: stored in ocdbt.process_0/d, not inlined


def make_state(seed: int, *, carry=True, host=False):
    """A training-like state: nnx.Param params, adamw opt_state after one update, uint32 rng, a carry tuple."""
    _, params = nnx.split(_Tiny(nnx.Rngs(seed)), nnx.Param)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), params)
    _, opt_state = tx.update(grads, opt_state, params)   # nonzero mu/nu/count so the round trip means something
    state = _State(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state,
                   rng=jax.random.key_data(jax.random.key(seed)),
                   carry=(jnp.full((2, 5), seed, jnp.float32), jnp.arange(5.0) + seed) if carry else None)
    return jax.tree.map(np.asarray, state) if host else state


def assert_same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(directory, steps, keep=5):
    with checkpoint.Checkpointer(directory, keep=keep) as ckpt:
        for s in steps:
            ckpt.save(s, make_state(s), {"step": s})


def data_files(step_dir, under):
    return [f for f in glob.glob(os.path.join(step_dir, "state", under, "*")) if os.path.isfile(f)]


def test_round_trip_preserves_types_values_and_meta(tmp_path):
    state = make_state(3)
    meta = {"config": {"model": {"name": "gpt", "d_model": 8}}, "metrics": {"train/loss": 1.25}}
    with checkpoint.Checkpointer(str(tmp_path / "ck")) as ckpt:
        ckpt.save(7, state, meta)
        ckpt.wait()
        assert ckpt.steps() == [7]
    target = make_state(0)   # same structure, different values
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    for tgt in (target, abstract):
        with checkpoint.Checkpointer(str(tmp_path / "ck")) as ckpt:
            step, restored, restored_meta = ckpt.restore_latest(tgt)
        assert step == 7 and restored_meta == meta
        assert isinstance(restored, _State) and isinstance(restored.params, nnx.State)
        assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
        assert isinstance(restored.carry, tuple)
        assert restored.rng.dtype == np.uint32
        assert_same(restored, state)


def test_host_numpy_state_and_none_carry(tmp_path):
    """What the training loop passes: NumPy leaves (dp.to_host) and carry=None for transformers."""
    state = make_state(2, carry=False, host=True)
    with checkpoint.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(2, state)
        step, restored, meta = ckpt.restore_latest(make_state(0, carry=False, host=True))
    assert step == 2 and meta == {} and restored.carry is None
    assert_same(restored, state)


def test_keep_n_leaves_the_newest(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path), keep=2) as ckpt:
        for s in (1, 2, 3, 4):
            ckpt.save(s, make_state(s))
        ckpt.wait()
        assert ckpt.steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_saving_an_existing_step_is_a_noop(tmp_path, caplog):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(5, make_state(5), {"v": 1})
        ckpt.save(5, make_state(6), {"v": 2})   # still in flight: a no-op too
        ckpt.wait()
        with caplog.at_level(logging.INFO, logger="jaxlm.checkpoint"):
            ckpt.save(5, make_state(7), {"v": 3}, force=True)
        assert "step 5 already exists" in caplog.text
        step, state, meta = ckpt.restore_latest(make_state(0))
    assert (step, meta) == (5, {"v": 1})
    assert_same(state, make_state(5))


def test_steps_below_the_latest_are_saved(tmp_path):
    """After falling back past a damaged newest step the loop saves lower steps; Orbax's policy would skip them."""
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(10, make_state(1))
        ckpt.save(4, make_state(4))
        ckpt.wait()
        assert ckpt.steps() == [4, 10]


def test_no_checkpoints_gives_none(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path / "new")) as ckpt:
        assert ckpt.steps() == []
        assert ckpt.restore_latest(make_state(0)) is None


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(size))


DAMAGE = {
    "truncate_d": lambda step_dir: [_truncate(f) for f in data_files(step_dir, "d")],
    "truncate_ocdbt": lambda step_dir: [_truncate(f) for f in data_files(step_dir, "ocdbt.process_0/d")],
    "delete_metadata": lambda step_dir: os.remove(os.path.join(step_dir, "state", "_METADATA")),
    "garbage_d": lambda step_dir: [_garbage(f) for f in data_files(step_dir, "d")],
    "garbage_ocdbt": lambda step_dir: [_garbage(f) for f in data_files(step_dir, "ocdbt.process_0/d")],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_falls_back_with_a_warning(tmp_path, caplog, damage):
    save_steps(str(tmp_path), (1, 2))
    assert data_files(str(tmp_path / "2"), "d") and data_files(str(tmp_path / "2"), "ocdbt.process_0/d")
    DAMAGE[damage](str(tmp_path / "2"))
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt, caplog.at_level(logging.WARNING):
        assert ckpt.steps() == [1, 2]   # Orbax does not validate: only a restore shows the damage
        step, state, meta = ckpt.restore_latest(make_state(0))
    assert (step, meta) == (1, {"step": 1})
    assert_same(state, make_state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 2" in w and "unusable" in w for w in warnings), warnings
    assert not any("step 1 " in w for w in warnings)


def test_orbax_log_records_lose_only_their_tracebacks():
    checkpoint._install_quiet_orbax_logging()
    checkpoint._install_quiet_orbax_logging()
    absl_logger = logging.getLogger("absl")
    assert sum(isinstance(f, checkpoint._StripOrbaxTracebacks) for f in absl_logger.filters) == 1
    exc_info = (OSError, OSError(28, "No space left on device"), None)
    orbax_path = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "future.py")
    record = logging.LogRecord("absl", logging.ERROR, orbax_path, 1, "write failed", None, exc_info)
    other = logging.LogRecord("absl", logging.ERROR, "/work/main/jaxlm/x.py", 1, "mine", None, exc_info)
    assert absl_logger.filter(record) and absl_logger.filter(other)
    assert record.exc_info is None and record.getMessage() == "write failed"
    assert other.exc_info is exc_info


_FALLBACK_CHILD = textwrap.dedent("""
    import glob, logging, os, sys
    import jax, jax.numpy as jnp
    from jaxlm import checkpoint
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s", force=True)
    directory = sys.argv[1]
    state = {"w": jax.random.normal(jax.random.key(0), (300, 400)), "parts": [jnp.arange(50.0) + i for i in range(8)]}
    with checkpoint.Checkpointer(directory, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state)
    for f in glob.glob(os.path.join(directory, "3", "state", "**", "d", "*"), recursive=True):
        os.remove(f)
    for f in glob.glob(os.path.join(directory, "2", "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    with checkpoint.Checkpointer(directory) as ckpt:
        print("restored", ckpt.restore_latest(state)[0])
""")


def test_fallback_prints_only_the_warnings(tmp_path):
    """Orbax's dropped sibling reads must not spill tracebacks around the warnings that name the bad steps."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD, str(tmp_path / "ck")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "restored 1" in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines[:30]
    assert lines[0].startswith("WARNING jaxlm.checkpoint checkpoint step 3 in "), lines[0]
    assert lines[1].startswith("WARNING jaxlm.checkpoint checkpoint step 2 in "), lines[1]


def _fail_like_a_partial_restore():
    """What a failed Orbax restore leaves behind: a read task that failed unobserved and an unawaited coroutine,
    both only freed by the garbage collector."""
    async def read():
        raise ValueError("NOT_FOUND: orbax array read")

    async def never_started():
        pass

    loop = asyncio.new_event_loop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    garbage = [task, never_started()]
    garbage.append(garbage)
    raise ValueError("the first read failed")


def test_failed_restore_echoes_are_muted(caplog, recwarn):
    def attempt(mute):
        with checkpoint._restore_echoes_muted() if mute else contextlib.nullcontext() as muted:
            try:
                _fail_like_a_partial_restore()
            except ValueError:
                pass
            if mute:
                muted.collect = True
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        attempt(mute=True)
        assert not caplog.records and not [w for w in recwarn if "never awaited" in str(w.message)]
        asyncio_logger = logging.getLogger("asyncio")   # control: without the filters the same failure is noisy
        kept = [f for f in asyncio_logger.filters if isinstance(f, checkpoint._DropOrbaxUnretrievedTasks)]
        for f in kept:   # the lasting one restore_latest installs (earlier tests in this process)
            asyncio_logger.removeFilter(f)
        try:
            attempt(mute=False)
        finally:
            for f in kept:
                asyncio_logger.addFilter(f)
    assert any("Task exception was never retrieved" in r.getMessage() for r in caplog.records)
    assert [w for w in recwarn if "never awaited" in str(w.message)]


def test_all_steps_damaged_is_a_user_error(tmp_path, caplog):
    save_steps(str(tmp_path), (1, 2))
    DAMAGE["truncate_d"](str(tmp_path / "1"))
    DAMAGE["delete_metadata"](str(tmp_path / "2"))
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt, caplog.at_level(logging.WARNING):
        with pytest.raises(UserError, match="no usable checkpoint in " + str(tmp_path)) as info:
            ckpt.restore_latest(make_state(0))
    assert "\n" not in str(info.value)
    assert "step 2" in caplog.text and "step 1" in caplog.text


def test_wrong_target_shape_names_the_reason(tmp_path):
    """A config change that alters shapes is not damage, but it must not pass silently or look like None."""
    save_steps(str(tmp_path), (1,))
    target = make_state(0)
    target = target.replace(carry=(jnp.zeros((2, 6)), target.carry[1]))
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(UserError, match="not compatible with the stored shape"):
            ckpt.restore_latest(target)


def test_leftover_tmp_dir_is_ignored_and_removed(tmp_path):
    save_steps(str(tmp_path), (1, 2))
    leftover = tmp_path / "3.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "_METADATA").write_bytes(b"\x00partial")
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.steps() == [1, 2]
        assert ckpt.restore_latest(make_state(0))[0] == 2
        assert not leftover.exists()
        ckpt.save(3, make_state(3))
        ckpt.wait()
        assert ckpt.steps() == [2, 3]   # keep=2


def test_failed_write_is_a_user_error_and_keeps_earlier_steps(tmp_path, monkeypatch):
    """Root ignores chmod, so the step directory creation inside Orbax is made to fail like a full disk."""
    from orbax.checkpoint._src.path import async_path

    directory = str(tmp_path / "ck")
    ckpt = checkpoint.Checkpointer(directory, keep=1)   # keep=1: a careless manager would delete step 1 at save 2
    ckpt.save(1, make_state(1), {"step": 1})
    ckpt.wait()

    async def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(async_path, "mkdir", no_space)
    with pytest.raises(UserError) as info:
        ckpt.save(2, make_state(2), {"step": 2})
        ckpt.wait()
    assert str(info.value) == f"could not write checkpoint step 2 to {directory}: No space left on device"
    monkeypatch.undo()
    assert ckpt.steps() == [1]
    assert not glob.glob(os.path.join(directory, "2*"))
    with checkpoint.Checkpointer(directory, keep=1) as other:
        step, state, meta = other.restore_latest(make_state(0))
    assert (step, meta) == (1, {"step": 1})
    assert_same(state, make_state(1))
    ckpt.save(2, make_state(2))   # the disk is back: the same Checkpointer saves again
    ckpt.wait()
    assert ckpt.steps() == [2]
    ckpt.close()
    ckpt.close()   # idempotent


def test_directory_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="could not create checkpoint directory .*file/ck"):
        checkpoint.Checkpointer(str(tmp_path / "file" / "ck"))


def test_tensorstore_io_errors_are_recognised():
    ts_error = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/": '
                          "Failed to write 2804251 bytes to file 4: No space left on device [os_error_code='28']")
    assert checkpoint._io_reason(ts_error) == "No space left on device"
    wrapped = RuntimeError("finalize failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied")
    assert checkpoint._io_reason(wrapped) == "Permission denied"
    assert checkpoint._io_reason(ValueError("Structure mismatch: Target path ('x',) not found")) is None


def test_unraisable_hook_drops_only_orbax_restore_noise(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._install_quiet_unraisable_hook()
    checkpoint._install_quiet_unraisable_hook()   # installing twice does not stack
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    orbax_coroutine = types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=orbax_file))
    my_coroutine = types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=__file__))
    closed_loop = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
    abandoned_read = types.SimpleNamespace(exc_value=Exception("error while reading"), object=orbax_coroutine)
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"), object=None)
    mine = types.SimpleNamespace(exc_value=Exception("error while reading"), object=my_coroutine)
    for unraisable in (closed_loop, abandoned_read, other, mine):
        sys.unraisablehook(unraisable)
    assert seen == [other, mine]


_CHILD = textwrap.dedent("""
    import glob, os, signal, sys, time
    import jax, jax.numpy as jnp
    from jaxlm import checkpoint
    directory = sys.argv[1]
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(1, {"w": jnp.ones((4,)), "step": jnp.asarray(1)})
    ckpt.wait()
    big = jax.random.normal(jax.random.key(0), (4_000_000,))   # ~16 MB: the write takes a while
    ckpt.save(2, {"w": big, "step": jnp.asarray(2)})
    deadline = time.time() + 20
    while not glob.glob(os.path.join(directory, "2.orbax-checkpoint-tmp*")) and time.time() < deadline:
        time.sleep(0.001)
    print(sorted(os.listdir(directory)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_9_mid_save_resumes_from_the_last_complete_step(tmp_path):
    directory = str(tmp_path / "ck")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _CHILD, directory], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "2.orbax-checkpoint-tmp" in proc.stdout, proc.stdout   # killed while step 2 was being written
    target = {"w": jnp.zeros((4,)), "step": jnp.asarray(0)}
    with checkpoint.Checkpointer(directory) as ckpt:
        assert ckpt.steps() == [1]
        assert not glob.glob(os.path.join(directory, "*tmp*"))   # the partial step 2 is cleared away
        step, state, _ = ckpt.restore_latest(target)
        assert step == 1 and int(state["step"]) == 1
        np.testing.assert_array_equal(state["w"], np.ones(4))
        ckpt.save(2, {"w": jnp.full((4,), 2.0), "step": jnp.asarray(2)})   # the resumed run saves step 2 again
        ckpt.wait()
        assert ckpt.steps() == [1, 2]


_SHARDED_CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_num_cpu_devices", 2)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxlm import checkpoint
    state = {"w": jnp.arange(8.0).reshape(4, 2), "b": jnp.arange(2.0)}   # saved from one device
    with checkpoint.Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(1, state)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    target = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
              "b": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with checkpoint.Checkpointer(sys.argv[1]) as ckpt:
        _, restored, _ = ckpt.restore_latest(target)
    assert restored["w"].sharding == target["w"].sharding, restored["w"].sharding
    assert restored["b"].sharding == target["b"].sharding, restored["b"].sharding
    assert len(restored["w"].addressable_shards) == 2 and restored["w"].addressable_shards[0].data.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(8.0).reshape(4, 2))
    print("OK")
""")


def test_restore_onto_a_new_sharding(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _SHARDED_CHILD, str(tmp_path / "ck")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
