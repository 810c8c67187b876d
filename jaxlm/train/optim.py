"""AdamW with linear warmup, cosine (or linear/constant) decay, global-norm clipping and a weight-decay mask.

The update runs on the parameters laid out as two flat vectors (:class:`ParamGroups`: the matrices AdamW decays,
and the rest) rather than leaf by leaf: XLA then emits a handful of kernels for the whole update instead of
several per parameter array (GPT tiny's step: 410 fusions before, 243 after), which cuts compile time,
cache-load time and tracing.  Arrays of LARGE_LEAF elements or more stay arrays of their own: concatenating
them (params and gradients, every step) costs more than the few kernels of their own update.  Under fsdp each
parameter keeps its own shards, so the update stays per leaf there.  Checkpoints always hold the per-leaf form
(:meth:`Optimizer.to_checkpoint`), whatever the layout at run time.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then decay to `min_learning_rate`."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.min_learning_rate / cfg.learning_rate)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, cfg.min_learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def is_decayed(p) -> bool:
    """Decay matrices only: biases, norm scales and other vectors are left alone (as in GPT-2/nanoGPT)."""
    return np.ndim(p) >= 2


def decay_mask(params):
    return jax.tree.map(is_decayed, params)


# Arrays from this many elements (2 MB in fp32) are updated on their own, not concatenated into a group: on the
# 2-core Zen 5 VM the two 4.3M-element concatenations of LSTM small's step (its four 1M-element matrices and the
# rest) took ~35 ms of a 465 ms step (benchmarks/README.md).
LARGE_LEAF = 1 << 19


def _is_large(x) -> bool:
    return int(np.size(x)) >= LARGE_LEAF


class ParamGroups(NamedTuple):
    """A parameter tree (or its gradient, or an Adam moment) as two flat vectors plus its large arrays as they are,
    leaves in tree order."""

    decayed: jax.Array   # every matrix below LARGE_LEAF elements, raveled and concatenated
    other: jax.Array     # biases, norm scales and other vectors below LARGE_LEAF elements
    large: tuple         # the arrays of LARGE_LEAF elements or more, as they are


def to_groups(tree) -> ParamGroups:
    """Ravel and concatenate the leaves of `tree` into its two vectors, keep its large arrays as they are (NumPy
    in, NumPy out; traced otherwise)."""
    leaves = jax.tree.leaves(tree)
    if len({x.dtype for x in leaves}) > 1:   # concatenating would silently promote
        dtypes = sorted({str(x.dtype) for x in leaves})
        raise ValueError(f"the flat optimizer layout needs one parameter dtype, got {dtypes}")
    xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
    dtype = leaves[0].dtype if leaves else np.float32

    def cat(want):
        parts = [x.reshape(-1) for x in leaves if not _is_large(x) and is_decayed(x) == want]
        return xp.concatenate(parts) if parts else xp.zeros((0,), dtype)
    return ParamGroups(cat(True), cat(False), tuple(x for x in leaves if _is_large(x)))


def from_groups(groups: ParamGroups, like):
    """The inverse of `to_groups`: slices of the two vectors and the large arrays, ordered like the leaves of
    `like`."""
    leaves, treedef = jax.tree.flatten(like)
    offsets, out, large = {True: 0, False: 0}, [], iter(groups.large)
    for x in leaves:
        if _is_large(x):
            out.append(next(large))
            continue
        group, size = is_decayed(x), int(np.size(x))
        vector = groups.decayed if group else groups.other
        out.append(vector[offsets[group]:offsets[group] + size].reshape(np.shape(x)))
        offsets[group] += size
    return jax.tree.unflatten(treedef, out)


def _groups_decay_mask(groups: ParamGroups) -> ParamGroups:
    return ParamGroups(True, False, tuple(is_decayed(x) for x in groups.large))


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """An optax transformation plus the layout it runs on: `ParamGroups` when `flat`, the parameter tree if not."""

    tx: optax.GradientTransformation
    flat: bool

    def layout(self, tree):
        """Parameters (or gradients) in the layout `tx` updates."""
        return to_groups(tree) if self.flat else tree

    def unlayout(self, laid_out, like):
        """Back to the parameter tree `like`."""
        return from_groups(laid_out, like) if self.flat else laid_out

    def init(self, params):
        return self.tx.init(self.layout(params))

    def to_checkpoint(self, state):
        """A host TrainState with its optimizer state in the per-leaf form checkpoints hold."""
        if not self.flat:
            return state
        is_groups = lambda x: isinstance(x, ParamGroups)   # noqa: E731
        opt_state = jax.tree.map(lambda x: from_groups(x, state.params) if is_groups(x) else x, state.opt_state,
                                 is_leaf=is_groups)
        return state.replace(opt_state=opt_state)

    def from_checkpoint(self, state):
        """The inverse of `to_checkpoint`: a restored host TrainState in this optimizer's layout."""
        if not self.flat:
            return state
        params_def = jax.tree.structure(state.params)
        is_params = lambda x: not _is_array(x) and jax.tree.structure(x) == params_def   # noqa: E731
        opt_state = jax.tree.map(lambda x: to_groups(x) if is_params(x) else x, state.opt_state, is_leaf=is_params)
        return state.replace(opt_state=opt_state)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array, np.generic))


def make_optimizer(cfg, total_steps: int, *, flat: bool = True) -> Optimizer:
    """The optimizer for `config.optim`; gradient clipping comes first so the norm is the raw gradient's.

    flat=False (fsdp) updates leaf by leaf; both give the same result up to float summation order."""
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    chain.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2,
                             weight_decay=cfg.weight_decay, mask=_groups_decay_mask if flat else decay_mask))
    return Optimizer(optax.chain(*chain), flat)


def from_config(config) -> Optimizer:
    """What a run trains with: `config.optim` over `train.steps`, flat unless fsdp shards each parameter."""
    return make_optimizer(config.optim, config.train.steps, flat=config.parallel.fsdp == 1)
