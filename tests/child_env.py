"""Environment of the end-to-end tests' child processes (launch.py runs, fault drivers, multi-process workers).

Those tests check behaviour (exit codes, messages, resume, signals, bitwise equality between two runs compiled
the same way), not numerics against a reference or speed, so their children compile with LLVM's optimisation
off: measured here, the first step of a tiny GPT compiles in 2.6 s instead of 4.3 s (tiny LSTM 1.75 vs 2.7 s),
while its steps run ~1.8x slower, which at these sizes is milliseconds. XLA's own HLO passes (fusion, the
YNNPACK dots) are unchanged. The numerical tests run in the pytest process with XLA's defaults.
"""

import os

FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def child_env(xla_flags: str = "", **extra) -> dict:
    """os.environ + CPU only + `extra`, with XLA_FLAGS = the inherited ones, `xla_flags`, fast compilation."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags, FAST_COMPILE_XLA_FLAGS) if f)
    return env
