"""Objectives vs float64 NumPy cross-entropy; BERT masking statistics (Devlin et al. 2019)."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import objectives


def numpy_ce(logits, targets, weights):
    """float64 reference: (sum w * nll, sum w, sum w * correct)."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(weights, np.float64)
    correct = (logp.argmax(-1) == targets).astype(np.float64)
    return (nll * w).sum(), w.sum(), (correct * w).sum()


def random_case(seed, b=3, t=7, v=11):
    rs = np.random.RandomState(seed)
    logits = (rs.randn(b, t, v) * 3).astype(np.float32)
    targets = rs.randint(0, v, (b, t))
    weights = (rs.rand(b, t) < 0.6).astype(np.float32) * rs.rand(b, t).astype(np.float32)
    return logits, targets, weights


def test_causal_lm_loss_matches_numpy_with_weights():
    logits, targets, weights = random_case(0)
    got = objectives.causal_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    want = numpy_ce(logits, targets, weights)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(float(g), w, rtol=1e-5)


def test_causal_lm_loss_gradient_is_softmax_minus_onehot():
    logits, targets, weights = random_case(5)
    grad = jax.grad(lambda x: objectives.causal_lm_loss(x, jnp.asarray(targets), jnp.asarray(weights))[0])(
        jnp.asarray(logits))
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = (p - np.eye(x.shape[-1])[targets]) * weights[..., None]
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_accuracy_counts_argmax_hits():
    logits = jnp.array([[[0.0, 2.0, 1.0], [3.0, 0.0, -1.0], [0.0, 0.0, 5.0]]])
    _, count, correct = objectives.causal_lm_loss(logits, jnp.array([[1, 1, 2]]), jnp.array([[1.0, 1.0, 0.5]]))
    assert float(count) == 2.5 and float(correct) == 1.5


def test_causal_lm_loss_bfloat16_logits_upcast():
    logits, targets, weights = random_case(1)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = objectives.causal_lm_loss(lb, jnp.asarray(targets), jnp.asarray(weights))
    want = numpy_ce(np.asarray(lb.astype(jnp.float32)), targets, weights)
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5)


def test_masked_lm_loss_counts_exactly_selected_positions():
    logits, targets, _ = random_case(2)
    selected = np.random.RandomState(3).rand(*targets.shape) < 0.3
    got = objectives.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(selected))
    nll, count, correct = numpy_ce(logits[selected][None], targets[selected][None], np.ones((1, selected.sum())))
    np.testing.assert_allclose([float(x) for x in got], [nll, count, correct], rtol=1e-5)
    assert float(got[1]) == selected.sum()


def test_bidirectional_lm_loss_matches_numpy():
    rs = np.random.RandomState(4)
    b, t, v = 3, 8, 9
    fwd, bwd = rs.randn(2, b, t, v).astype(np.float32)
    tokens = rs.randint(0, v, (b, t))
    lengths = np.array([8, 5, 1])
    mask = np.arange(t)[None] < lengths[:, None]
    got = objectives.bidirectional_lm_loss(jnp.asarray(fwd), jnp.asarray(bwd), jnp.asarray(tokens), jnp.asarray(mask))
    # Explicit loops over the real pairs (t, t+1) as the reference.
    f_l, b_l, n = [], [], 0
    for i in range(b):
        for j in range(lengths[i] - 1):
            f_l.append(numpy_ce(fwd[i, j][None, None], tokens[i, j + 1][None, None], [[1.0]]))
            b_l.append(numpy_ce(bwd[i, j + 1][None, None], tokens[i, j][None, None], [[1.0]]))
            n += 1
    for key, ref in (("forward", f_l), ("backward", b_l)):
        want = np.sum(np.array(ref), axis=0)
        np.testing.assert_allclose([float(x) for x in got[key]], want, rtol=1e-5)
        assert float(got[key][1]) == n == 7 + 4


SPECIALS = (256, 257, 258, 259, 260, 261)
MASK_ID, PAD_ID = 257, 256


