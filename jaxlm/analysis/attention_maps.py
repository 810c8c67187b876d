"""Attention maps of the transformer models: extraction, a PNG grid, and an offline HTML head view.

The attention layers sow their weights [B, H, T, T] as ``nnx.Intermediate`` "attention_weights"
(``jaxlm.models.attention``); :func:`attention_weights` collects them with ``nnx.capture`` (the
non-deprecated form of sow-then-``nnx.pop``) inside one jitted forward pass.

:func:`head_view_html` writes a self-contained page in the manner of bertviz's head view (Vig 2019): the
tokens on both sides, a line from each query token (left) to each key token (right) whose opacity is the
attention weight, one colour per head, and selectors for layer and head; hovering a token shows only its
lines.  Everything (data, CSS, JavaScript) is inline and drawn on a <canvas>: the page loads nothing,
needs no network and names no URL, so it opens in any browser, offline.
"""

from __future__ import annotations

import functools
import html
import json

import jax
import numpy as np
from flax import nnx

from jaxlm.analysis import plots

SOWN_NAME = "attention_weights"


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _capture(graphdef, params, tokens, mask):
    model = nnx.merge(graphdef, params)
    _, sown = nnx.capture(lambda m, t: m(t, mask=mask), nnx.Intermediate)(model, tokens)
    found = [(path, value) for path, value in nnx.to_flat_state(sown) if path[-1] == SOWN_NAME]
    found.sort(key=lambda item: _path_key(item[0]))                # layer order: blocks 0, 1, ..., 10
    return [jax.tree.leaves(value)[-1] for _, value in found]   # one call: the last (only) sown entry


def _path_key(path):
    return tuple((0, part, "") if isinstance(part, int) else (1, 0, str(part)) for part in path)


def attention_weights(graphdef, params, tokens, *, mask=None) -> np.ndarray:
    """Attention weights of every layer: tokens [T] -> [L, H, T, T]; tokens [B, T] -> [L, B, H, T, T].

    Axis order (query, key): row q is the distribution over the keys query q attends to, each row sums to 1
    (a causal model's row q is zero after q).  mask: optional bool [B, T] key padding mask (bert).
    Raises ValueError for models without attention (rnn, lstm, elmo).
    """
    tokens = np.asarray(tokens, np.int32)
    single = tokens.ndim == 1
    batch = tokens[None] if single else tokens
    layers = _capture(graphdef, params, batch, None if mask is None else np.asarray(mask, bool).reshape(batch.shape))
    if not layers:
        raise ValueError("this model sows no attention weights (only gpt and bert have attention)")
    weights = np.stack([np.asarray(w, np.float32) for w in layers])  # [L, B, H, T, T]
    return weights[:, 0] if single else weights


def attention_grid_image(weights, tokens=None, *, title: str = "Attention (rows: query, columns: key)") -> np.ndarray:
    """uint8 [height, width, 4] image of the layers x heads grid (for ``MetricWriter.write_image``)."""
    return plots.png_to_array(plots.attention_grid(weights, tokens, title=title))


def token_strings(tokenizer, ids) -> list[str]:
    """Display strings of token ids (``tokenizer.token_str``), for the axes and the head view."""
    return [tokenizer.token_str(int(i)) for i in np.asarray(ids).reshape(-1)]


_CSS = """
body { font-family: sans-serif; margin: 16px; color: #222; }
#controls { margin-bottom: 10px; }
#controls label { margin-right: 14px; }
#legend span { display: inline-block; padding: 1px 6px; margin-right: 4px; color: #fff; border-radius: 3px;
               font-size: 12px; cursor: pointer; }
#legend span.off { opacity: 0.25; }
canvas { border: 1px solid #eee; }
.hint { color: #777; font-size: 12px; }
"""

