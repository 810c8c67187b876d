"""Pure train_step / eval_step: (state, batch) -> (state, metrics). Wrapped with jit or pmap in parallel.py.

Losses are carried as sums and counts (objectives.py) and divided once at the end, so the mean is exact
however the batch is split across micro-batches (gradient accumulation), devices or processes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import objectives
from jaxlm.data import synthetic


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of a step, bound once with functools.partial (hashable, so jit never retraces)."""

    graphdef: Any
    optimizer: Any                 # optim.Optimizer
    objective: str
    mask_prob: float
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    stateful: bool
    grad_accum_steps: int
    skip_nonfinite: bool
    axis_name: str | None = None   # set for pmap: sums are psum'd over this axis

    @classmethod
    def from_config(cls, config, graphdef, optimizer, tokenizer, axis_name=None) -> "StepSpec":
        return cls(graphdef=graphdef, optimizer=optimizer, objective=config_lib.objective_name(config),
                   mask_prob=config.objective.mask_prob, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                   special_ids=tuple(tokenizer.special_ids), stateful=config.train.stateful,
                   grad_accum_steps=config.train.grad_accum_steps, skip_nonfinite=config.train.skip_nonfinite,
                   axis_name=axis_name)


def apply_model(graphdef, params, tokens, carry=None, *, mask=None, dropout_key=None, positions=None):
    """Run the model functionally: merge inside the trace, call, return (logits, new_carry).

    positions: int [B, K] or None: logits at only these positions ([B, K, V])."""
    extra = {} if positions is None else {"positions": positions}
    return nnx.merge(graphdef, params)(tokens, carry, mask=mask, dropout_key=dropout_key, **extra)


def bert_masking(spec: StepSpec, inputs, mask_key):
    """BERT corruption of `inputs` [B, T] with at most K = objectives.max_selected(T, mask_prob) selections per row
    -> (masked inputs, selected bool [B, T], K)."""
    per_row = objectives.max_selected(inputs.shape[1], spec.mask_prob)
    masked, selected = objectives.mask_tokens(inputs, mask_key, mask_prob=spec.mask_prob, mask_id=spec.mask_id,
                                              vocab_size=spec.vocab_size, special_ids=spec.special_ids,
                                              max_per_row=per_row)
    return masked, selected, per_row


def masked_lm_sums(spec: StepSpec, params, inputs, carry=None, *, dropout_key, mask_key):
    """BERT masking of `inputs` [B, T], then ((loss_sum, count, correct_sum), new carry) with the model's output
    layers run only at the selected positions (BERT's gather_indexes).

    Selections are capped per row at K = objectives.max_selected(T, mask_prob) (a row would exceed it with
    probability below 1e-9), which gives them a static count: the MLM head and the [d, V] output projection run
    at K positions instead of T (T = 128, p = 0.15: 47).
    """
    masked, selected, per_row = bert_masking(spec, inputs, mask_key)
    positions, real = objectives.selected_positions(selected, per_row)
    logits, carry = apply_model(spec.graphdef, params, masked, carry, dropout_key=dropout_key, positions=positions)
    return objectives.masked_lm_loss(logits, jnp.take_along_axis(inputs, positions, axis=1), real), carry


def objective_sums(spec: StepSpec, params, batch, carry, *, dropout_key=None, mask_key=None) -> tuple[dict, Any]:
    """Forward pass + objective. Returns ({"loss", "tokens", "correct", ...}: float32 sums, new_carry).

    batch["tokens"] is [B, T+1]; inputs are the first T tokens. dropout_key=None means no dropout (eval);
    mask_key draws the masked-LM corruption (eval passes a fixed one so every eval scores the same positions).
    """
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    if spec.objective == "causal_lm":
        logits, carry = apply_model(spec.graphdef, params, inputs, carry, dropout_key=dropout_key)
        loss, count, correct = objectives.causal_lm_loss(logits, targets, weights)
        return {"loss": loss, "tokens": count, "correct": correct}, carry
    if spec.objective == "masked_lm":
        if "weights" in batch:   # synthetic tasks: mask exactly the answers, which must come from the context
            masked, selected = synthetic.mask_answers(tokens, batch["weights"], spec.mask_id)
            logits, carry = apply_model(spec.graphdef, params, masked, carry, dropout_key=dropout_key)
            loss, count, correct = objectives.masked_lm_loss(logits, inputs, selected)
        else:
            (loss, count, correct), carry = masked_lm_sums(spec, params, inputs, carry, dropout_key=dropout_key,
                                                           mask_key=mask_key)
        return {"loss": loss, "tokens": count, "correct": correct}, carry
    # bidirectional_lm (ELMo): forward predicts t+1, backward predicts t-1, over the same T inputs
    mask = batch.get("mask", jnp.ones(inputs.shape, bool))
    (fwd, bwd), _ = apply_model(spec.graphdef, params, inputs, mask=mask, dropout_key=dropout_key)
    if "weights" in batch:   # synthetic tasks: only the forward direction can see the cue before an answer
        fs, fc, fk = objectives.causal_lm_loss(fwd[:, :-1], inputs[:, 1:], batch["weights"][:, :-1])
        zero = jnp.zeros((), jnp.float32)
        return {"loss": fs, "tokens": fc, "correct": fk, "forward_loss": fs, "forward_tokens": fc,
                "backward_loss": zero, "backward_tokens": zero}, carry
    parts = objectives.bidirectional_lm_loss(fwd, bwd, inputs, mask)
    (fs, fc, fk), (bs, bc, bk) = parts["forward"], parts["backward"]
    return {"loss": fs + bs, "tokens": fc + bc, "correct": fk + bk,
            "forward_loss": fs, "forward_tokens": fc, "backward_loss": bs, "backward_tokens": bc}, carry


