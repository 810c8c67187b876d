#!/usr/bin/env python
"""In-process A/B of model-side speed levers on one shape: every variant's train step is built and compiled
in ONE process, then timed in short interleaved blocks (A B C A B C ...), so machine load hits all alike.
The process splits the CPU into devices as launch.py does (`parallel.cpu_devices`: one per core, unless XLA_FLAGS
forces a count), so the steps run data-parallel as a user's do.

Variants (jaxlm code is not modified: the attention ones patch MultiHeadAttention.__call__ while the
variant's step is traced, then restore it):
  base        the current code (exact GELU, causal attention in up to 4 query blocks)
  attn_autodiff  attention core by autodiff (attention.attend_reference) instead of the custom VJP
  tanh_gelu   config model.gelu_approximate=True (a different function: tanh-approximate GELU)
  bf16        config model.dtype=bfloat16 (bf16 compute, f32 parameters and optimizer state)
  attn_bias   causal mask as an additive [T, T] bias (0 / -1e30) instead of jnp.where on the scores
  attn_bhtd   q, k, v transposed to [B, H, T, Dh] before the two attention einsums
  attn_dpa    jax.nn.dot_product_attention(q, k, v, is_causal=True) (XLA implementation)
  query_blocks1 / 2 / 3 / 8  config model.attention_query_blocks=N (base: 4; causal attention in at most N query
                 blocks of >= attention.MIN_QUERY_BLOCK queries, skipping the score tiles above the diagonal)
  attn_blocks2 / 4 / 8  the same query blocks with the autodiff core (attention.attend_reference)
  (attn_bias, attn_bhtd, attn_dpa, attn_deferred and ln_fold* compute one T x T block: compare with query_blocks1)
  attn_deferred  softmax normalisation after the PV matmul: (exp(s - max) @ v) / sum (flash-attention style)
  ln_fold     both LayerNorms of each block folded into the following matmul: n(x) @ (g W) + (beta W + b)
  ln_fold_deferred  ln_fold + attn_deferred
  lstm_autodiff  LSTM shapes: the autodiff reference recurrence instead of the custom-VJP one
  lstm_batch_major / lstm_feature_major  LSTM shapes: the custom-VJP recurrence in that loop layout
                 (lstm._Layout) whatever the hidden size
  lstm_dense_autodiff  LSTM shapes: the fused layer's input projection by autodiff (layers.dense) instead of
                 layers.dense_vjp (autodiff's weight gradient is a transposed matmul result)
  linear_dense_vjp  transformer shapes: layers.Linear through layers.dense_vjp (weight gradients by
                 layers.weight_gradient) instead of autodiff of layers.dense
  token_projection  LSTM shapes: the first layer projects every token's embedding (lstm.RNNLM.__call__ through
                 forward_from_embeddings) instead of projecting the vocabulary and gathering rows
  mlm_head_everywhere  masked-LM configs (e.g. --shape=experiments/bert_bpe.py): the final LN, MLM head and output
                 projection at every position, the loss over the selected ones (step.masked_lm_sums runs them only
                 at the <= objectives.max_selected(T, p) selected positions per row)
  eigen_weight_grad  layers.weight_gradient as plain x.T @ dy (XLA folds the transpose into the dot: an Eigen
                 kernel on CPU) instead of materialising x^T for one YNNPACK matmul
  plain_dense    every dense layer (transformer Linear layers, the LSTM input projection) as an einsum over
                 [..., in] instead of layers.dense's 2-D matmul (same function, slower weight gradient)
  nnx_linear     transformer shapes: flax's nnx.Linear (autodiff; jaxlm's layer before layers.Linear)
  large_leaf64k / large_leaf1  optim.LARGE_LEAF = 2^16 / 1 (base: 2^19): arrays from that size are updated as
                 they are instead of being concatenated into the flat AdamW vectors (1: every array, per leaf)

  python benchmarks/levers.py --shape=gpt_small --variants=base,tanh_gelu,attn_bias --rounds=15
  python benchmarks/levers.py --shape=experiments/bert_bpe.py --variants=base,mlm_head_everywhere

--shape is a reference shape (jaxlm/bench.py SHAPES) or an experiment file's get_config().

Process-level levers (XLA flags, the allocator) need separate processes: benchmarks/ab.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm import bench, config as config_lib, objectives, parallel  # noqa: E402
from jaxlm.models import attention, layers, lstm, transformer  # noqa: E402
from jaxlm.errors import UserError  # noqa: E402
from jaxlm.train import optim, step  # noqa: E402


def _causal_out(self, x, y_fn):
    b, t, d = x.shape
    q, k, v = self.project(x)
    return self.out(y_fn(q, k, v).reshape(b, t, d))


def attn_bias(self, x, mask=None):
    assert mask is None and self.causal

    def y_fn(q, k, v):
        t = q.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
        bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, attention.NEG).astype(jnp.float32)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype), v)
    return _causal_out(self, x, y_fn)


def attn_bhtd(self, x, mask=None):
    assert mask is None and self.causal

    def y_fn(q, k, v):
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        t = q.shape[2]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, attention.NEG), axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), v).transpose(0, 2, 1, 3)
    return _causal_out(self, x, y_fn)


def attn_dpa(self, x, mask=None):
    assert mask is None and self.causal
    return _causal_out(self, x, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))


def _deferred(q, k, v):
    """Causal attention with the softmax normalisation applied after the PV matmul (flash-attention style):
    y = (exp(s - max) @ v) / sum(exp(s - max)); the [B, H, T, T] weights are never divided."""
    t = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, attention.NEG)
    p = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    y = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
    return y / p.sum(axis=-1).transpose(0, 2, 1)[..., None].astype(y.dtype)


def _autodiff_blocks(blocks: int):
    """The causal query blocks of attention.attend_causal with the autodiff core instead of the custom VJP."""
    def call(self, x, mask=None):
        assert mask is None and self.causal
        return _causal_out(self, x, lambda q, k, v: attention.attend_causal(
            attention.attend_reference, q, k, v, None, blocks)[0])
    return call


def attn_deferred(self, x, mask=None):
    assert mask is None and self.causal
    return _causal_out(self, x, _deferred)


def _normalize(x, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _folded(ln, linear, x):
    """linear(ln(x)) with the LayerNorm's scale and bias folded into the matmul: n(x) @ (g W) + (beta W + b)."""
    w, g, beta = linear.kernel[...], ln.scale[...], ln.bias[...]
    return _normalize(x, ln.epsilon) @ (g[:, None] * w) + (beta @ w + linear.bias[...])


