"""Performance accounting: the machine's measured matmul peak (the MFU denominator), cached per machine."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

_PEAK_CACHE: dict[str, float] = {}


def cache_dir() -> str:
    """Where jaxlm keeps per-machine caches (compiled programs, measured peak): $JAXLM_CACHE_DIR or ~/.cache/jaxlm."""
    return os.environ.get("JAXLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxlm")


def _machine_key(dtype: str) -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind}:{os.cpu_count()}:{jax.device_count()}:{dtype}"


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


def peak_flops(dtype: str = "float32", *, remeasure: bool = False) -> float:
    """The cached peak for this machine and dtype, measuring it (about a second) the first time."""
    key = _machine_key(dtype)
    if key in _PEAK_CACHE and not remeasure:
        return _PEAK_CACHE[key]
    path = os.path.join(cache_dir(), "peak_flops.json")
    saved = {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        pass
    if key not in saved or remeasure:
        saved[key] = measure_matmul_peak(dtype)
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(saved, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass   # a read-only home only costs a re-measurement next time
    _PEAK_CACHE[key] = float(saved[key])
    return _PEAK_CACHE[key]
