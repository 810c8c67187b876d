"""ScalarMix: a task-specific weighted sum of a frozen biLM's layers (ELMo, Peters et al. 2018, eq. 1).

    ELMo_task = gamma * sum_j softmax(s)_j * h_j

The softmax keeps the layer weights positive and summing to one, and gamma rescales the whole vector
(the paper: it "is of practical importance to aid the optimization process").  Only s and gamma are
trained; the representations h_j (e.g. from :meth:`elmo.ELMo.embeddings`) are treated as fixed features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ScalarMix(nnx.Module):
    """gamma * sum_j softmax(s)_j h_j over `num_representations` layers (num_layers + 1 for ELMo).

    Initialised to the plain average (s = 0, gamma = 1).  With `layer_norm=True` each layer is first
    normalised to zero mean and unit variance over its real (mask True) elements, the paper's option
    ("in some cases we found it helpful to apply layer normalization to each biLM layer before weighting").
    """

    def __init__(self, num_representations: int, *, layer_norm: bool = False, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted for a uniform constructor
        self.layer_norm = layer_norm
        self.scalars = nnx.Param(jnp.zeros((num_representations,), jnp.float32))
        self.gamma = nnx.Param(jnp.ones((), jnp.float32))

    def weights(self) -> jax.Array:
        """The normalised layer weights softmax(s) [num_representations] (they sum to 1)."""
        return jax.nn.softmax(self.scalars[...])

    def __call__(self, representations: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """representations [N, ..., D] (e.g. [L+1, B, T, 2d]), mask bool [...] or None -> [..., D]."""
        h = representations.astype(jnp.float32)
        if self.layer_norm:
            m = (jnp.ones(h.shape[1:-1], bool) if mask is None else mask)[None, ..., None]
            count = jnp.sum(m) * h.shape[-1]
            axes = tuple(range(1, h.ndim))
            mean = jnp.sum(jnp.where(m, h, 0.0), axis=axes, keepdims=True) / count
            var = jnp.sum(jnp.where(m, (h - mean) ** 2, 0.0), axis=axes, keepdims=True) / count
            h = (h - mean) / jnp.sqrt(var + 1e-12)
        w = self.weights().reshape((-1,) + (1,) * (h.ndim - 1))
        return self.gamma[...] * jnp.sum(w * h, axis=0)
