"""Parallelism: the pure step under jax.jit over a (data, fsdp) device mesh (default) or jax.pmap (legacy path).

Both strategies run the same `train_step`; only placement differs.

* ``jit`` (default): a 2-D mesh ``(data, fsdp)`` over all devices of all processes, ``data * fsdp = devices``.
  Batches (and a recurrent carry) are split over both axes (every device gets ``batch / devices`` rows).
  With ``fsdp = 1`` parameters and optimizer state are replicated (plain data parallelism). With ``fsdp = N``
  each parameter and its optimizer moments are split ``N`` ways along their largest axis divisible by ``N``
  (replicated if none is), so each device holds ~1/N of them (ZeRO-3 / FSDP); XLA inserts the all-gathers
  of the parameters before their use and reduce-scatters the gradients.  Same math, same result.
* ``pmap``: the step under ``jax.pmap`` with the sums ``psum``'d over the device axis inside the step
  (``StepSpec.axis_name``).  Dropout and masked-LM masks are drawn per device (independent streams), so with
  them pmap is statistically, not bitwise, equal to jit / 1 device; without them it is equal.  Since JAX 0.8 ``jax.pmap`` is itself implemented as jit + shard_map over a 1-D mesh
  (JAX-NOTES.md section 1), so it costs the same; it is here for users who know it.

Checkpoints always hold one host-side copy of the state (`to_host`), so a run saved under one strategy, mesh
or device count restores under any other.  Multi-process runs (`initialize_distributed`) use the same code:
the mesh spans the devices of every process, each process feeds only its own rows of each batch.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxlm import config as config_lib, step_cache
from jaxlm.errors import UserError

PMAP_AXIS = "batch"
BATCH_AXES = ("data", "fsdp")   # batch rows are split over both mesh axes
EXIT_PEER_LOST = 4              # exit code of a process whose peer process died (see start_peer_watchdog)


def fsdp_spec(shape, fsdp: int) -> P:
    """The PartitionSpec of one parameter (or optimizer moment) under fsdp=N.

    Splits the largest axis whose size is divisible by N over the "fsdp" mesh axis (the first such axis on
    ties); replicates scalars, tiny leaves and leaves with no divisible axis.
    """
    if fsdp <= 1:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
    if not candidates:
        return P()
    _, neg_axis = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_axis] = "fsdp"
    return P(*spec)


def _make_mesh(devices, fsdp: int):
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise UserError(f"invalid parallel.fsdp={fsdp}: must divide the number of devices ({n})")
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


class DataParallel:
    """Placement + wrapped steps for one strategy. Batches arrive as this process's rows (numpy).

    Args:
      strategy: "jit" or "pmap".
      train_step, eval_step: the pure steps of train/step.py (bound with their StepSpec; for pmap the spec's
        axis_name must be PMAP_AXIS).
      fsdp: size of the mesh's "fsdp" axis (jit only): parameters and optimizer state are split this many ways.
      devices: the devices to use (default: all devices of all processes); tests pass a subset.
    """

    def __init__(self, strategy: str, train_step, eval_step, *, fsdp: int = 1, devices=None,
                 step_cache_key: str | None = None):
        self.strategy = strategy
        self.step_cache_key = step_cache_key   # set: load/store the traced jit train and eval steps (step_cache.py)
        self.fsdp = int(fsdp)
        self.devices = list(jax.devices() if devices is None else devices)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        if strategy == "pmap":
            if self.fsdp != 1:
                raise UserError(f"invalid parallel.fsdp={fsdp} with parallel.strategy='pmap': "
                                "fsdp needs parallel.strategy='jit'")
            self._train = jax.pmap(_per_device_randomness(train_step), axis_name=PMAP_AXIS, donate_argnums=(0,),
                                   devices=self.devices)
            self._eval = jax.pmap(eval_step, axis_name=PMAP_AXIS, devices=self.devices)
        else:
            self.mesh = _make_mesh(self.devices, self.fsdp)
            self.replicated = NamedSharding(self.mesh, P())
            self.sharded = NamedSharding(self.mesh, P(BATCH_AXES))   # batch rows over every device
            self._train_step, self._eval_step = train_step, eval_step
            self._train = self._eval = None   # jitted on first use (train: when the state's shardings are known)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    # ---- shardings (jit) -------------------------------------------------------------------------------

    def _param_sharding(self, x) -> NamedSharding:
        return NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.fsdp))

    def state_shardings(self, state):
        """Per-leaf NamedShardings of a TrainState: params and opt_state by `fsdp_spec`, the carry's rows over
        the batch axes, step and rng replicated."""
        shardings = jax.tree.map(lambda _: self.replicated, state.replace(params=None, opt_state=None, carry=None))
        return shardings.replace(params=jax.tree.map(self._param_sharding, state.params),
                                 opt_state=jax.tree.map(self._param_sharding, state.opt_state),
                                 carry=jax.tree.map(lambda _: self.sharded, state.carry))

    # ---- placement -------------------------------------------------------------------------------------

    def place_state(self, state):
        """Host state (numpy or single-device arrays: the whole state, carry included, on every process, as
        `to_host` returns it) -> the device layout of the wrapped step."""
        if self.strategy == "pmap":
            n = len(self.local_devices)
            rep = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state.replace(carry=None))
            return rep.replace(carry=self.place_carry(jax.tree.map(_process_rows, state.carry)))
        return jax.tree.map(_global_from_full_copy, state, self.state_shardings(state))

    def abstract_state(self, state):
        """ShapeDtypeStructs of the host state, for checkpoint restore (on one device; place_state follows)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)

    def to_host(self, state):
        """The device state as numpy, one whole copy on every process (pmap's replicas collapsed, fsdp's
        parameter shards and the carry's row shards gathered, across processes too)."""
        if self.strategy == "pmap":
            rest = jax.tree.map(_first_replica_host, state.replace(carry=None))
            carry = jax.tree.map(lambda x: _gather(x).reshape(-1, *x.shape[2:]), state.carry)
            return rest.replace(carry=carry)
        return jax.tree.map(_gather, state)

    def place_batch(self, batch: dict):
        """This process's rows -> a global batch sharded over the batch axes (or [devices, rows/device, ...])."""
        if self.strategy == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), batch)

    def place_carry(self, carry):
        """A host carry holding this process's rows [rows, ...] laid out for the wrapped steps."""
        if carry is None:
            return None
        if self.strategy == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *x.shape[1:]), carry)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), carry)

    # ---- steps -----------------------------------------------------------------------------------------

    def train_step(self, state, batch):
        """(state, metrics); metrics are replicated scalars (on this process's first device under pmap)."""
        if self._train is None:
            directory = self._step_cache_dir()
            if directory:
                self._train = step_cache.cached_train_step(
                    self._train_step, state, batch, key=self.step_cache_key, directory=directory,
                    state_shardings=self.state_shardings(state), replicated=self.replicated)
            else:
                self._train = jax.jit(self._train_step, out_shardings=(self.state_shardings(state), self.replicated),
                                      donate_argnums=(0,))
        state, metrics = self._train(state, batch)
        return state, (_first_replica(metrics) if self.strategy == "pmap" else metrics)

    def eval_step(self, state, batch, carry=None):
        """(sums, new_carry); carry is laid out like state.carry (use `place_carry` for a fresh one)."""
        if self._eval is None:   # jit (pmap's is built in __init__)
            directory = self._step_cache_dir()
            out_shardings = (self.replicated, self.sharded)   # sums; the carry's rows split like the batch's
            self._eval = (step_cache.cached_eval_step(self._eval_step, key=self.step_cache_key, directory=directory,
                                                      out_shardings=out_shardings)
                          if directory else jax.jit(self._eval_step, out_shardings=out_shardings))
        sums, carry = self._eval(state.params, batch, carry)
        return (_first_replica(sums) if self.strategy == "pmap" else sums), carry

    def _step_cache_dir(self) -> str | None:
        """Where the jit steps' traced programs are stored (step_cache.py), or None: no key given, JAX's
        persistent cache off, or a multi-process run."""
        directory = step_cache.cache_dir()
        return directory if self.step_cache_key is not None and directory and jax.process_count() == 1 else None

    def params(self, state):
        """The parameters as host numpy (for sampling and analysis)."""
        return self.to_host(state.replace(carry=None)).params


