"""Context ablation: d >= L is exactly the full-context loss; drop = truncation; perturbations touch only the far part."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.analysis import context

VOCAB, L = 13, 12
SPECIALS = (11, 12)   # pretend the last two ids are special; 12 is [MASK]


def build(name, position_encoding="learned"):
    c = config_lib.default_config().model
    c.name, c.num_layers, c.d_model, c.hidden_size, c.num_heads, c.max_len = name, 1, 8, 8, 2, 16
    c.position_encoding = position_encoding
    return nnx.split(models.build_model(c, VOCAB, 0), nnx.Param)


def windows(n=40, seed=0):
    return np.random.default_rng(seed).integers(0, 11, (n, L + 1)).astype(np.int32)


def direct_losses(graphdef, params, contexts, targets, kind):
    """Independent reference: one plain forward pass, -log softmax at the last position."""
    model = nnx.merge(graphdef, params)
    if kind == "masked":
        contexts = np.concatenate([contexts, np.full((len(contexts), 1), 12, np.int32)], axis=1)
    out, _ = model(jnp.asarray(contexts))
    if kind == "bidirectional":
        out = out[0]
    logp = np.asarray(jax.nn.log_softmax(out[:, -1]), np.float64)
    return -logp[np.arange(len(targets)), targets]


@pytest.mark.parametrize("name,kind", [("gpt", "causal"), ("lstm", "causal"), ("bert", "masked"),
                                       ("elmo", "bidirectional")])
def test_full_distance_is_the_full_context_loss(name, kind):
    graphdef, params = build(name)
    w = windows()
    ref = direct_losses(graphdef, params, w[:, :-1], w[:, -1], kind)
    results = {}
    for mode in context.MODES:
        results[mode] = context.context_ablation(graphdef, params, w, distances=[3, L, 2 * L], mode=mode,
                                                 vocab_size=VOCAB, special_ids=SPECIALS, mask_id=12, batch_size=16)
        assert results[mode][L] == results[mode][2 * L]            # bit for bit
        assert results[mode][L] == results["drop"][L]              # every mode leaves d >= L untouched
    mean, stderr = results["drop"][L]
    np.testing.assert_allclose(mean, ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(stderr, ref.std(ddof=1) / np.sqrt(len(ref)), rtol=1e-5)
    # a short context is a different (here: untrained, so merely different) loss
    assert results["drop"][3][0] != mean


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_drop_is_running_on_the_last_d_tokens(name):
    graphdef, params = build(name)
    w = windows()
    losses = context.context_ablation_losses(graphdef, params, w, distances=[1, 5], mode="drop", batch_size=32)
    for d in (1, 5):
        ref = direct_losses(graphdef, params, w[:, L - d:L], w[:, -1], "causal")
        np.testing.assert_allclose(losses[d], ref, rtol=1e-5, atol=1e-6)


def test_perturbations_touch_only_the_far_context():
    rng = np.random.default_rng(0)
    c = windows(200)[:, :-1]
    d = 4
    shuffled = context.perturb(c, d, "shuffle", rng)
    np.testing.assert_array_equal(shuffled[:, -d:], c[:, -d:])
    np.testing.assert_array_equal(np.sort(shuffled[:, :-d], axis=1), np.sort(c[:, :-d], axis=1))
    assert (shuffled[:, :-d] != c[:, :-d]).mean() > 0.5
    allowed = np.arange(5)
    randomized = context.perturb(c, d, "random", rng, replacement_ids=allowed)
    np.testing.assert_array_equal(randomized[:, -d:], c[:, -d:])
    assert np.isin(randomized[:, :-d], allowed).all()
    assert context.perturb(c, d, "drop", rng).shape == (200, d)
    assert context.perturb(c, L, "shuffle", rng) is c


def test_random_never_draws_special_tokens():
    graphdef, params = build("gpt")
    w = windows(8)
    # only the far part differs between distances: with all ids but one special, "random" fills it with that id
    specials = tuple(range(1, VOCAB))
    out = context.context_ablation_losses(graphdef, params, w, distances=[2], mode="random",
                                          vocab_size=VOCAB, special_ids=specials)
    filled = w.copy()
    filled[:, :L - 2] = 0
    ref = direct_losses(graphdef, params, filled[:, :-1], filled[:, -1], "causal")
    np.testing.assert_allclose(out[2], ref, rtol=1e-5, atol=1e-6)


def test_effective_context_is_measured_against_the_best_loss():
    results = {1: (3.0, 0.1), 2: (2.5, 0.1), 4: (2.015, 0.1), 8: (2.0, 0.1), 16: (2.1, 0.1)}
    assert context.effective_context(results, 0.01) == 4          # full context (16) is worse than 8
    assert context.effective_context(results, 0.0) == 8
    assert context.effective_context({k: v[0] for k, v in results.items()}, 0.3) == 2
    assert context.distance_grid(12) == [1, 2, 4, 8, 12]
    assert context.distance_grid(16) == [1, 2, 4, 8, 16]


def test_bad_arguments():
    graphdef, params = build("gpt")
    with pytest.raises(ValueError, match="mode"):
        context.context_ablation(graphdef, params, windows(4), distances=[1], mode="blur")
    with pytest.raises(ValueError, match=">= 1"):
        context.context_ablation(graphdef, params, windows(4), distances=[0])
    with pytest.raises(ValueError, match="vocab_size"):
        context.context_ablation(graphdef, params, windows(4), distances=[1], mode="random")


@pytest.mark.parametrize("name,objective,kind", [("bert", "causal_lm", "causal"), ("gpt", "masked_lm", "masked")])
def test_analyze_run_hooks_score_the_objective_the_model_was_trained_with(name, objective, kind):
    """A bert trained with causal_lm (or a gpt with masked_lm) is analysed as such: the ablation's full-context
    loss against a plain forward pass of that kind, and sensitivity at that kind's positions (the class's own
    kind was used before: a bert with causal_lm failed on a [MASK] appended past max_len)."""
    import types
    from jaxlm.analysis import hooks
    graphdef, params = build(name)
    w = windows()
    tok = types.SimpleNamespace(vocab_size=VOCAB, special_ids=SPECIALS, mask_id=12)
    ablation = hooks.run_ablation(graphdef, params, w, tokenizer=tok, modes=("drop",), tolerance=0.01, seed=0,
                                  objective=objective)
    ref = direct_losses(graphdef, params, w[:, :-1], w[:, -1], kind)
    np.testing.assert_allclose(ablation["full_context_loss"], ref.mean(), rtol=1e-6)
    sens, _ = hooks.run_sensitivity(graphdef, params, w[:8, :L], objective=objective, mask_id=12, out_dir=None)
    assert sens["target_positions"] == hooks.sensitivity_positions(kind, L).tolist()


def test_paired_increase_cancels_what_the_windows_share():
    """Each window's own difficulty cancels window by window: a constant change of loss has zero paired error."""
    difficulty = np.random.default_rng(0).gamma(2.0, 1.0, 500)          # per-window offsets, shared by every d
    losses = {1: difficulty + 0.75, 4: difficulty + 0.25, 16: difficulty}
    inc = context.paired_increase(losses, 16)
    assert inc[1] == pytest.approx((0.75, 0.0), abs=1e-12) and inc[16] == (0.0, 0.0)
    assert context.summarize(losses)[1][1] > 0.05                        # the unpaired error sees the spread


