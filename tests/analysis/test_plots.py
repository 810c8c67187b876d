"""Plots: valid PNG bytes, written to the path when given, decodable into a TensorBoard image array."""

import numpy as np

from jaxlm.analysis import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check(png, path=None):
    assert png[:8] == PNG_MAGIC
    image = plots.png_to_array(png)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4 and min(image.shape[:2]) > 100
    if path is not None:
        assert path.read_bytes() == png
    return image


def test_sensitivity_plots(tmp_path):
    d = np.arange(-5, 9)
    mean = 0.5 ** np.abs(d)
    curves = {"lstm": (d[d >= 0], mean[d >= 0], 0.1 * mean[d >= 0]), "bert": (d, mean, None)}
    check(plots.sensitivity_vs_distance(curves, path=str(tmp_path / "a" / "s.png")), tmp_path / "a" / "s.png")
    check(plots.sensitivity_vs_distance(curves, normalize=False))
    s = np.tril(0.5 ** np.subtract.outer(np.arange(8), np.arange(9)).clip(0)) * (np.arange(9)[None] <= np.arange(8)[:, None])
    check(plots.sensitivity_heatmap(s, tokens=list("abcdefghi"), path=str(tmp_path / "h.png")), tmp_path / "h.png")
    check(plots.sensitivity_heatmap(s, target_positions=np.arange(8) + 1, log=False))


def test_heatmap_darker_means_more_sensitive():
    # one row: the first input gets all the sensitivity -> the left half of the map is darker than the right
    image = plots.png_to_array(plots.sensitivity_heatmap(np.array([[1.0, 1e-9]]), log=False, title=""))
    gray = image[..., :3].mean(-1)
    rows = np.flatnonzero((gray < 250).sum(1) > 0.5 * gray.shape[1] * 0.3)   # rows crossing the map
    band = gray[rows[len(rows) // 2]]
    dark = np.flatnonzero(band < 60)
    light = np.flatnonzero(band > 245)
    assert dark.size and light.size and dark.mean() < light[light > dark.min()].mean()


def test_ablation_and_accuracy_plots(tmp_path):
    curves = {"gpt drop": {1: (3.0, 0.1), 4: (2.5, 0.05), 16: (2.2, 0.05)}, "lstm shuffle": {1: 3.1, 4: 2.9, 16: 2.9}}
    check(plots.ablation_curves(curves, reference={"gpt full": 2.2}, path=str(tmp_path / "c.png")), tmp_path / "c.png")
    acc = {"gpt": {10: (1.0, 0.0), 100: (0.98, 0.02)}, "rnn": {10: (0.9, 0.1), 100: (0.125, 0.01)}}
    check(plots.accuracy_vs_distance(acc, chance=0.125))


def test_attention_grid():
    w = np.random.default_rng(0).random((3, 2, 40, 40))
    check(plots.attention_grid(w / w.sum(-1, keepdims=True)))