def _per_device_randomness(train_step):
    """pmap: every device runs the step on its own rows with the same state.rng, so without this each device
    would draw the same dropout/masking pattern for its rows (noise correlated across devices).  Fold the
    device index into the key for the step, and hand back the unchanged rng so the replicas stay identical.
    (jit draws from the global batch shape instead, reproducing the 1-device draws exactly.)"""
    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), jax.lax.axis_index(PMAP_AXIS))
        new_state, metrics = train_step(state.replace(rng=jax.random.key_data(key)), batch)
        return new_state.replace(rng=state.rng), metrics
    return step


def _global_from_full_copy(x, sharding):
    """A global jax.Array from the whole value, present on every process (each process places its shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _process_rows(x):
    """This process's block of rows of a whole-batch host array (the rows its batches hold)."""
    x = np.asarray(x)
    rows = x.shape[0] // jax.process_count()
    return x[jax.process_index() * rows:(jax.process_index() + 1) * rows]


def _gather(x):
    """A (possibly sharded, possibly multi-process) jax.Array -> its whole value as numpy, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.sharding.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _first_replica_host(x):
    """One replica of a pmap'd value [local or global devices, ...] as numpy (this process's first device)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
    return np.asarray(x)[0]


def _first_replica(tree):
    """pmap outputs [devices, ...] -> the value on this process's first device (no cross-process read)."""
    return jax.tree.map(lambda m: m.addressable_data(0).reshape(m.shape[1:]), tree)