_JS = """
(function () {
  const D = JSON.parse(document.getElementById("attention-data").textContent);
  const L = D.weights.length, H = D.weights[0].length, T = D.tokens.length;
  const ROW = 18, PAD = 10, COLW = Math.max(60, 8 * Math.max(...D.tokens.map(s => s.length)) + 16), GAP = 260;
  const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const width = 2 * COLW + GAP + 2 * PAD, height = T * ROW + 2 * PAD;
  canvas.width = width * ratio; canvas.height = height * ratio;
  canvas.style.width = width + "px"; canvas.style.height = height + "px";
  ctx.scale(ratio, ratio);
  const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  const legend = document.getElementById("legend");
  const color = h => "hsl(" + Math.round(360 * h / H) + ",70%,42%)";
  const shown = new Array(H).fill(true);
  let hover = null;  // {side: "q" | "k", index}
  for (let l = 0; l < L; l++) layerSel.add(new Option("layer " + (l + 1), l));
  headSel.add(new Option("all heads", -1));
  for (let h = 0; h < H; h++) {
    headSel.add(new Option("head " + (h + 1), h));
    const chip = document.createElement("span");
    chip.textContent = h + 1; chip.style.background = color(h); chip.title = "toggle head " + (h + 1);
    chip.onclick = () => { shown[h] = !shown[h]; chip.className = shown[h] ? "" : "off"; draw(); };
    legend.appendChild(chip);
  }
  const y = i => PAD + i * ROW + ROW / 2, xq = PAD + COLW, xk = PAD + COLW + GAP;
  function heads() {
    const h = Number(headSel.value);
    return h < 0 ? [...Array(H).keys()].filter(i => shown[i]) : [h];
  }
  function draw() {
    const l = Number(layerSel.value), hs = heads();
    ctx.clearRect(0, 0, width, height);
    ctx.lineWidth = 2;
    for (const h of hs) {
      const W = D.weights[l][h];
      ctx.strokeStyle = color(h);
      for (let q = 0; q < T; q++) {
        if (hover && hover.side === "q" && hover.index !== q) continue;
        for (let k = 0; k < T; k++) {
          if (hover && hover.side === "k" && hover.index !== k) continue;
          const w = W[q][k];
          if (w < 0.01) continue;
          ctx.globalAlpha = Math.min(1, w / Math.max(1, hs.length * 0.5));
          ctx.beginPath(); ctx.moveTo(xq + 4, y(q)); ctx.lineTo(xk - 4, y(k)); ctx.stroke();
        }
      }
    }
    ctx.globalAlpha = 1; ctx.font = "13px monospace"; ctx.textBaseline = "middle";
    for (let i = 0; i < T; i++) {
      ctx.fillStyle = hover && hover.side === "q" && hover.index === i ? "#c00" : "#222";
      ctx.textAlign = "right"; ctx.fillText(D.tokens[i], xq - 4, y(i));
      ctx.fillStyle = hover && hover.side === "k" && hover.index === i ? "#c00" : "#222";
      ctx.textAlign = "left"; ctx.fillText(D.tokens[i], xk + 4, y(i));
    }
  }
  canvas.addEventListener("mousemove", e => {
    const r = canvas.getBoundingClientRect(), x = e.clientX - r.left, i = Math.floor((e.clientY - r.top - PAD) / ROW);
    const next = i < 0 || i >= T ? null : x < xq + 10 ? {side: "q", index: i} : x > xk - 10 ? {side: "k", index: i} : null;
    if (JSON.stringify(next) !== JSON.stringify(hover)) { hover = next; draw(); }
  });
  canvas.addEventListener("mouseleave", () => { hover = null; draw(); });
  layerSel.onchange = draw; headSel.onchange = draw;
  draw();
})();
"""


def head_view_html(tokens, weights, *, title: str = "Attention head view", digits: int = 4) -> str:
    """A self-contained HTML head view of ``weights`` [L, H, T, T] over ``tokens`` (T display strings).

    Left column: the attending (query) tokens; right column: the attended (key) tokens; a line's opacity is
    the weight.  Layer and head selectors, per-head toggles, hover to isolate one token's lines.  No
    external resource of any kind (no CDN, no URL): the weights are embedded as JSON in the page.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] != len(tokens):
        raise ValueError(f"weights must be [layers, heads, T, T] with T = len(tokens) = {len(tokens)}, got {w.shape}")
    data = {"tokens": [str(t) for t in tokens], "weights": np.round(w, digits).tolist()}
    # JSON inside <script>: escape "<" and ">" so no token can close the element, and "/" so not even a
    # token spelling a URL puts one in the page ("\\/" is a JSON escape of "/")
    payload = (json.dumps(data, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e")
               .replace("/", "\\/"))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h3>{html.escape(title)}</h3>\n"
        "<div id=\"controls\"><label>Layer: <select id=\"layer\"></select></label>"
        "<label>Attention: <select id=\"head\"></select></label><span id=\"legend\"></span></div>\n"
        "<p class=\"hint\">Left: the token attending (query); right: the tokens it attends to (key). "
        "Hover a token to isolate its lines; click a head number to toggle it.</p>\n"
        "<canvas id=\"view\"></canvas>\n"
        f"<script type=\"application/json\" id=\"attention-data\">{payload}</script>\n"
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )


def save_head_view(path: str, tokens, weights, *, title: str = "Attention head view") -> None:
    """Write :func:`head_view_html` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(head_view_html(tokens, weights, title=title))
