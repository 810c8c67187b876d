"""Subprocess half of tests/test_parallel.py: runs with 8 simulated CPU devices (XLA_FLAGS set by the caller).

  python tests/parallel_worker.py strategies OUT.npz

Trains the same tiny GPT (AdamW) for 5 steps on the same batches under every placement: 1 device, jit over 8,
fsdp=4 (mesh 2 x 4), pmap over 8, and jit over 8 with 2 accumulated micro-batches.  Saves per-step
(loss, grad_norm), the final parameters and optimizer state, and for fsdp how many parameter / optimizer
elements one device holds; a stateful LSTM (carry split like the batch) on 1 device, jit 8 and pmap 8; and for
each model family (and GPT in causal query blocks) the number of all-gathers and all-reduces in its jit-8
train step.
"""

from __future__ import annotations

import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm import config as config_lib, models, parallel  # noqa: E402
from jaxlm.models import attention  # noqa: E402
from jaxlm.train import optim, state as state_lib, step as step_lib  # noqa: E402

VOCAB = 40
STEPS = 5


def tiny_config(**overrides):
    c = config_lib.default_config()
    c.model.name = "gpt"
    c.model.num_layers = 2
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.max_len = 16
    c.data.seq_len = 16
    c.train.batch_size = 16
    c.train.steps = 100
    c.optim.warmup_steps = 0
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def tokenizer():
    return types.SimpleNamespace(vocab_size=VOCAB, mask_id=VOCAB - 5, special_ids=tuple(range(VOCAB - 6, VOCAB)))


def batches(config, steps=STEPS):
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, VOCAB - 6, (config.train.batch_size, config.data.seq_len + 1)).astype(np.int32)}
            for _ in range(steps)]