def test_ablation_reports_the_increase_over_full_context_with_its_paired_error():
    """run_ablation's increase against float64 NumPy over direct forward passes on the last d tokens (gpt)."""
    from jaxlm.analysis import hooks
    import types
    graphdef, params = build("gpt")
    w = windows(n=48, seed=3)
    tok = types.SimpleNamespace(vocab_size=VOCAB, special_ids=SPECIALS, mask_id=12)
    out = hooks.run_ablation(graphdef, params, w, tokenizer=tok, modes=("drop",), tolerance=0.01, seed=0)
    full = direct_losses(graphdef, params, w[:, :-1], w[:, -1], "causal")
    for d in out["grid"]:
        diff = direct_losses(graphdef, params, w[:, L - d:-1], w[:, -1], "causal") - full
        mean, stderr = out["increase"]["drop"][str(d)]
        np.testing.assert_allclose(mean, diff.mean(), atol=1e-6)
        np.testing.assert_allclose(stderr, diff.std(ddof=1) / np.sqrt(len(diff)), rtol=1e-4, atol=1e-7)
    assert out["increase"]["drop"][str(L)] == [0.0, 0.0]
    report = hooks.run_report({"workdir": "w", "model": "gpt", "kind": "causal", "step": 1, "data_source": "x",
                               "seq_len": L, "sensitivity": {"num_sequences": 1, "target_positions": [1],
                                                             "relative": {}}, "ablation": out}, [])
    mean, stderr = out["increase"]["drop"]["1"]
    assert f"| drop | {mean:+.3f} ± {stderr:.3f} |" in report