def _psum(tree, axis_name):
    return jax.lax.psum(tree, axis_name) if axis_name else tree


def _grad_sums(spec: StepSpec, params, batch, carry, key):
    """Summed loss gradients over grad_accum_steps micro-batches (scan), plus summed metrics and new carry."""
    def loss_and_aux(p, micro, c, k):
        dropout_key, mask_key = jax.random.split(k)
        sums, new_c = objective_sums(spec, p, micro, c, dropout_key=dropout_key, mask_key=mask_key)
        return sums["loss"], (sums, new_c)

    grad_fn = jax.grad(loss_and_aux, has_aux=True)
    n = spec.grad_accum_steps
    if n == 1:
        grads, (sums, carry) = grad_fn(params, batch, carry, key)
        return grads, sums, carry
    # micro-batch i = rows i, i+n, i+2n, ...: strided, so each micro-batch stays spread over every device of
    # the data axis (contiguous slices would land on a few devices and make XLA all-gather the batch)
    split = lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    micro_batches = jax.tree.map(split, batch)
    micro_carry = jax.tree.map(split, carry)

    def body(acc, xs):
        micro, c, i = xs
        g, (s, new_c) = grad_fn(params, micro, c, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, acc, (g, s)), new_c

    zero_sums = jax.eval_shape(lambda: objective_sums(spec, params, jax.tree.map(lambda x: x[0], micro_batches),
                                                      jax.tree.map(lambda x: x[0], micro_carry),
                                                      dropout_key=key, mask_key=key)[0])
    zeros = jax.tree.map(jnp.zeros_like, (params, zero_sums))
    (grads, sums), new_carry = jax.lax.scan(body, zeros, (micro_batches, micro_carry, jnp.arange(n)))
    return grads, sums, jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), new_carry)


def train_step(state, batch, *, spec: StepSpec):
    """One optimizer update on one global batch. Pure: the dropout/masking key is fold_in(rng, step)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    carry = state.carry if spec.stateful else None
    grads, sums, new_carry = _grad_sums(spec, state.params, batch, carry, key)
    grads, sums = _psum((grads, sums), spec.axis_name)
    count = jnp.maximum(sums["tokens"], 1.0)
    opt = spec.optimizer
    params = opt.layout(state.params)   # two flat vectors unless fsdp: a few kernels for the whole update
    grads = jax.tree.map(lambda g: g / count, opt.layout(grads))
    updates, opt_state = opt.tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    loss = sums["loss"] / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if spec.skip_nonfinite:      # keep the old parameters and optimizer state; count the skip
        new_params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (new_params, opt_state), (params, state.opt_state))
    if spec.stateful:            # truncated BPTT: carry the state forward, not its gradient
        new_carry = jax.lax.stop_gradient(new_carry)
    else:
        new_carry = state.carry
    metrics = summarize(sums)
    metrics.update({"train/grad_norm": grad_norm, "train/param_norm": optax.tree.norm(new_params),
                    "train/nonfinite": 1.0 - finite.astype(jnp.float32)})
    new_state = state.replace(step=state.step + 1, params=opt.unlayout(new_params, state.params),
                              opt_state=opt_state, carry=new_carry)
    return new_state, metrics


def summarize(sums: dict, prefix: str = "train") -> dict:
    """Sums -> the DESIGN.md metric names (means over scored tokens)."""
    count = jnp.maximum(sums["tokens"], 1.0)
    out = {f"{prefix}/loss": sums["loss"] / count, f"{prefix}/accuracy": sums["correct"] / count}
    if "forward_loss" in sums:
        out[f"{prefix}/forward_loss"] = sums["forward_loss"] / jnp.maximum(sums["forward_tokens"], 1.0)
        out[f"{prefix}/backward_loss"] = sums["backward_loss"] / jnp.maximum(sums["backward_tokens"], 1.0)
    return out


def eval_step(params, batch, carry, *, spec: StepSpec):
    """Objective sums on one batch without dropout (masked-LM masking from a fixed key: same every eval).

    carry: the recurrent state from the previous eval batch (stateful evaluation over valid streams) or None.
    Returns (sums, new_carry).
    """
    sums, carry = objective_sums(spec, params, batch, carry if spec.stateful else None, mask_key=jax.random.key(1234))
    return _psum(sums, spec.axis_name), (carry if spec.stateful else None)


def bind(spec: StepSpec) -> tuple[Callable, Callable]:
    """(train_step, eval_step) with the static spec bound, ready for parallel.wrap."""
    return functools.partial(train_step, spec=spec), functools.partial(eval_step, spec=spec)
