"""Data parallelism: wraps the pure step for jax.jit over a device mesh (default) or jax.pmap (legacy path).

Both strategies run the same `train_step`; only placement differs. Checkpoints always hold one host-side copy
of the state (`to_host`), so a run saved under one strategy or device count restores under any other.
Since JAX 0.8, `jax.pmap` is itself implemented as jit + shard_map over a 1-D mesh (JAX-NOTES.md §1).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

PMAP_AXIS = "batch"


class DataParallel:
    """Placement + wrapped steps for one strategy. Batches arrive as this process's rows (numpy)."""

    def __init__(self, strategy: str, train_step, eval_step):
        self.strategy = strategy
        self.devices = jax.devices()
        self.local_devices = jax.local_devices()
        if strategy == "pmap":
            self._train = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=(0,))
            self._eval = jax.pmap(eval_step, axis_name=PMAP_AXIS)
        else:
            self.mesh = jax.make_mesh((len(self.devices),), ("data",), axis_types=(AxisType.Auto,))
            self.replicated = NamedSharding(self.mesh, P())
            self.sharded = NamedSharding(self.mesh, P("data"))
            self._train_step, self._eval_step = train_step, eval_step
            self._train = None   # jitted on first use, when the state's sharding tree is known
            self._eval = jax.jit(eval_step)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def _state_shardings(self, state):
        """Everything replicated except the recurrent carry, whose rows follow the batch rows."""
        shardings = jax.tree.map(lambda _: self.replicated, state)
        if state.carry is not None:
            shardings = shardings.replace(carry=jax.tree.map(lambda _: self.sharded, state.carry))
        return shardings

    def place_state(self, state):
        """Host state (numpy or single-device arrays) -> state laid out for the wrapped step."""
        if self.strategy == "pmap":
            n = len(self.local_devices)
            carry = state.carry
            rep = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state.replace(carry=None))
            if carry is not None:
                carry = jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *x.shape[1:]), carry)
            return rep.replace(carry=carry)   # pmap transfers [devices, ...] host arrays itself
        shardings = self._state_shardings(state)
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x))
                            if s is self.sharded else jax.device_put(np.asarray(x), s), state, shardings)

    def abstract_state(self, state):
        """ShapeDtypeStructs of the host state, for checkpoint restore (on one device; place_state follows)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)

    def to_host(self, state):
        """The device state as numpy, one copy (pmap's replicas collapsed, the carry's shards concatenated)."""
        if self.strategy == "pmap":
            carry = state.carry
            rest = jax.tree.map(lambda x: np.asarray(x[0]), state.replace(carry=None))
            if carry is not None:
                carry = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), carry)
            return rest.replace(carry=carry)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), state)
        return jax.tree.map(np.asarray, state)

    def place_batch(self, batch: dict):
        """This process's rows -> a global batch sharded over the data axis (or [devices, rows/device, ...])."""
        if self.strategy == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch)

    def train_step(self, state, batch):
        if self._train is None:
            self._train = jax.jit(self._train_step, out_shardings=(self._state_shardings(state), self.replicated),
                                  donate_argnums=(0,))
        state, metrics = self._train(state, batch)
        return state, (jax.tree.map(lambda m: m[0], metrics) if self.strategy == "pmap" else metrics)

    def eval_step(self, state, batch, carry=None):
        """(sums, new_carry); carry is laid out like state.carry (use `place_carry` for a fresh one)."""
        sums, carry = self._eval(state.params, batch, carry)
        return (jax.tree.map(lambda m: m[0], sums) if self.strategy == "pmap" else sums), carry

    def place_carry(self, carry):
        """A host carry [batch, ...] laid out for the wrapped steps (rows follow the batch rows)."""
        if carry is None:
            return None
        if self.strategy == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *x.shape[1:]), carry)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), carry)

    def params(self, state):
        """The parameters as host numpy (for sampling and analysis)."""
        return self.to_host(state.replace(carry=None)).params


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None):
    """jax.distributed set-up: explicit addresses, or JAX's auto-detection (TPU pods, SLURM) when all are None."""
    if coordinator_address or num_processes or process_id is not None:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=120)
        return True
    return False


def check_batch_divisible(batch_size: int, grad_accum_steps: int) -> str | None:
    """A one-line reason the global batch cannot be split over this run's processes/devices, or None."""
    per_process = batch_size // jax.process_count()
    if batch_size % jax.process_count():
        return f"train.batch_size={batch_size} must be divisible by the number of processes ({jax.process_count()})"
    if per_process % jax.local_device_count():
        return (f"train.batch_size={batch_size} must be divisible by the number of devices "
                f"({jax.device_count()})")
    if (per_process // jax.local_device_count()) % grad_accum_steps and grad_accum_steps > 1:
        return f"train.grad_accum_steps={grad_accum_steps} must divide the per-device batch"
    return None