def block_ln_fold(self, x, mask=None, dropout_key=None):
    """transformer.Block with both LayerNorms folded into the next matmul (no [B, T, d] scale broadcast)."""
    assert mask is None and dropout_key is None or self.rate == 0.0
    b, t, d = x.shape
    a = self.attn
    qkv = _folded(self.ln1, a.qkv, x).reshape(b, t, 3, a.num_heads, d // a.num_heads)
    y = _deferred(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]) if FOLD_DEFERRED else None
    if y is None:
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        w = attention.attention_weights(q, k, causal=True)
        y = jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v)
    x = x + a.out(y.reshape(b, t, d))
    m = self.mlp
    return x + m.proj(jax.nn.gelu(_folded(self.ln2, m.fc, x), approximate=m.gelu_approximate))


FOLD_DEFERRED = False
PATCHES = {"attn_bias": attn_bias, "attn_bhtd": attn_bhtd, "attn_dpa": attn_dpa, "attn_deferred": attn_deferred,
           **{f"attn_blocks{n}": _autodiff_blocks(n) for n in (2, 4, 8)}}
BLOCK_PATCHES = {"ln_fold": block_ln_fold, "ln_fold_deferred": block_ln_fold}
OVERRIDES = {"tanh_gelu": {"model.gelu_approximate": True}, "bf16": {"model.dtype": "bfloat16"},
             **{f"query_blocks{n}": {"model.attention_query_blocks": n} for n in (1, 2, 3, 8)}}
