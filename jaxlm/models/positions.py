"""How a transformer knows where a token is: ``model.position_encoding``.

- ``learned``: a learned absolute vector per position added to the token embedding (GPT-2, BERT).
- ``rope``: rotary position embedding (Su et al. 2021, RoFormer): queries and keys are rotated by an angle
  proportional to their position, so a score q_m . k_n depends on m - n only; there is no position parameter.
- ``none``: no position information (NoPE, Kazemnejad et al. 2023): a causal model still infers position from
  its mask; a bidirectional one sees a bag of words.

For the long-range study the difference matters: a learned table trains each row only from the positions at and
after it (the last row learns from one target per window), and shortening the context moves the target to a
different absolute position; under rope and none, attention sees relative positions only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import layers

ENCODINGS = ("learned", "rope", "none")
ROPE_BASE = 10_000.0      # theta_i = base^(-2i / head_dim), as in RoFormer and LLaMA


class PositionEmbed(nnx.Module):
    """Learned absolute position embeddings [max_len, d] (GPT-2, BERT)."""

    def __init__(self, max_len: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(layers.normal_init()(rngs.params(), (max_len, features), jnp.float32))

    def __call__(self, length: int) -> jax.Array:
        """The first `length` position vectors [length, d] in the compute dtype."""
        return self.embedding[:length].astype(self.dtype)


def rope_angles(length: int, head_dim: int, base: float = ROPE_BASE) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each float32 [length, head_dim]: position m's angle m * theta_i, repeated for both halves.

    Built in float64 NumPy at trace time (the length is static), so the step holds them as constants.
    """
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dimension, got {head_dim}")
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * theta[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x: jax.Array) -> jax.Array:
    """Rotary position embedding of x [B, T, H, Dh] at positions 0..T-1 (the rotate-half layout of GPT-NeoX and
    LLaMA: dimension i pairs with i + Dh/2).  Computed in float32, returned in x's dtype."""
    cos, sin = rope_angles(x.shape[1], x.shape[-1])
    cos, sin = jnp.asarray(cos)[None, :, None, :], jnp.asarray(sin)[None, :, None, :]
    xf = x.astype(jnp.float32)
    first, second = jnp.split(xf, 2, axis=-1)
    return (xf * cos + jnp.concatenate([-second, first], axis=-1) * sin).astype(x.dtype)
