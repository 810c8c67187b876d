"""Performance accounting: the machine's measured matmul peak (the MFU denominator), cached per machine."""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

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
    return f"{dev.platform}:{kind}:{os.cpu_count()}:{jax.device_count()}:{dtype}"


def _peak_path() -> str:
    return os.path.join(cache_dir(), "peak_flops.json")


def _read_peaks() -> dict:
    try:
        with open(_peak_path()) as f:
            saved = json.load(f)
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def measure_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul chain through XLA on the default device (a practical peak, not a datasheet)."""
    dt = jnp.dtype(dtype)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
    chain = 4

    @jax.jit
    def f(x):
        for _ in range(chain):   # a short chain keeps dispatch overhead out of the measurement
            x = (x @ a) * jnp.asarray(0.5, dt)
        return x

    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t)
    return chain * 2 * n ** 3 / best


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
    """The cached peak for this machine and dtype, measuring it (about a second) the first time.

    ``remeasure=True`` measures again and keeps the higher of that and the cached value (:func:`record_peak`)."""
    key = _machine_key(dtype)
    if key in _PEAK_CACHE and not remeasure:
        return _PEAK_CACHE[key]
    saved = _read_peaks().get(key)
    if saved is None or remeasure:
        return record_peak(dtype, measure_matmul_peak(dtype))
    _PEAK_CACHE[key] = float(saved)
    return _PEAK_CACHE[key]