# ---- CPU devices ---------------------------------------------------------------------------------------

def cpu_device_count(config, cores: int) -> int:
    """The XLA:CPU device count a run uses: parallel.cpu_devices, or for 0 (auto) one per core (the largest
    count <= cores that splits the batch, gradient accumulation included), 1 for studies (their ~0.11M-parameter
    models are too small to gain: the quick preset took 3 min 46 s on two devices against 3 min 10 s on one).

    One device per core, data parallel over the cores, beats one device spanning them for every model
    (2 cores, benchmarks/README.md): GPT small 1.13-1.25x, GPT tiny 1.03x, LSTM tiny 1.33x, LSTM small 1.125x.
    """
    if config.parallel.cpu_devices:
        return config.parallel.cpu_devices
    if "study" in config:
        return 1
    return next(n for n in range(max(cores, 1), 0, -1) if config_lib.splits_batch(config.train, n))


def configure_cpu_devices(config) -> int | None:
    """Split this host's CPU into `cpu_device_count` XLA devices; call before anything touches the devices.

    Leaves the count alone (returns None) where it was already chosen: XLA_FLAGS'
    --xla_force_host_platform_device_count (tests, scripts/launch_local.py), or backends already started
    (in-process callers).  Multi-process runs keep one device per process unless parallel.cpu_devices says
    otherwise.  On GPU/TPU hosts only the (unused) CPU backend is affected, so this is safe everywhere.
    """
    from jax._src import xla_bridge
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if forced or xla_bridge.backends_are_initialized() or (is_multiprocess() and not config.parallel.cpu_devices):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = cpu_device_count(config, cores)   # an explicit count that cannot split the batch: config.validate
    jax.config.update("jax_num_cpu_devices", count)
    return count


