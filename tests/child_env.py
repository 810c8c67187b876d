"""The tests' XLA flags, and the environment of the end-to-end tests' child processes (launch.py runs, fault
drivers, multi-process workers).

Every test, in the pytest process and in its children, compiles with LLVM's backend optimisation off: the tests
check results (against references, exit codes, bitwise resumes), not speed, and at their sizes compiling is most
of their time. Measured here, the first step of a tiny GPT compiles in 2.6 s instead of 4.3 s (tiny LSTM 1.75 vs
2.7 s) while its steps run ~1.8x slower, which at these sizes is milliseconds; the model and attention tests
take 2m28 instead of 3m29. What is tested is unchanged: the same jaxprs and the same HLO after XLA's own passes
(fusion, the YNNPACK and Eigen dots), only the machine code of the fused loops is less optimised.
Benchmarks (benchmarks/, --mode=bench) run with XLA's defaults.
"""

import os

FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_fast_compile(xla_flags: str) -> str:
    """`xla_flags` plus FAST_COMPILE_XLA_FLAGS (once)."""
    return " ".join(f for f in (xla_flags, "" if FAST_COMPILE_XLA_FLAGS in xla_flags else FAST_COMPILE_XLA_FLAGS) if f)


def child_env(xla_flags: str = "", **extra) -> dict:
    """os.environ + CPU only + `extra`, with XLA_FLAGS = the inherited ones, `xla_flags`, fast compilation."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = with_fast_compile(" ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f))
    return env