LARGE_LEAF = {"large_leaf64k": 1 << 16, "large_leaf1": 1}
VARIANTS = ("base", *OVERRIDES, *PATCHES, *BLOCK_PATCHES, *LARGE_LEAF, "attn_autodiff", "lstm_autodiff",
            "lstm_batch_major", "lstm_feature_major", "lstm_dense_autodiff", "linear_dense_vjp", "token_projection",
            "mlm_head_everywhere", "eigen_weight_grad", "nnx_linear", "plain_dense")   # what `patched` and `build` know


@contextlib.contextmanager
def patched(name):
    global FOLD_DEFERRED
    original, block, fused = attention.MultiHeadAttention.__call__, transformer.Block.__call__, lstm.lstm_scan_fused
    attend = attention.attend
    min_hidden, linear = lstm.FEATURE_MAJOR_MIN_HIDDEN, layers.linear
    dense, dense_vjp, weight_gradient = layers.dense, layers.dense_vjp, layers.weight_gradient
    linear_call = layers.Linear.__call__
    large_leaf, per_entry = optim.LARGE_LEAF, lstm.MIN_TOKENS_PER_VOCABULARY_ENTRY
    mlm_sums = step.masked_lm_sums
    if name == "mlm_head_everywhere":
        step.masked_lm_sums = mlm_head_everywhere
    if name == "token_projection":
        lstm.MIN_TOKENS_PER_VOCABULARY_ENTRY = 1 << 62
    if name in LARGE_LEAF:
        optim.LARGE_LEAF = LARGE_LEAF[name]
    if name in PATCHES:
        attention.MultiHeadAttention.__call__ = PATCHES[name]
    if name in BLOCK_PATCHES:
        transformer.Block.__call__ = BLOCK_PATCHES[name]
        FOLD_DEFERRED = name.endswith("deferred")
    if name == "attn_autodiff":
        attention.attend = attention.attend_reference
    if name == "lstm_autodiff":
        lstm.lstm_scan_fused = lambda xw, w_hh, w_p, h0, c0, feature_major=None: lstm.lstm_scan_reference(
            xw, w_hh, w_p, h0, c0)
    if name in ("lstm_batch_major", "lstm_feature_major"):
        lstm.FEATURE_MAJOR_MIN_HIDDEN = 0 if name == "lstm_feature_major" else 1 << 62
    if name == "nnx_linear":
        layers.linear = lambda i, o, *, dtype, rngs, init=None: nnx.Linear(
            i, o, dtype=dtype, param_dtype=jnp.float32, kernel_init=init or layers.normal_init(),
            bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    if name == "lstm_dense_autodiff":
        layers.dense_vjp = layers.dense
    if name == "linear_dense_vjp":
        layers.Linear.__call__ = lambda self, x: layers.dense_vjp(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype))
    if name == "eigen_weight_grad":
        layers.weight_gradient = lambda x, dy: x.T @ dy
    if name == "plain_dense":
        layers.dense = layers.dense_vjp = lambda x, w, b: jnp.einsum("...i,io->...o", x, w) + b
    try:
        yield
    finally:
        attention.MultiHeadAttention.__call__, transformer.Block.__call__ = original, block
        lstm.lstm_scan_fused, lstm.FEATURE_MAJOR_MIN_HIDDEN = fused, min_hidden
        layers.dense, layers.dense_vjp, layers.linear, attention.attend = dense, dense_vjp, linear, attend
        layers.weight_gradient, layers.Linear.__call__ = weight_gradient, linear_call
        optim.LARGE_LEAF, lstm.MIN_TOKENS_PER_VOCABULARY_ENTRY = large_leaf, per_entry
        step.masked_lm_sums = mlm_sums


def mlm_head_everywhere(spec, params, inputs, carry=None, *, dropout_key, mask_key):
    """step.masked_lm_sums with the model's output layers at all T positions (the same selection and loss)."""
    masked, selected, _ = step.bert_masking(spec, inputs, mask_key)
    logits, carry = step.apply_model(spec.graphdef, params, masked, carry, dropout_key=dropout_key)
    return objectives.masked_lm_loss(logits, inputs, selected), carry