def test_effective_context_interval_is_a_paired_bootstrap_of_the_same_rule():
    rng = np.random.default_rng(1)
    difficulty = rng.gamma(2.0, 1.0, 300)                     # shared by every d: the pairing must keep it
    losses = {1: difficulty + 0.30, 2: difficulty + 0.08, 4: difficulty + 0.02, 8: difficulty, 16: difficulty}
    for d in losses:
        losses[d] = losses[d] + rng.normal(0.0, 0.05, 300)
    lo, hi = context.effective_context_interval(losses, 0.01, level=0.9, resamples=200, seed=7)
    # reference: the same draws, the rule of effective_context applied to each resample's means, written out
    picks = np.random.default_rng(7).integers(0, 300, (200, 300))
    effective = sorted(context.effective_context({d: float(v[p].mean()) for d, v in losses.items()}, 0.01)
                       for p in picks)
    assert (lo, hi) == (effective[int(np.floor(0.05 * 199))], effective[int(np.ceil(0.95 * 199))])
    point = context.effective_context(context.summarize(losses), 0.01)
    assert lo <= point <= hi and lo < hi                       # noise at the 1% tolerance: a genuine spread
    exact = {d: difficulty + {1: 1.0, 2: 0.5, 4: 0.2, 8: 0.0, 16: 0.0}[d] for d in losses}   # 4: ~10% above
    assert context.effective_context_interval(exact, 0.01) == (8, 8)   # no noise beyond the shared part


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_mask_hides_the_far_context_and_keeps_the_positions(name):
    """mode='mask': the far tokens do not matter (randomising them changes nothing), d >= L is the full context,
    and with every position embedding equal (no position information) hiding the far tokens is dropping them:
    the same function, so the same losses."""
    graphdef, params = build(name)
    kind = "masked" if name == "bert" else "causal"
    w = windows()
    kw = dict(distances=[2, 5, L], mode="mask", mask_id=12, batch_size=16)
    losses = context.context_ablation_losses(graphdef, params, w, **kw)
    noisy = w.copy()
    noisy[:, :L - 5] = np.random.default_rng(1).integers(0, 12, noisy[:, :L - 5].shape)
    np.testing.assert_allclose(context.context_ablation_losses(graphdef, params, noisy, **kw)[5], losses[5], rtol=1e-6)
    np.testing.assert_array_equal(losses[L], context.context_ablation_losses(
        graphdef, params, w, distances=[L], mode="drop", mask_id=12, batch_size=16)[L])
    assert not np.allclose(losses[2], losses[L])
    moved = context.context_ablation_losses(graphdef, params, w, distances=[5], mode="drop", mask_id=12, batch_size=16)
    assert not np.allclose(losses[5], moved[5])   # with its own position embeddings the target's position matters
    model = nnx.merge(graphdef, params)
    table = model.pos_embed.embedding
    table[...] = jnp.broadcast_to(table[...][:1], table.shape)
    graphdef, flat = nnx.split(model, nnx.Param)
    drop = context.context_ablation_losses(graphdef, flat, w, distances=[2, 5], mode="drop", mask_id=12, batch_size=16)
    hide = context.context_ablation_losses(graphdef, flat, w, distances=[2, 5], mode="mask", mask_id=12, batch_size=16)
    for d in (2, 5):
        np.testing.assert_allclose(hide[d], drop[d], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hide[d], direct_losses(graphdef, flat, w[:, L - d:L], w[:, -1], kind), rtol=1e-5)


@pytest.mark.parametrize("encoding", ["rope", "none"])
@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_with_relative_positions_only_dropping_is_masking(name, encoding):
    """rope and no positions: attention sees only relative positions, so drop (the target moves to position d - 1)
    and mask (it stays at L - 1) are the same function; learned positions are the case where they differ."""
    graphdef, params = build(name, encoding)
    w = windows()
    kw = dict(distances=[2, 5, 9], mask_id=12, batch_size=16)
    drop = context.context_ablation_losses(graphdef, params, w, mode="drop", **kw)
    hide = context.context_ablation_losses(graphdef, params, w, mode="mask", **kw)
    for d in (2, 5, 9):
        np.testing.assert_allclose(hide[d], drop[d], rtol=1e-5, atol=1e-6)
    assert not np.allclose(drop[2], drop[9])


def test_mask_needs_a_transformer():
    graphdef, params = build("lstm")
    with pytest.raises(ValueError, match="needs a transformer"):
        context.context_ablation_losses(graphdef, params, windows(), distances=[2], mode="mask")
