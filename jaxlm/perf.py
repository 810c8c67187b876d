"""Performance accounting: the machine's measured matmul peak (the MFU denominator), cached per machine."""

from __future__ import annotations

import json
import os
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
    """The MFU denominator of a run: the peak of this process's devices times the number of processes (every
    process runs the same devices).  Tokens/s and FLOPs per token count the global batch, so the peak must too."""
    return peak_flops(dtype) * jax.process_count()