def build(config, *, devices=None, fsdp=1):
    """(DataParallel, host TrainState, optim.Optimizer) for `config` on `devices`."""
    model = models.build_model(config.model, VOCAB, config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.make_optimizer(config.optim, config.train.steps, flat=fsdp == 1)   # as loop.setup does
    host_state = jax.tree.map(np.asarray, state_lib.TrainState.create(params, tx, config.seed))
    axis = parallel.PMAP_AXIS if config.parallel.strategy == "pmap" else None
    spec = step_lib.StepSpec.from_config(config, graphdef, tx, tokenizer(), axis_name=axis)
    dp = parallel.DataParallel(config.parallel.strategy, *step_lib.bind(spec), fsdp=fsdp, devices=devices)
    return dp, host_state, tx


def train(config, data, *, devices=None, fsdp=1):
    """Per-step losses and the final host state after training on `data` (optimizer state in the per-leaf
    form checkpoints hold, so runs with different layouts compare leaf by leaf)."""
    dp, host_state, tx = build(config, devices=devices, fsdp=fsdp)
    state = dp.place_state(host_state)
    losses = []
    for batch in data:
        state, metrics = dp.train_step(state, dp.place_batch(batch))
        m = jax.device_get(metrics)
        losses.append((m["train/loss"], m["train/grad_norm"]))
    return np.array(losses), tx.to_checkpoint(dp.to_host(state)), dp, state


def flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def strategies(out: str):
    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_default_matmul_precision", "highest")
    results = {}
    config = tiny_config()
    data = batches(config)
    runs = {
        "one": dict(devices=jax.devices()[:1]),
        "jit8": {},
        "fsdp4": dict(fsdp=4),
    }
    for name, kwargs in runs.items():
        losses, host, dp, state = train(config, data, **kwargs)
        results[f"{name}/losses"] = losses
        for k, v in flat(host.params).items():
            results[f"{name}/params{k}"] = v
        for k, v in flat(host.opt_state).items():
            results[f"{name}/opt{k}"] = v
        if name.startswith("fsdp"):   # the largest per-device piece of the params and of the optimizer state
            for part in ("params", "opt_state"):
                tree = getattr(state, part)
                results[f"{name}/{part}_local_elems"] = np.array(sum(
                    leaf.addressable_shards[0].data.size for leaf in jax.tree.leaves(tree)))
                results[f"{name}/{part}_elems"] = np.array(sum(leaf.size for leaf in jax.tree.leaves(tree)))
    pconfig = tiny_config(**{"parallel.strategy": "pmap"})
    losses, host, _, _ = train(pconfig, data)
    results["pmap8/losses"] = losses
    for k, v in flat(host.params).items():
        results[f"pmap8/params{k}"] = v
    aconfig = tiny_config(**{"train.grad_accum_steps": 2})
    losses, host, _, _ = train(aconfig, data)
    results["accum8/losses"] = losses
    for k, v in flat(host.params).items():
        results[f"accum8/params{k}"] = v
    # a stateful LSTM: the recurrent carry's rows are split like the batch rows and carried across steps
    for name, overrides, kwargs in (("lstm_one", {}, dict(devices=jax.devices()[:1])), ("lstm_jit8", {}, {}),
                                    ("lstm_pmap8", {"parallel.strategy": "pmap"}, {})):
        lconfig = tiny_config(**{"model.name": "lstm", "model.hidden_size": 16, "model.d_model": 8,
                                 "train.stateful": True, **overrides})
        dp, host_state, _ = build(lconfig, **kwargs)
        host_state = host_state.replace(carry=jax.tree.map(
            np.asarray, models.build_model(lconfig.model, VOCAB, 0).initial_carry(lconfig.train.batch_size)))
        state = dp.place_state(host_state)
        losses = []
        for batch in data[:3]:
            state, metrics = dp.train_step(state, dp.place_batch(batch))
            losses.append(float(jax.device_get(metrics["train/loss"])))
        host = dp.to_host(state)
        results[f"{name}/losses"] = np.array(losses)
        results[f"{name}/carry"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(host.carry)])
        state = dp.place_state(host)          # a checkpoint round trip of the carry, then one more step
        state, metrics = dp.train_step(state, dp.place_batch(data[3]))
        results[f"{name}/after_restore"] = np.array(float(jax.device_get(metrics["train/loss"])))
    # data parallelism over 8 devices must not gather the batch anywhere in a train step: a gathered batch means
    # every device computes the whole batch (the recurrent models' time-major reshapes once did that)
    min_query_block = attention.MIN_QUERY_BLOCK
    for model in ("gpt", "gpt_query_blocks", "bert", "rnn", "lstm", "elmo"):
        mconfig = tiny_config(**{"model.name": model.split("_")[0], "model.hidden_size": 16, "model.num_layers": 2})
        # gpt_query_blocks: causal attention in 4 query blocks of 4 (real runs split from 128 tokens on)
        attention.MIN_QUERY_BLOCK = 1 if model == "gpt_query_blocks" else min_query_block
        dp, host_state, _ = build(mconfig)
        state, batch = dp.place_state(host_state), dp.place_batch(data[0])
        step = jax.jit(dp._train_step, out_shardings=(dp.state_shardings(state), dp.replicated))   # as dp jits it
        hlo = step.lower(state, batch).compile().as_text()   # compiled once, never run
        results[f"gathers/{model}"] = np.array([hlo.count("all-gather("), hlo.count("all-reduce(")])
    attention.MIN_QUERY_BLOCK = min_query_block
    # randomness (dropout): jit over 8 draws exactly the 1-device masks; pmap draws per device
    dconfig = tiny_config(**{"model.dropout": 0.1})
    for name, kwargs, strategy in (("drop_one", dict(devices=jax.devices()[:1]), "jit"), ("drop_jit8", {}, "jit"),
                                   ("drop_pmap8", {}, "pmap")):
        dconfig.parallel.strategy = strategy
        results[f"{name}/losses"] = train(dconfig, data[:2], **kwargs)[0]
    np.savez(out, **results)


if __name__ == "__main__":
    {"strategies": strategies}[sys.argv[1]](*sys.argv[2:])
