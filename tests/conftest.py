"""Test session set-up: CPU only, fast compilation, one device unless a test's subprocess asks for more."""

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from child_env import with_fast_compile  # noqa: E402  (tests/ is on the path from here on)

# Before any test imports jax: see child_env.py for why the tests compile with LLVM's optimisation off.
os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small text file of random words: the end-to-end tests' training data (read only)."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    path.write_text(" ".join(rng.choice(words, 6000)) + "\n")
    return str(path)
