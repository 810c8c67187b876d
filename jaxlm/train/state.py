"""TrainState: everything a checkpoint must hold for an exact resume (the data position is a function of step)."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: nnx.Param state; opt_state: optax state; rng: uint32 key data;
    carry: the recurrent state carried across steps in stateful truncated BPTT (None otherwise)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    carry: Any = None

    @classmethod
    def create(cls, params, tx, seed: int, carry=None) -> "TrainState":
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0x7472))   # independent of param init
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng, carry=carry)


def checkpoint_target(params, tx, seed: int, carry=None):
    """The TrainState a checkpoint restores into, as `jax.ShapeDtypeStruct`s (nothing is initialised), with
    the optimizer state in the per-leaf form checkpoints hold (`optim.Optimizer.to_checkpoint`).
    `params` may be abstract (models.build_model(..., abstract=True))."""
    return jax.eval_shape(lambda p, c: tx.to_checkpoint(TrainState.create(p, tx, seed, c)), params, carry)
