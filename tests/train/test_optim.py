"""AdamW (both layouts: flat ParamGroups and per leaf) against a float64 NumPy AdamW with clipping and masked decay."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import default_config
from jaxlm.models import transformer
from jaxlm.train import optim


def np_adamw(params, grads_per_step, cfg, total_steps):
    """float64 AdamW as the papers write it: clip by the global norm, bias-corrected moments, decoupled decay of
    matrices only, warmup then cosine decay of the learning rate."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        if norm > cfg.grad_clip:
            g = {k: x * cfg.grad_clip / norm for k, x in g.items()}
        step = t - 1
        if step < cfg.warmup_steps:
            lr = cfg.learning_rate * step / cfg.warmup_steps
        else:
            frac = min(step - cfg.warmup_steps, total_steps - cfg.warmup_steps) / (total_steps - cfg.warmup_steps)
            alpha = cfg.min_learning_rate / cfg.learning_rate
            lr = cfg.learning_rate * ((1 - alpha) * 0.5 * (1 + np.cos(np.pi * frac)) + alpha)
        for k in p:
            m[k] = cfg.beta1 * m[k] + (1 - cfg.beta1) * g[k]
            v[k] = cfg.beta2 * v[k] + (1 - cfg.beta2) * g[k] ** 2
            update = (m[k] / (1 - cfg.beta1 ** t)) / (np.sqrt(v[k] / (1 - cfg.beta2 ** t)) + 1e-8)
            if p[k].ndim >= 2:
                update = update + cfg.weight_decay * p[k]
            p[k] = p[k] - lr * update
    return p, m, v


def flat_dict(tree):
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def setup():
    c = default_config()
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.max_len = 1, 16, 2, 8
    c.optim.warmup_steps, c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip = 2, 3e-2, 0.1, 1.0
    model = transformer.Decoder(c.model, 11, rngs=nnx.Rngs(params=0))
    _, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    # large first gradients (norm >> 1: clipped) then small ones (not clipped)
    grads = [jax.tree.map(lambda x, s=s: (s * rng.standard_normal(x.shape)).astype(np.float32), params)
             for s in (3.0, 2.0, 0.01, 0.02, 0.01)]
    return c, params, grads


# With LARGE_LEAF 60 the toy model's six matrices and its two 64-element vectors (one not decayed: the mask
# must follow them) are updated as arrays of their own, its 16- and 48-element vectors stay flat.
SMALL_LARGE_LEAF = 60


@pytest.mark.parametrize("flat, large_leaf", [(True, optim.LARGE_LEAF), (True, SMALL_LARGE_LEAF),
                                              (False, optim.LARGE_LEAF)],
                         ids=["flat", "flat_with_large_leaves", "per_leaf"])
def test_adamw_matches_float64_reference(setup, flat, large_leaf, monkeypatch):
    cfg, params, grads = setup
    monkeypatch.setattr(optim, "LARGE_LEAF", large_leaf)
    if flat and large_leaf == SMALL_LARGE_LEAF:
        groups = optim.to_groups(params)
        assert {x.ndim for x in groups.large} == {1, 2} and groups.other.size > 0
    total = 10
    opt = optim.make_optimizer(cfg.optim, total, flat=flat)
    state = opt.init(params)
    p = params

    @jax.jit
    def step(p, g, state):
        laid_out = opt.layout(p)
        updates, state = opt.tx.update(opt.layout(g), state, laid_out)
        return opt.unlayout(jax.tree.map(lambda a, b: a + b, laid_out, updates), p), state

    for g in grads:
        p, state = step(p, g, state)
    ref_p, ref_m, ref_v = np_adamw(flat_dict(params), [flat_dict(g) for g in grads], cfg.optim, total)
    got_p = flat_dict(p)
    assert got_p.keys() == ref_p.keys() and len(got_p) > 5
    for k in ref_p:
        np.testing.assert_allclose(got_p[k], ref_p[k], rtol=2e-5, atol=2e-7, err_msg=k)
        assert not np.allclose(got_p[k], flat_dict(params)[k])   # every leaf moved
    # the checkpoint form holds per-leaf moments, whatever the layout at run time
    host = types_state(params, jax.tree.map(np.asarray, state))
    saved = opt.to_checkpoint(host).opt_state
    mu = flat_dict(saved[1][0].mu)
    nu = flat_dict(saved[1][0].nu)
    for k in ref_m:
        np.testing.assert_allclose(mu[k], ref_m[k], rtol=2e-5, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(nu[k], ref_v[k], rtol=2e-5, atol=1e-12, err_msg=k)
    back = opt.from_checkpoint(host.replace(opt_state=saved)).opt_state
    assert jax.tree.structure(back) == jax.tree.structure(host.opt_state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(host.opt_state)):
        np.testing.assert_array_equal(a, b)


def types_state(params, opt_state):
    from jaxlm.train.state import TrainState
    return TrainState(step=np.int32(0), params=jax.tree.map(np.asarray, params), opt_state=opt_state,
                      rng=np.zeros(2, np.uint32))


@pytest.mark.parametrize("large_leaf", [optim.LARGE_LEAF, SMALL_LARGE_LEAF])
def test_param_groups_round_trip_and_split_matrices_from_vectors(setup, large_leaf, monkeypatch):
    _, params, _ = setup
    monkeypatch.setattr(optim, "LARGE_LEAF", large_leaf)
    groups = optim.to_groups(params)
    leaves = jax.tree.leaves(params)
    small = [x for x in leaves if x.size < large_leaf]
    assert [x.shape for x in groups.large] == [x.shape for x in leaves if x.size >= large_leaf]
    assert groups.decayed.size == sum(x.size for x in small if x.ndim >= 2)
    assert groups.other.size == sum(x.size for x in small if x.ndim < 2) > 0
    back = optim.from_groups(groups, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), leaves):
        np.testing.assert_array_equal(a, b)