def masking_batch(seed=0, b=64, t=2048):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, 262, (b, t)).astype(np.int32)      # includes special ids by chance
    lengths = rs.randint(t // 2, t + 1, b)
    valid = np.arange(t)[None] < lengths[:, None]
    tokens[~valid] = PAD_ID
    return tokens, valid


def run_mask(tokens, valid, seed, mask_prob=0.15):
    fn = jax.jit(lambda x, v, k: objectives.mask_tokens(x, k, mask_prob=mask_prob, mask_id=MASK_ID,
                                                        vocab_size=262, special_ids=SPECIALS, valid=v))
    inputs, selected = fn(jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(seed))
    return np.asarray(inputs), np.asarray(selected)


def within_4_std(count, n, p):
    mean, std = n * p, np.sqrt(n * p * (1 - p))
    return abs(count - mean) <= 4 * std


def test_mask_tokens_statistics():
    tokens, valid = masking_batch()
    inputs, selected = run_mask(tokens, valid, 0)
    eligible = valid & ~np.isin(tokens, SPECIALS)
    assert eligible.sum() >= 100_000
    assert not selected[~eligible].any(), "special tokens or padding were selected"
    assert (inputs[~selected] == tokens[~selected]).all(), "unselected tokens changed"
    n = int(selected.sum())
    assert within_4_std(n, int(eligible.sum()), 0.15), n / eligible.sum()
    masked = inputs[selected] == MASK_ID
    changed = (inputs[selected] != MASK_ID) & (inputs[selected] != tokens[selected])
    kept = inputs[selected] == tokens[selected]
    # A random replacement equals the original with probability 1/256 (counted as kept).
    assert within_4_std(masked.sum(), n, 0.8)
    assert within_4_std(changed.sum(), n, 0.1 * 255 / 256)
    assert within_4_std(kept.sum(), n, 0.1 + 0.1 / 256)
    # Random replacements come from the non-special vocabulary only, roughly uniformly.
    replaced = inputs[selected][changed]
    assert not np.isin(replaced, SPECIALS).any()
    assert replaced.min() >= 0 and replaced.max() <= 255


def test_mask_tokens_random_replacements_uniform_over_non_special_vocab():
    tokens = jnp.zeros((50, 2000), jnp.int32)                 # all eligible, all id 0
    inputs, selected = objectives.mask_tokens(tokens, jax.random.key(5), mask_prob=0.5, mask_id=3,
                                              vocab_size=10, special_ids=(3, 7))
    inputs, selected = np.asarray(inputs), np.asarray(selected)
    n_random = int((selected & (inputs != 3)).sum())          # random + kept (a random draw of 0 looks kept)
    counts = np.bincount(inputs[selected & (inputs != 3)], minlength=10)
    assert counts[7] == 0 and counts[3] == 0
    draw_p = 0.1 / 0.2 / 8                                     # P(random) * P(id | random) among non-[MASK]
    for i in (1, 2, 4, 5, 6, 8, 9):
        assert within_4_std(counts[i], n_random, draw_p), (i, counts)
    assert within_4_std(counts[0], n_random, 0.5 + draw_p)     # kept + drew 0


def test_mask_tokens_deterministic_per_rng():
    tokens, valid = masking_batch(1, b=8, t=512)
    a, sa = run_mask(tokens, valid, 7)
    b, sb = run_mask(tokens, valid, 7)
    c, sc = run_mask(tokens, valid, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)
    assert (sa != sc).any() and (a != c).any()


@pytest.mark.parametrize("mask_prob", [0.0, 0.5])
def test_mask_tokens_other_probabilities(mask_prob):
    tokens, valid = masking_batch(2, b=16, t=1024)
    _, selected = run_mask(tokens, valid, 3, mask_prob)
    eligible = valid & ~np.isin(tokens, SPECIALS)
    assert within_4_std(int(selected.sum()), int(eligible.sum()), mask_prob)


@pytest.mark.parametrize("length,mask_prob", [(16, Fraction(3, 20)), (128, Fraction(3, 20)), (256, Fraction(3, 20)),
                                              (64, Fraction(1, 2)), (32, Fraction(9, 10))])
def test_max_selected_is_the_exact_binomial_tail_quantile(length, mask_prob):
    """Against exact rational arithmetic: P(Binomial(T, p) > K) <= 1e-9 < P(... > K - 1)."""
    def tail(k):   # P(X > k), exactly
        return sum(math.comb(length, j) * mask_prob ** j * (1 - mask_prob) ** (length - j)
                   for j in range(k + 1, length + 1))
    k = objectives.max_selected(length, float(mask_prob))
    bound = Fraction(objectives.SELECTION_CAP_TAIL)
    assert tail(k) <= bound and (k == 0 or tail(k - 1) > bound), (k, float(tail(k)))
    assert objectives.max_selected(length, 0.0) == 0 and objectives.max_selected(length, 1.0) == length


def test_mask_tokens_cap_keeps_each_rows_first_selections_and_nothing_else_changes():
    tokens, valid = masking_batch(4, b=16, t=64)
    args = dict(mask_prob=0.3, mask_id=MASK_ID, vocab_size=262, special_ids=SPECIALS, valid=jnp.asarray(valid))
    free, free_selected = (np.asarray(x) for x in objectives.mask_tokens(jnp.asarray(tokens), jax.random.key(2), **args))
    capped, capped_selected = (np.asarray(x) for x in objectives.mask_tokens(
        jnp.asarray(tokens), jax.random.key(2), max_per_row=5, **args))
    assert (free_selected.sum(1) > 5).sum() >= 8, "the cap should bind in most rows"
    for row in range(16):
        keep = np.flatnonzero(free_selected[row])[:5]   # reference: the first five of the uncapped selection
        np.testing.assert_array_equal(np.flatnonzero(capped_selected[row]), keep)
        np.testing.assert_array_equal(capped[row, keep], free[row, keep])          # same corruption there
        dropped = ~capped_selected[row]
        np.testing.assert_array_equal(capped[row, dropped], tokens[row, dropped])  # the rest is the original


def test_selected_positions_lists_each_rows_selection_then_unselected_padding():
    selected = np.random.default_rng(3).random((6, 40)) < 0.2
    selected[0], selected[1, :7] = False, True
    count = int(selected.sum(1).max())
    positions, real = (np.asarray(x) for x in objectives.selected_positions(jnp.asarray(selected), count))
    assert positions.shape == real.shape == (6, count)
    for row in range(6):
        chosen = np.flatnonzero(selected[row])
        np.testing.assert_array_equal(positions[row, :len(chosen)], chosen)
        np.testing.assert_array_equal(real[row], np.arange(count) < len(chosen))
        assert not selected[row, positions[row, len(chosen):]].any()
