"""Performance accounting: the machine's measured matmul peak (the MFU denominator), cached per machine."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_PEAK_CACHE: dict[str, float] = {}


def cache_dir() -> str:
    """Where jaxlm keeps per-machine caches (compiled programs, measured peak): $JAXLM_CACHE_DIR or ~/.cache/jaxlm."""
    return os.environ.get("JAXLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxlm")


def _cpu_model() -> str:
    """The CPU's model name, family and model numbers, e.g. "AMD EPYC (25/1)".

    XLA reports every CPU as device_kind "cpu", and VMs often name only the vendor line ("AMD EPYC" covers
    both a 140 GFLOP/s Zen 3 and a 520 GFLOP/s Zen 5 guest), so the family/model numbers are part of the key.
    """
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break   # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name", "unknown")
    return f"{name} ({fields['cpu family']}/{fields['model']})" if "cpu family" in fields and "model" in fields else name


def _machine_key(dtype: str) -> str:
    dev = jax.devices()[0]
    kind = f"{dev.device_kind}:{_cpu_model()}" if dev.platform == "cpu" else dev.device_kind
    return f"{dev.platform}:{kind}:{os.cpu_count()}:{jax.local_device_count()} busy:{dtype}"   # measure_matmul_peak


def _peak_path() -> str:
    return os.path.join(cache_dir(), "peak_flops.json")


def _read_peaks() -> dict:
    try:
        with open(_peak_path()) as f:
            saved = json.load(f)
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def matmul_chain(dtype: str = "float32", n: int = 1024, chain: int = 4):
    """(f, x, a, flops): a jitted chain of `chain` n x n x n matmuls on every local device at once (x is
    [devices, n, n], split over them; a is replicated), and the FLOPs one call of f(x, a) does in all."""
    dt = jnp.dtype(dtype)
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
    x = jax.device_put(jnp.broadcast_to(a, (len(devices), n, n)), NamedSharding(mesh, P("d")))
    a = jax.device_put(a, NamedSharding(mesh, P()))

    @jax.jit
    def f(x, a):
        for _ in range(chain):   # a short chain keeps dispatch overhead out of the measurement
            x = (x @ a) * jnp.asarray(0.5, dt)
        return x
    return f, x, a, len(devices) * chain * 2 * n ** 3


def measure_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a matmul chain through XLA with every local device busy at once: what this process's
    devices can do together (a practical peak, not a datasheet).  On a CPU split into several XLA devices
    they share the cores, so this is the machine's peak in that configuration, not a per-device figure."""
    f, x, a, flops = matmul_chain(dtype, n)
    jax.block_until_ready(f(x, a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(x, a))
        best = min(best, time.perf_counter() - t)
    return flops / best


def measure_peak(dtype: str = "float32", tries: int = 3) -> tuple[float, float]:
    """(peak, measured now): the best of `tries` measurements folded into the cache (:func:`record_peak`)."""
    now = max(measure_matmul_peak(dtype) for _ in range(tries))
    return record_peak(dtype, now), now


def record_peak(dtype: str, flops: float) -> float:
    """Fold a measured peak into the per-machine cache, keeping the highest value seen; returns the cached peak.

    A peak is a maximum: other processes on the machine only ever lower a measurement, so a noisy low one
    must never replace a good one (it would inflate every later run's train/mfu).
    """
    key = _machine_key(dtype)
    saved = _read_peaks()
    best = max(float(flops), float(saved.get(key, 0.0)), _PEAK_CACHE.get(key, 0.0))
    if best != saved.get(key):
        saved[key] = best
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir(), prefix="peak_flops.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:     # a private temp file: concurrent processes do not collide
                    json.dump(saved, f, indent=1)
                os.replace(tmp, _peak_path())
            finally:
                if os.path.exists(tmp):           # a failed write leaves no stray temp file behind
                    os.remove(tmp)
        except OSError:
            pass   # a read-only home only costs a re-measurement next time
    _PEAK_CACHE[key] = best
    return best


def peak_flops(dtype: str = "float32", *, remeasure: bool = False) -> float:
    """The cached peak of this process's devices for this machine and dtype, measured (best of 3, a few
    seconds) the first time.

    ``remeasure=True`` measures again and keeps the higher of that and the cached value (:func:`record_peak`)."""
    key = _machine_key(dtype)
    if key in _PEAK_CACHE and not remeasure:
        return _PEAK_CACHE[key]
    saved = _read_peaks().get(key)
    if saved is None or remeasure:
        return measure_peak(dtype)[0]
    _PEAK_CACHE[key] = float(saved)
    return _PEAK_CACHE[key]


def global_peak_flops(dtype: str = "float32") -> float:
    """The MFU denominator of a run: the peak of every device in it (tokens/s and FLOPs per token count the global
    batch, so the peak must too).

    GPUs and TPUs belong to one process each, so every process's peak counts.  CPU processes on one machine share
    its cores, and each one's peak (measured with its devices busy) is already the whole machine's: the machine
    counts once, with the peak of its first process, which measures it (if uncached) while the others on that
    machine wait.  Summing per-process peaks there counted a two-process run on one host twice.
    """
    if jax.process_count() == 1:
        return peak_flops(dtype)
    return _sum_over_run(dtype)


# How long a process waits for a peer's machine id or peak (a first measurement takes a few seconds).
PEER_PEAK_TIMEOUT_S = 600


def machine_id() -> str:
    """What identifies the cores this process runs on: the kernel's boot id (the same in every container of one
    host) or, without it, the host name; plus the CPU affinity set (processes pinned to disjoint cores do not
    share them)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            host = f.read().strip()
    except OSError:
        host = socket.gethostname()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return f"{host}/{','.join(map(str, cores))}"


def peak_holders(ids: list[str]) -> list[int]:
    """The processes whose peaks make the run's peak, given each process's id (its machine id on CPU, a unique
    id per process on accelerators): the first process of each distinct id."""
    first: dict[str, int] = {}
    for process, ident in enumerate(ids):
        first.setdefault(ident, process)
    return sorted(first.values())


def _sum_over_run(dtype: str) -> float:
    """Exchange ids and peaks through jax.distributed's key-value store and sum the peak holders' peaks."""
    from jax._src import distributed
    client = distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    ident = machine_id() if jax.devices()[0].platform == "cpu" else f"process {me}"
    prefix, timeout_ms = f"jaxlm/peak/{dtype}", PEER_PEAK_TIMEOUT_S * 1000
    client.key_value_set(f"{prefix}/id/{me}", ident, allow_overwrite=True)
    holders = peak_holders([client.blocking_key_value_get(f"{prefix}/id/{p}", timeout_ms) for p in range(n)])
    if me in holders:
        client.key_value_set(f"{prefix}/flops/{me}", repr(peak_flops(dtype)), allow_overwrite=True)
    return sum(float(client.blocking_key_value_get(f"{prefix}/flops/{p}", timeout_ms)) for p in holders)