# ---- multi-process -------------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False,
                           heartbeat_timeout_seconds: int = 60) -> bool:
    """jax.distributed set-up, before anything touches the devices.  Returns True if this is a multi-process run.

    Explicit: all of coordinator_address ("HOST:PORT", reachable by every process; process 0 listens there),
    num_processes and process_id.  auto=True (none given): JAX's own cluster detection (Cloud TPU pods, SLURM,
    Open MPI, ...); without a detected cluster this is a single-process run.  CPU collectives go over gloo.
    Starts a peer watchdog so that a process whose peer died exits with a clear message (start_peer_watchdog).
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError("multi-process runs need all of --coordinator_address=HOST:PORT, --num_processes=N and "
                        f"--process_id=I (got coordinator_address={coordinator_address!r}, "
                        f"num_processes={num_processes!r}, process_id={process_id!r})")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"invalid --process_id={process_id}: must be in [0, --num_processes={num_processes})")
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"invalid --coordinator_address={coordinator_address!r}: use HOST:PORT, e.g. 127.0.0.1:12345")
        if num_processes == 1:
            return False
    elif not auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # the default; CPU collectives only
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=120,
                                   heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (RuntimeError, ValueError) as e:
        if not all(given):   # auto-detection found no cluster: a plain single-process run
            print(f"launch.py: --distributed: no cluster detected ({' '.join(str(e).split())[:120]}); "
                  "running as a single process", file=sys.stderr)
            return False
        raise UserError(f"jax.distributed.initialize failed for process {process_id} of {num_processes} "
                        f"(coordinator {coordinator_address}): {' '.join(str(e).split())[:300]}") from None
    if jax.process_count() > 1:
        start_peer_watchdog()
        sys.excepthook = _exit_at_once_after_traceback
        return True
    return False


def is_multiprocess() -> bool:
    """True once jax.distributed is initialised (never initialises a backend itself)."""
    from jax._src import distributed
    return distributed.global_state.client is not None


def exit_multiprocess(code: int) -> None:
    """End a multi-process run's process with `code` once every process is exiting (after
    :func:`exit_now_if_multiprocess` returned): shut jax.distributed down explicitly, then os._exit.  A normal
    interpreter exit tore the distributed client down in C++ static destructors, which sometimes aborted
    (SIGABRT, "terminate called after throwing ...") after the checkpoint was already written."""
    try:
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_now_if_multiprocess(code: int, *, wait_seconds: float = 5.0) -> None:
    """Call before exiting with an error: in a multi-process run whose other processes are not exiting too,
    end this process at once with `code`; otherwise return (the caller exits normally).

    A normal exit runs JAX's shutdown barrier, which waits for the other processes; if they are stuck in a
    collective waiting for this one, that is a deadlock until the timeouts.  So all exiting processes first
    meet at a short barrier: when every process hit the same error (a bad config, say) it passes and they exit
    normally; when it times out the others are still running, and exiting at once lets their watchdog (or JAX,
    when this is process 0) end them promptly.
    """
    if not is_multiprocess():
        return
    import signal as signal_lib
    from jax._src import distributed
    try:   # already exiting: a late Ctrl-C (often one per process) must not break the exit barrier
        for sig in (signal_lib.SIGINT, signal_lib.SIGTERM):
            signal_lib.signal(sig, signal_lib.SIG_IGN)
    except ValueError:   # not the main thread
        pass
    try:
        distributed.global_state.client.wait_at_barrier("jaxlm-exit", int(wait_seconds * 1000))
        return
    except Exception:  # noqa: BLE001 - DEADLINE_EXCEEDED: the others are not exiting
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_LOST_PEER_SIGNS = ("Gloo", "gloo", "DEADLINE_EXCEEDED", "Connection reset", "UNAVAILABLE", "heartbeat")


def _exit_at_once_after_traceback(exc_type, exc, tb):
    """sys.excepthook of a multi-process run: a collective that failed because a peer died gets one clear line
    and exit code EXIT_PEER_LOST; anything else its traceback and exit code 1.  Either way without hanging
    in JAX's shutdown barrier when the other processes are not exiting too."""
    where = f"process {jax.process_index()} of {jax.process_count()}"
    chain, cause = [], exc
    while cause is not None and len(chain) < 8:   # Orbax and others wrap the runtime error
        chain.append(" ".join(str(cause).split()))
        cause = cause.__cause__ or cause.__context__
    text = next((t for t in chain if any(sign in t for sign in _LOST_PEER_SIGNS)), None)
    if text is not None:
        print(f"launch.py: error: {where}: a collective with the other processes failed ({text[:200]}); "
              "another process probably died; exiting (the run cannot continue without it: restart all "
              "processes with the same command to resume from the last checkpoint)", file=sys.stderr, flush=True)
        code = EXIT_PEER_LOST
    else:
        sys.__excepthook__(exc_type, exc, tb)
        print(f"launch.py: error: {where} failed (traceback above)", file=sys.stderr, flush=True)
        code = 1
    exit_now_if_multiprocess(code)   # returns only when every process is exiting too
    exit_multiprocess(code)


