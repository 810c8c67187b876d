"""Attention extraction equals a float64 NumPy recomputation from each layer's queries and keys; the PNG grid
and the offline HTML head view."""

import json
import re
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.analysis import attention_maps

VOCAB, T = 17, 9


def build(name, layers=2):
    c = config_lib.default_config().model
    c.name, c.num_layers, c.d_model, c.num_heads, c.max_len = name, layers, 16, 4, 16
    model = models.build_model(c, VOCAB, 0)
    return model, *nnx.split(model, nnx.Param)


def numpy_attention(model, tokens, causal):
    """float64: softmax(q k^T / sqrt(Dh)) from each block's LayerNorm'd input and its fused QKV weights."""
    states = model.hidden_states(jnp.asarray(tokens))
    out = []
    for block, h in zip(model.blocks, states):
        x = np.asarray(block.ln1(h), np.float64)                                   # [B, T, d]
        kernel = np.asarray(block.attn.qkv.kernel[...], np.float64)
        bias = np.asarray(block.attn.qkv.bias[...], np.float64)
        b, t, d = x.shape
        qkv = (x @ kernel + bias).reshape(b, t, 3, block.attn.num_heads, -1)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        if causal:
            scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out.append(p / p.sum(-1, keepdims=True))
    return np.stack(out)                                                           # [L, B, H, T, T]


@pytest.mark.parametrize("name,causal", [("gpt", True), ("bert", False)])
def test_weights_match_numpy_and_rows_sum_to_one(name, causal):
    model, graphdef, params = build(name)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, T)).astype(np.int32)
    w = attention_maps.attention_weights(graphdef, params, tokens)
    assert w.shape == (2, 3, 4, T, T)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w, numpy_attention(model, tokens, causal), rtol=1e-4, atol=1e-6)
    single = attention_maps.attention_weights(graphdef, params, tokens[1])
    assert single.shape == (2, 4, T, T)
    np.testing.assert_allclose(single, w[:, 1], rtol=1e-5, atol=1e-7)
    if causal:
        assert (np.triu(w[0, 0, 0], k=1) == 0).all()


def test_models_without_attention_are_refused():
    _, graphdef, params = build("lstm", layers=1)
    with pytest.raises(ValueError, match="no attention"):
        attention_maps.attention_weights(graphdef, params, np.zeros(4, np.int32))


def test_grid_image():
    rng = np.random.default_rng(0)
    w = rng.random((2, 3, 5, 5))
    w /= w.sum(-1, keepdims=True)
    image = attention_maps.attention_grid_image(w, list("abcde"))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].min() < 60                                               # dark cells were drawn


def test_head_view_is_self_contained_and_carries_the_weights():
    rng = np.random.default_rng(0)
    w = rng.random((2, 3, 4, 4))
    w /= w.sum(-1, keepdims=True)
    tokens = ["<s>", "</script><b>", "a&b", "http://x"]  # hostile tokens must stay data
    page = attention_maps.head_view_html(tokens, w, title="t <1>")
    lowered = page.lower()
    for bad in ("http://", "https://", "//cdn", "src=", "<link", "@import", "url("):
        assert bad not in lowered, bad
    payload = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S).group(1)
    assert lowered.count("<script") == 2 and lowered.count("</script>") == 2
    data = json.loads(payload)
    assert data["tokens"] == tokens
    np.testing.assert_allclose(np.asarray(data["weights"]), w, atol=1e-4)
    for needle in ('id="layer"', 'id="head"', "<canvas", "mousemove"):
        assert needle in page
    with pytest.raises(ValueError, match="len\\(tokens\\)"):
        attention_maps.head_view_html(tokens[:3], w)


# A minimal DOM stub: runs the page's script under Node and counts the lines it strokes.
NODE_HARNESS = r"""
const fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const data = page.match(/<script type="application\/json" id="attention-data">([\s\S]*?)<\/script>/)[1];
const code = page.match(/<script>([\s\S]*?)<\/script>/)[1];
let strokes = 0, texts = [];
const ctx = {scale() {}, clearRect() {}, beginPath() {}, moveTo() {}, lineTo() {}, stroke() { strokes++; },
             fillText(t) { texts.push(t); }};
function select() { return {options: [], value: "0", add(o) { this.options.push(o); if (this.options.length === 1) this.value = o.value; }}; }
const els = {"attention-data": {textContent: data}, view: {getContext: () => ctx, style: {}, addEventListener() {},
             getBoundingClientRect: () => ({left: 0, top: 0})}, layer: select(), head: select(), legend: {appendChild() {}}};
global.document = {getElementById: id => els[id], createElement: () => ({style: {}})};
global.window = {devicePixelRatio: 1};
global.Option = function (text, value) { this.text = text; this.value = String(value); };
eval(code);
const first = strokes;
els.layer.value = "1"; els.head.value = "2"; strokes = 0; els.head.onchange();
console.log(JSON.stringify({layers: els.layer.options.length, heads: els.head.options.length, allStrokes: first, oneHead: strokes, texts: texts.length}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_head_view_script_runs(tmp_path):
    w = np.full((2, 3, 4, 4), 0.25)
    w[1, 2] = np.eye(4)                        # layer 2, head 3 attends only to itself: 4 lines
    page = tmp_path / "view.html"
    attention_maps.save_head_view(str(page), list("abcd"), w)
    harness = tmp_path / "run.js"
    harness.write_text(NODE_HARNESS)
    result = subprocess.run(["node", str(harness), str(page)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["layers"] == 2 and out["heads"] == 1 + 3
    assert out["allStrokes"] == 3 * 16                 # layer 1, all heads: every pair at 0.25
    assert out["oneHead"] == 4                         # layer 2, head 3: the diagonal only
    assert out["texts"] == 2 * 4 * 2                   # both columns, drawn twice (initial + head change)
