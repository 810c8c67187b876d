"""Figures of the long-range study as PNG bytes (for files and TensorBoard images).

Uses matplotlib's object-oriented API with the Agg renderer (``matplotlib.figure.Figure``, never pyplot),
so nothing global is touched, no display is needed and figures are freed when they go out of scope.
Every function returns the PNG bytes and, given ``path``, also writes them there;
:func:`png_to_array` turns them into the uint8 [H, W, 4] array ``MetricWriter.write_image`` takes.

Curves are passed as ``{label: data}`` so one figure compares models (or seeds, or modes).
"""

from __future__ import annotations

import io
import os

import numpy as np
from matplotlib import colors, ticker
from matplotlib.figure import Figure

DPI = 100


def _png(fig: Figure, path: str | None) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    png = buffer.getvalue()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(png)
    return png


def png_to_array(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [height, width, 4] (RGBA), as TensorBoard image summaries take."""
    from PIL import Image  # a matplotlib dependency
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.uint8)


def _sorted_items(points: dict):
    """{x: (y, err)} or {x: y} -> sorted arrays (x, y, err or None)."""
    xs = sorted(points)
    values = [points[x] for x in xs]
    if values and isinstance(values[0], (tuple, list)):
        return np.asarray(xs, float), np.asarray([v[0] for v in values], float), np.asarray([v[1] for v in values], float)
    return np.asarray(xs, float), np.asarray(values, float), None


def sensitivity_vs_distance(curves: dict, *, normalize: bool = True, title: str = "Gradient sensitivity vs distance",
                            path: str | None = None) -> bytes:
    """Log-log S(d) per model.

    Args:
      curves: {label: (distances, mean, std or None)} as from ``sensitivity.sensitivity_by_distance``.
        Negative distances (inputs after the prediction: bert, elmo) are drawn dashed at |d|; d = 0 is left
        out (log axis).
      normalize: divide by S(1) (the immediately preceding token), so models of different scale compare.
    """
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, (label, (d, mean, std)) in enumerate(curves.items()):
        d, mean = np.asarray(d), np.asarray(mean, float)
        std = None if std is None else np.asarray(std, float)
        scale = mean[d == 1][0] if normalize and np.any(d == 1) and mean[d == 1][0] > 0 else 1.0
        color = f"C{i % 10}"
        for side, style, suffix in ((d > 0, "-", ""), (d < 0, "--", " (right context)")):
            if not side.any():
                continue
            x, y = np.abs(d[side]), mean[side] / scale
            order = np.argsort(x)
            x, y = x[order], y[order]
            ax.plot(x, y, style, color=color, label=label + suffix)
            if std is not None:
                s = (std[side] / scale)[order]
                ax.fill_between(x, np.maximum(y - s, y * 1e-3), y + s, color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance d = T - t (tokens)")
    ax.set_ylabel("S(d) / S(1)" if normalize else "||d log p / d e_t||")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, path)


def sensitivity_heatmap(sensitivity, *, target_positions=None, tokens=None, log: bool = True,
                        title: str = "Sensitivity of outputs to inputs", path: str | None = None) -> bytes:
    """Inputs x outputs map of S (Graves 2012, fig. 4.3): the darker the shade, the greater the sensitivity.

    Args:
      sensitivity: [P, L]; row i is output position ``target_positions[i]`` (default i).
      tokens: optional L token strings for the input axis.
      log: shade by log10 S, floored at 1e-6 of the maximum (decays are exponential; a linear shade
        shows only the nearest tokens).  Exact zeros (a causal model's future) stay white.
    """
    s = np.asarray(sensitivity, float)
    rows = np.arange(s.shape[0]) if target_positions is None else np.asarray(target_positions)
    fig = Figure(figsize=(max(4.0, 0.18 * s.shape[1] + 2), max(3.0, 0.18 * s.shape[0] + 1.5)))
    ax = fig.add_subplot()
    top = s.max() if s.max() > 0 else 1.0
    norm = colors.LogNorm(vmin=top * 1e-6, vmax=top) if log else colors.Normalize(vmin=0.0, vmax=top)
    shown = np.ma.masked_less_equal(s, 0.0) if log else s
    image = ax.imshow(shown, cmap="Greys", norm=norm, aspect="auto", interpolation="nearest",
                      extent=(-0.5, s.shape[1] - 0.5, rows[-1] + 0.5, rows[0] - 0.5))
    fig.colorbar(image, ax=ax, label="||d log p(x_T) / d e_t||")
    ax.set_xlabel("input position t")
    ax.set_ylabel("output position T")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if tokens is not None and len(tokens) <= 64:
        ax.set_xticks(np.arange(len(tokens)), labels=list(tokens), fontsize=6, rotation=90)
    ax.set_title(title)
    return _png(fig, path)


def ablation_curves(curves: dict, *, reference: dict | None = None, title: str = "Context ablation",
                    ylabel: str = "loss at the last token (nats)",
                    xlabel: str = "context kept intact: the last d tokens", path: str | None = None) -> bytes:
    """Loss against the context distance d (log x), with standard-error bars.

    Args:
      curves: {label: {d: (mean, stderr)}} as from ``context.context_ablation`` (e.g. one per model x mode).
      reference: optional {label: loss} drawn as dotted horizontal lines (e.g. the full-context loss).
    """
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(curves.items()):
        x, y, err = _sorted_items(points)
        ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=3, color=f"C{i % 10}", label=label)
    for i, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(value, linestyle=":", color=f"C{i % 10}", alpha=0.7, label=f"{label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, path)


def accuracy_vs_distance(curves: dict, *, chance: float | None = None, title: str = "Accuracy vs dependency distance",
                         path: str | None = None) -> bytes:
    """Task accuracy against the dependency distance d (log x), error bars = std over seeds or stderr.

    Args:
      curves: {label: {d: (accuracy, error)}} or {label: {d: accuracy}}.
      chance: optional chance accuracy (1 / num_symbols for the synthetic tasks), drawn dotted.
    """
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(curves.items()):
        x, y, err = _sorted_items(points)
        ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=3, color=f"C{i % 10}", label=label)
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="gray", label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("dependency distance d (tokens)")
    ax.set_ylabel("accuracy at the answer")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, path)


def attention_grid(weights, tokens=None, *, title: str = "Attention (rows: query, columns: key)",
                   path: str | None = None) -> bytes:
    """A layers x heads grid of attention maps [T, T] (darker = more attention).

    Args:
      weights: [L, H, T, T] (layer, head, query, key), e.g. from ``attention_maps.attention_weights``.
      tokens: optional T token strings, shown on the axes of the first column / last row when T <= 32.
    """
    w = np.asarray(weights, float)
    num_layers, num_heads, length, _ = w.shape
    size = 2.0 if length <= 32 else 2.6
    fig = Figure(figsize=(size * num_heads + 0.5, size * num_layers + 0.6))
    axes = fig.subplots(num_layers, num_heads, squeeze=False)
    labels = tokens is not None and length <= 32
    for layer in range(num_layers):
        for head in range(num_heads):
            ax = axes[layer][head]
            ax.imshow(w[layer, head], cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks(np.arange(length) if labels and layer == num_layers - 1 else [])
            ax.set_yticks(np.arange(length) if labels and head == 0 else [])
            if labels and layer == num_layers - 1:
                ax.set_xticklabels(list(tokens), fontsize=5, rotation=90)
            if labels and head == 0:
                ax.set_yticklabels(list(tokens), fontsize=5)
            if layer == 0:
                ax.set_title(f"head {head + 1}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer + 1}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _png(fig, path)