def shape_config(shape: str):
    """A reference shape's config, or an experiment file's (--shape=experiments/bert_bpe.py)."""
    if not shape.endswith(".py"):
        return bench.shape_config(shape)
    try:
        get_config = runpy.run_path(shape).get("get_config")
    except SyntaxError as e:
        raise UserError(f"--shape={shape!r} is not valid Python: {e.msg} (line {e.lineno})") from None
    except Exception as e:   # an experiment file that fails to import, as launch.py reports it
        raise UserError(f"--shape={shape!r} could not be loaded: {type(e).__name__}: {e}") from None
    if get_config is None:
        raise UserError(f"--shape={shape!r} defines no get_config()")
    try:
        config = get_config()
    except Exception as e:
        raise UserError(f"--shape={shape!r}: get_config() failed: {type(e).__name__}: {e}") from None
    config_lib.validate(config)
    return config


def build(shape: str, name: str):
    config = shape_config(shape)
    for key, value in OVERRIDES.get(name, {}).items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    tokenizer = bench.bench_tokenizer(config, None)
    pool = np.random.default_rng(0).integers(0, tokenizer.vocab_size,
                                             (4, config.train.batch_size, config.data.seq_len + 1), np.int32)
    with patched(name):
        dp, state, _, _ = bench.build_step(config, tokenizer)
        batches = [dp.place_batch({"tokens": p}) for p in pool]
        state, metrics = dp.train_step(state, batches[0])   # trace + compile under the patch
        jax.block_until_ready(metrics)
    return {"dp": dp, "state": state, "batches": batches, "loss0": float(metrics["train/loss"])}


def time_block(v, steps: int) -> tuple[float, float]:
    """(median wall seconds per step, process CPU seconds per step) over `steps` steps."""
    times, cpu0 = [], time.process_time()
    for i in range(steps):
        start = time.perf_counter()
        v["state"], metrics = v["dp"].train_step(v["state"], v["batches"][i % len(v["batches"])])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (time.process_time() - cpu0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gpt_small")
    p.add_argument("--variants", default="base,tanh_gelu,attn_bias,attn_bhtd,attn_dpa")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--block", type=int, default=3, help="steps per variant per round")
    a = p.parse_args()
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    problem = (f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}" if unknown else
               f"unknown --shape={a.shape!r}; choose from {', '.join(bench.SHAPES)} or an experiment file"
               if a.shape not in bench.SHAPES and not os.path.isfile(a.shape) else
               f"invalid --rounds={a.rounds} / --block={a.block}: both must be at least 1"
               if min(a.rounds, a.block) < 1 else None)
    if not problem:
        try:
            config = shape_config(a.shape)
        except UserError as e:
            problem = str(e)
    if problem:   # an unknown name would otherwise be timed as the base code under its own name
        print(f"levers.py: error: {problem}", file=sys.stderr)
        return 2
    devices = parallel.configure_cpu_devices(config)   # as launched: one device per core
    print(f"{jax.device_count()} device(s) ({'parallel.cpu_devices' if devices else 'XLA_FLAGS'})", file=sys.stderr)
    built = {n: build(a.shape, n) for n in names}
    print("first-step losses (same init and batch => equal up to the variant's function change): "
          + ", ".join(f"{n} {v['loss0']:.5f}" for n, v in built.items()), file=sys.stderr)
    for n in names:
        time_block(built[n], 2)   # warm-up
    med, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            wall, used = time_block(built[n], a.block)
            med[n].append(wall)
            cpu[n].append(used)
    base = names[0]
    print(f"\n{a.shape}: {a.rounds} interleaved rounds x {a.block} steps; speedup = median over rounds of "
          f"{base} / variant (wall step time; process CPU time per step); "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}\n")
    print(f"| variant | step ms (median) | CPU ms/step | speedup vs {base} | CPU-time speedup |\n|---|---|---|---|---|")
    for n in names:
        speedup = statistics.median(b / x for b, x in zip(med[base], med[n]))
        cpu_speedup = statistics.median(b / x for b, x in zip(cpu[base], cpu[n]))
        print(f"| {n} | {1e3 * statistics.median(med[n]):.1f} | {1e3 * statistics.median(cpu[n]):.0f} | "
              f"{speedup:.3f} | {cpu_speedup:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