def start_peer_watchdog(*, interval: float = 2.0, timeout: float | None = None) -> threading.Thread | None:
    """A daemon thread that ends this process (exit code EXIT_PEER_LOST, one clear line on stderr) when another
    process of the run stops responding, instead of leaving it blocked in a collective that never completes.

    Every `interval` s each process bumps its own counter in the coordination service's key-value store and
    reads the others'.  A peer whose counter has not moved for `timeout` s (JAXLM_PEER_TIMEOUT, default 60: long
    enough for a GIL-holding stretch of Python in a healthy peer) is taken as dead.  When process 0 (which hosts
    JAX's coordination service) dies, JAX itself aborts the others at once with "Terminating process because
    the JAX distributed service detected fatal errors ... another task died".
    Uses os._exit: the main thread may be stuck in a collective, and a normal exit would wait for it (then
    abort at JAX's shutdown barrier after heartbeat_timeout_seconds).
    """
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None or jax.process_count() < 2:
        return None
    timeout = float(os.environ.get("JAXLM_PEER_TIMEOUT", 60)) if timeout is None else timeout
    me, n = jax.process_index(), jax.process_count()

    def lost(message: str):
        print(f"launch.py: error: process {me} of {n}: {message}; exiting (the run cannot continue without it: "
              "restart all processes with the same command to resume from the last checkpoint)",
              file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def watch():
        beats = 0
        last_seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
        rpc_failing_since = None
        while True:
            beats += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"jaxlm/heartbeat/{me}", str(beats), allow_overwrite=True)
                for p, (value, since) in last_seen.items():
                    try:
                        got = client.key_value_try_get(f"jaxlm/heartbeat/{p}")
                    except Exception as e:  # noqa: BLE001 - NOT_FOUND: no beat from p yet
                        if "not_found" not in str(e).lower().replace(" ", "_"):
                            raise
                        got = None
                    if got != value:
                        last_seen[p] = (got, now)
                    elif now - since > timeout:
                        lost(f"process {p} stopped responding {now - since:.0f} s ago (killed or crashed?)")
                rpc_failing_since = None
            except Exception as e:  # noqa: BLE001 - the coordination service itself is unreachable
                rpc_failing_since = rpc_failing_since or now
                if now - rpc_failing_since > min(timeout, 10.0):
                    lost(f"lost the coordination service on process 0 ({' '.join(str(e).split())[:160]})")
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="jaxlm-peer-watchdog", daemon=True)
    thread.start()
    return thread


def agree_on_checks(error: Exception | None, *, timeout_seconds: float = 120.0) -> None:
    """Raise a UserError on every process of a multi-process run when any process failed its start-up checks
    (`error`: this process's, None if they passed); a single process raises its own error, if any.

    Each process publishes its result in the coordination service and reads the others'.  A path missing on
    one host only (its corpus, its workdir) thus stops every process at once with that message, where the
    others would otherwise wait up to initialize's timeout, or in the first collective, for a process that has
    exited.  Every process must call this once, right after :func:`initialize_distributed`."""
    if not is_multiprocess():
        if error is not None:
            raise error
        return
    from jax._src import distributed
    client = distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"jaxlm/checks/{me}", "" if error is None else " ".join(str(error).split()))
    for p in range(n):
        failed = client.blocking_key_value_get(f"jaxlm/checks/{p}", int(timeout_seconds * 1000))
        if failed:
            raise UserError(failed if p == me else f"process {p} of {n}: {failed}")


def agree_on_signal(raised: str | None) -> str | None:
    """Multi-process: the signal name any process has caught (or None), the same on every process.

    Each process catches SIGINT/SIGTERM on its own, possibly a step apart; checkpointing at different steps
    would leave Orbax's cross-process barriers waiting forever.  Every process must call this at the same
    steps (it is one tiny all-gather)."""
    if jax.process_count() == 1:
        return raised
    import signal as signal_lib
    from jax.experimental import multihost_utils
    codes = multihost_utils.process_allgather(np.int32(signal_lib.Signals[raised].value if raised else 0))
    code = int(np.max(codes))
    return signal_lib.Signals(code).name if code else None


def check_batch_divisible(batch_size: int, grad_accum_steps: int) -> str | None:
    """A one-line reason the global batch cannot be split over this run's processes/devices, or None."""
    per_process = batch_size // jax.process_count()
    if batch_size % jax.process_count():
        return f"train.batch_size={batch_size} must be divisible by the number of processes ({jax.process_count()})"
    if per_process % jax.local_device_count():
        return (f"train.batch_size={batch_size} must be divisible by the number of devices "
                f"({jax.device_count()})")
    if (per_process // jax.local_device_count()) % grad_accum_steps and grad_accum_steps > 1:
        return f"train.grad_accum_steps={grad_accum_steps} must divide the per-device batch"
    return None
