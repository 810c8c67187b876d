"""train_step / eval_step against float64 NumPy recomputations of what each objective must score."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import bench, objectives
from jaxlm.config import default_config
from jaxlm.models import elmo, lstm, transformer
from jaxlm.train import optim, state as state_lib, step as step_lib

VOCAB = 20
TOKENIZER = types.SimpleNamespace(vocab_size=VOCAB, mask_id=15, special_ids=tuple(range(14, 20)))


def spec_for(model, objective, **train):
    c = default_config()
    c.objective.name = objective
    for key, value in train.items():
        c.train[key] = value
    graphdef, params = nnx.split(model, nnx.Param)
    c.optim.warmup_steps, c.optim.learning_rate = 5, 1e-2
    tx = optim.make_optimizer(c.optim, 40)
    return step_lib.StepSpec.from_config(c, graphdef, tx, TOKENIZER), params, tx


def np_cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def small_cfg(name):
    c = default_config().model
    c.name, c.num_layers, c.d_model, c.num_heads, c.hidden_size, c.max_len = name, 1, 16, 2, 16, 16
    return c


def test_causal_eval_loss_is_the_mean_cross_entropy_of_next_tokens():
    model = transformer.Decoder(small_cfg("gpt"), VOCAB, rngs=nnx.Rngs(params=0))
    spec, params, _ = spec_for(model, "causal_lm")
    tokens = np.random.default_rng(0).integers(0, 14, (3, 9)).astype(np.int32)
    sums, _ = step_lib.eval_step(params, {"tokens": tokens}, None, spec=spec)
    logits = np.asarray(model(tokens[:, :-1])[0])
    expected = np_cross_entropy(logits, tokens[:, 1:])
    np.testing.assert_allclose(float(sums["loss"]), expected.sum(), rtol=1e-5)
    assert float(sums["tokens"]) == 3 * 8


def test_elmo_on_a_synthetic_task_scores_only_the_forward_direction_at_the_answers():
    model = elmo.ELMo(small_cfg("elmo"), VOCAB, rngs=nnx.Rngs(params=0))
    spec, params, _ = spec_for(model, "bidirectional_lm")
    tokens = np.random.default_rng(1).integers(0, 14, (2, 9)).astype(np.int32)
    weights = np.zeros((2, 8), np.float32)
    weights[0, 5], weights[1, 6] = 1, 1       # target tokens[0, 6] and tokens[1, 7]
    sums, _ = step_lib.eval_step(params, {"tokens": tokens, "weights": weights}, None, spec=spec)
    (fwd, _), _ = model(tokens[:, :-1])
    ce = np_cross_entropy(np.asarray(fwd), np.roll(tokens[:, :-1], -1, axis=1))   # fwd[t] predicts token t+1
    np.testing.assert_allclose(float(sums["loss"]), ce[0, 5] + ce[1, 6], rtol=1e-5)
    assert float(sums["tokens"]) == 2 and float(sums["backward_tokens"]) == 0


def test_training_steps_lower_the_loss_and_count_steps():
    model = transformer.Decoder(small_cfg("gpt"), VOCAB, rngs=nnx.Rngs(params=0))
    spec, params, tx = spec_for(model, "causal_lm")
    state = state_lib.TrainState.create(params, tx, seed=0)
    batch = {"tokens": np.tile(np.arange(9, dtype=np.int32), (4, 1))}
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, spec=spec))
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert int(state.step) == 40 and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", ["bert", "lstm"])
def test_masked_lm_runs_the_output_layers_only_at_the_selected_positions(name):
    """step.masked_lm_sums against the straightforward masked-LM loss (logits at every position, scored at the
    selected ones, same capped selection): sums, carried state and every gradient; and the head's matmuls
    really shrink from T to K = max_selected(T, p) positions per row."""
    cls = transformer.Encoder if name == "bert" else lstm.LSTMLM
    cfg = small_cfg(name)
    cfg.max_len = 32
    model = cls(cfg, VOCAB, rngs=nnx.Rngs(params=0))
    spec, params, _ = spec_for(model, "masked_lm")
    inputs = jnp.asarray(np.random.default_rng(2).integers(0, 14, (4, 32)), jnp.int32)
    per_row = objectives.max_selected(32, spec.mask_prob)
    assert per_row == 20
    key = jax.random.key(3)
    carry = jax.tree.map(lambda c: jnp.full(c.shape, 0.3, c.dtype), model.initial_carry(4))   # None for bert

    def gathered(p):
        sums, new_carry = step_lib.masked_lm_sums(spec, p, inputs, carry, dropout_key=None, mask_key=key)
        return sums[0], (sums, new_carry)

    def everywhere(p):
        masked, selected = objectives.mask_tokens(inputs, key, mask_prob=spec.mask_prob, mask_id=spec.mask_id,
                                                  vocab_size=VOCAB, special_ids=spec.special_ids,
                                                  max_per_row=per_row)
        logits, new_carry = nnx.merge(spec.graphdef, p)(masked, carry)
        return jnp.sum(jnp.where(selected, optax.softmax_cross_entropy_with_integer_labels(logits, inputs), 0)), (
            logits, selected, new_carry)

    (_, (sums, new_carry)), grads = jax.jit(jax.value_and_grad(gathered, has_aux=True))(params)
    (_, (logits, selected, want_carry)), want_grads = jax.jit(jax.value_and_grad(everywhere, has_aux=True))(params)
    assert jax.tree.structure(new_carry) == jax.tree.structure(want_carry)
    for c, w in zip(jax.tree.leaves(new_carry), jax.tree.leaves(want_carry)):
        np.testing.assert_allclose(c, w, rtol=1e-5, atol=1e-6)
    ce = np_cross_entropy(logits, np.asarray(inputs))
    selected = np.asarray(selected)
    assert 0 < selected.sum() and float(sums[1]) == selected.sum()
    np.testing.assert_allclose(float(sums[0]), ce[selected].sum(), rtol=1e-5)
    assert float(sums[2]) == (np.asarray(logits).argmax(-1) == np.asarray(inputs))[selected].sum()
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())
    flops = [bench.matmul_flops(jax.make_jaxpr(jax.grad(lambda p: f(p)[0]))(params)) for f in (gathered, everywhere)]
    d, rows_saved = 16, 4 * (32 - per_row)
    head = d * d + d * VOCAB if name == "bert" else d * VOCAB   # (bert: the MLM head's dense d -> d) + logits
    assert flops[1] - flops[0] == 3 * 2 * rows_saved * head
