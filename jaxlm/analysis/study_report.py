"""The long-range study's aggregation, figures and report (``jaxlm.analysis.study`` runs the models).

Every verdict in the report is computed here from the study's numbers with the thresholds stated next to
it (:data:`THRESHOLDS`); nothing about the outcome is written in advance.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.analysis import plots

THRESHOLDS = {
    "solved": 0.9,            # accuracy counted as "solves the task"
    "near_chance": 0.1,       # accuracy within this of chance counts as "fails"
    "vanished": 1e-2,         # S(D)/S(1) below this: the gradient signal has vanished at distance D
    "margin": 0.2,            # accuracy gap that counts as "better"
    "sigmas": 2.0,            # a sensitivity ratio counts as larger only by more than this many standard errors
}
LONG_LAG = 100               # the time lags Hochreiter & Schmidhuber's "long" claims are about
SENSITIVITY_PROBE = 64        # the distance D at which sensitivity ratios are compared (or the largest below)
RECURRENT = ("rnn", "lstm", "lstm_fb3", "lstm_chrono", "elmo")


def _mean_std(values):
    v = np.asarray(values, float)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def summarize(results: dict, config) -> dict:
    """Mean and std over seeds of every per-run number: {"lm": {variant: ...}, "recall": {variant: ...}}."""
    out = {"lm": {}, "recall": {}}
    for variant, seeds in results["lm"].items():
        runs = list(seeds.values())
        # the modes every seed ran (a seed analysed before the mask mode existed has none)
        modes = [m for m in runs[0]["effective_context"] if all(m in r["effective_context"] for r in runs)]
        row = {"params": runs[0]["params"], "seeds": len(runs),
               "eval_loss": _mean_std([r["eval_loss"] for r in runs]),
               "effective_context": {m: _mean_std([r["effective_context"][m] for r in runs]) for m in modes},
               "effective_context_intervals": {m: [list(r["effective_context_interval"][m]) for r in runs]
                                               for m in modes
                                               if all(m in r.get("effective_context_interval", {}) for r in runs)},
               "ablation": {m: {d: _mean_std([r["ablation"][m][d][0] for r in runs]) for d in runs[0]["ablation"][m]}
                            for m in modes}}
        for key in ("relative", "relative_right"):
            if key in runs[0]["sensitivity"]:
                row[f"sensitivity_{key}"] = {d: _mean_std([r["sensitivity"][key].get(d, np.nan) for r in runs])
                                             for d in runs[0]["sensitivity"][key]}
                if len(runs) == 1:   # one seed: its own error over sequences (analysis' jackknife), where recorded
                    row[f"sensitivity_{key}_stderr"] = runs[0]["sensitivity"].get(f"{key}_stderr", {})
        dist = np.asarray(runs[0]["sensitivity"]["distances"])
        means = np.asarray([r["sensitivity"]["mean"] for r in runs], float)
        row["sensitivity_curve"] = {"distances": dist.tolist(), "mean": means.mean(0).tolist(),
                                    "std": means.std(0).tolist()}
        if all("position_loss" in r for r in runs):   # left-to-right models analysed since it existed
            curves = np.asarray([r["position_loss"]["mean"] for r in runs], float)
            excess = [r["position_loss"]["last_excess"] for r in runs]
            row["position_loss"] = {"mean": curves.mean(0).tolist(), "std": curves.std(0).tolist(),
                                    "last_excess": _mean_std([e[0] for e in excess]),
                                    "last_excess_stderr": excess[0][1] if len(runs) == 1 else None}
        out["lm"][variant] = row
    for variant, seeds in results["recall"].items():
        runs = list(seeds.values())
        distances = sorted({int(d) for r in runs for d in r})
        row = {"params": next(iter(runs[0].values()))["params"], "seeds": len(runs), "accuracy": {}, "solved": {},
               "steps_trained": {}}
        for d in distances:
            accs = [r[str(d)]["accuracy"] for r in runs if str(d) in r]
            row["accuracy"][str(d)] = _mean_std(accs)
            row["steps_trained"][str(d)] = _mean_std([r[str(d)].get("steps_trained", np.nan) for r in runs if str(d) in r])
            row["solved"][str(d)] = [int(sum(a >= THRESHOLDS["solved"] for a in accs)), len(accs)]
        out["recall"][variant] = row
    return out


# ------------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------------


def figures(results: dict, summary: dict, out: dict, workdir: str) -> dict:
    """PNG files in workdir; returns {name: png bytes}."""
    images = {}
    lm = summary["lm"]
    if lm:
        curves = {v: (np.asarray(r["sensitivity_curve"]["distances"]), np.asarray(r["sensitivity_curve"]["mean"]),
                      np.asarray(r["sensitivity_curve"]["std"])) for v, r in lm.items()}
        images["sensitivity"] = plots.sensitivity_vs_distance(
            curves, title="Gradient sensitivity vs distance (char LM, mean over seeds)",
            path=os.path.join(workdir, "sensitivity.png"))
        for mode in _modes(lm):
            pts = {v: {int(d): tuple(x) for d, x in r["ablation"][mode].items()} for v, r in lm.items()
                   if mode in r["ablation"]}
            images[f"ablation_{mode}"] = plots.ablation_curves(
                pts, title=f"Context ablation ({mode} beyond d), mean ± std over seeds",
                path=os.path.join(workdir, f"ablation_{mode}.png"))
        pts = {v: {t + 1: (m, e) for t, (m, e) in enumerate(zip(r["position_loss"]["mean"], r["position_loss"]["std"]))}
               for v, r in lm.items() if "position_loss" in r}
        if pts:
            images["loss_by_position"] = plots.ablation_curves(
                pts, title="Loss by position (char LM, mean ± std over seeds)", ylabel="next-token loss (nats)",
                xlabel="context available: tokens up to and including the position",
                path=os.path.join(workdir, "loss_by_position.png"))
    if summary["recall"]:
        pts = {v: {int(d): tuple(x) for d, x in r["accuracy"].items()} for v, r in summary["recall"].items()}
        images["recall_accuracy"] = plots.accuracy_vs_distance(
            pts, chance=out["chance"], title="Delayed recall: accuracy vs distance (mean ± std over seeds)",
            path=os.path.join(workdir, "recall_accuracy.png"))
    return images


# ------------------------------------------------------------------------------------------------------------
# Findings: the literature's claim, this run's numbers, the verdict
# ------------------------------------------------------------------------------------------------------------


def _probe_distance(lm: dict) -> int | None:
    """The largest report distance <= SENSITIVITY_PROBE that every LM model has."""
    common = None
    for row in lm.values():
        ds = {int(d) for d in row.get("sensitivity_relative", {})}
        common = ds if common is None else common & ds
    ok = sorted(d for d in (common or ()) if d <= SENSITIVITY_PROBE)
    return ok[-1] if ok else None


def _rel(lm, variant, d):
    return lm[variant]["sensitivity_relative"][str(d)][0]


def _rel_err(lm, variant, d) -> float | None:
    """Standard error of `_rel`: over seeds (std / sqrt(seeds)), or for one seed its jackknife error over
    sequences; None where a run recorded neither (runs analysed before the error was recorded)."""
    row = lm[variant]
    if row["seeds"] > 1:
        return row["sensitivity_relative"][str(d)][1] / np.sqrt(row["seeds"])
    return _single_seed_stderr(row, d)


def _single_seed_stderr(row: dict, d) -> float | None:
    """A one-seed row's S(d)/S(1) error: its run's jackknife error over sequences (None if not recorded)."""
    return row.get("sensitivity_relative_stderr", {}).get(str(d))


def _shown(lm, variant, d) -> str:
    """S(d)/S(1) with its standard error, where one was recorded."""
    err = _rel_err(lm, variant, d)
    return _g(_rel(lm, variant, d)) + ("" if err is None else f" ± {err:.1g}")


def _clearly_larger(lm, a, b, d) -> bool:
    """S(d)/S(1) of a exceeds b's by more than THRESHOLDS["sigmas"] combined standard errors (by any amount
    where either lacks an error)."""
    errors = (_rel_err(lm, a, d), _rel_err(lm, b, d))
    margin = 0.0 if None in errors else THRESHOLDS["sigmas"] * float(np.hypot(*errors))
    return _rel(lm, a, d) - _rel(lm, b, d) > margin


def _g(x: float) -> str:
    """2 significant digits; an exact 0 is a float32 underflow of a vanished gradient, said so."""
    return "0 (float32 underflow)" if x == 0 else f"{x:.2g}"


def _fmt_acc(row, d):
    m, s = row["accuracy"][str(d)]
    k, n = row["solved"][str(d)]
    return f"{m:.2f} ± {s:.2f} ({k}/{n} seeds solved)"


def _finding(key, citation, literature, this_run, verdict):
    return {"key": key, "citation": citation, "literature": literature, "this_run": this_run, "verdict": verdict}


def _not_measured(key, citation, literature, need):
    return _finding(key, citation, literature, f"Not measured: this study did not include {need}.", "not measured")


def findings(summary: dict, out: dict) -> list[dict]:
    """One dict per literature claim: citation, what the paper found, this run's numbers, verdict."""
    return [f for f in (_vanishing(summary), _lstm_sensitivity(summary), _khandelwal(summary, out),
                        _rnn_recall(summary, out), _lstm_recall(summary, out), _long_init(summary),
                        _transformer(summary), _rotary(summary)) if f]


def _vanishing(summary):
    lm, d = summary["lm"], _probe_distance(summary["lm"])
    cite = "Bengio, Simard & Frasconi (1994); Hochreiter (1991); Graves (2012, 2013)"
    lit = ("Gradients through a tanh RNN shrink exponentially with the number of steps they travel back "
           "(Bengio et al. 1994), so a simple RNN's output is practically insensitive to inputs more than a "
           "few dozen steps away; Graves plots this as the sensitivity of an output to earlier inputs fading "
           "with distance.")
    if "rnn" not in lm or d is None:
        return _not_measured("vanishing_gradients", cite, lit, "an RNN language model")
    r = _rel(lm, "rnn", d)
    text = f"RNN char LM: S({d})/S(1) = {_shown(lm, 'rnn', d)} (mean over {lm['rnn']['seeds']} seed(s))"
    verdict = "reproduced" if r < THRESHOLDS["vanished"] else "not reproduced"
    if "gpt" in lm:
        text += f"; GPT: {_shown(lm, 'gpt', d)}"
        if verdict == "reproduced" and not _clearly_larger(lm, "gpt", "rnn", d):
            verdict = "partly reproduced"
    text += (f". Threshold: the signal counts as vanished when S({d})/S(1) < {THRESHOLDS['vanished']:g}"
             + (f" and it decays faster than in the transformer (by more than {THRESHOLDS['sigmas']:g} combined "
                "standard errors, where recorded)." if "gpt" in lm else "."))
    return _finding("vanishing_gradients", cite, lit, text, verdict)


def _lstm_sensitivity(summary):
    lm, d = summary["lm"], _probe_distance(summary["lm"])
    cite = "Graves (2012, 2013); Hochreiter & Schmidhuber (1997)"
    lit = ("The LSTM's gated, additive cell state preserves sensitivity to distant inputs far longer than a "
           "simple RNN (Graves' sensitivity figures: the LSTM's output still depends on inputs many steps back).")
    lstms = [v for v in ("lstm", "lstm_fb3", "lstm_chrono") if v in lm]
    if "rnn" not in lm or not lstms or d is None:
        return _not_measured("lstm_sensitivity", cite, lit, "both an RNN and an LSTM language model")
    r = _rel(lm, "rnn", d)
    parts = [f"S({d})/S(1): RNN {_shown(lm, 'rnn', d)}"] + [f"{v} {_shown(lm, v, d)}" for v in lstms]
    better = [v for v in lstms if _clearly_larger(lm, v, "rnn", d)]
    higher = [v for v in lstms if _rel(lm, v, d) > r]
    crossing = _crossing(lm, "rnn", lstms[0])
    text = ", ".join(parts) + (f". At short range the order can differ: {crossing}" if crossing else ".")
    text += (f" An LSTM counts as more sensitive than the RNN only by more than {THRESHOLDS['sigmas']:g} combined "
             "standard errors (the ± here: of the mean over seeds, or one seed's jackknife error over sequences).")
    verdict = ("reproduced" if len(better) == len(lstms) else "partly reproduced" if better else
               "not established (within the error)" if higher else "not reproduced")
    return _finding("lstm_sensitivity", cite, lit, text, verdict)


def _crossing(lm, a, b) -> str:
    """Where the S(d)/S(1) curves of a and b swap order, if they do."""
    ra, rb = lm[a]["sensitivity_relative"], lm[b]["sensitivity_relative"]
    ds = sorted(int(d) for d in ra if d in rb and int(d) > 1)
    signs = [(d, np.sign(rb[str(d)][0] - ra[str(d)][0])) for d in ds]
    for (d0, s0), (d1, s1) in zip(signs, signs[1:]):
        if s0 != s1 and s0 != 0:
            return (f"{b} decays {'faster' if s0 < 0 else 'slower'} than {a} up to d = {d0}, the curves cross "
                    f"between d = {d0} and {d1}.")
    return ""


def _khandelwal(summary, out):
    lm = summary["lm"]
    cite = "Khandelwal, He, Qi & Jurafsky (2018), \"Sharp Nearby, Fuzzy Far Away\""
    lit = ("Word-level LSTM LMs use about 200 tokens of context on average, but word ORDER matters only in the "
           "nearest ~20-50 tokens: shuffling the far context barely hurts, dropping it does. Effective context "
           "= the smallest context whose loss is within 1% of the full-context loss.")
    lstms = [v for v in ("lstm", "lstm_fb3", "lstm_chrono") if v in lm]
    if not lstms:
        return _not_measured("effective_context", cite, lit, "an LSTM language model")
    v = lstms[0]
    eff = lm[v]["effective_context"]
    if "drop" not in eff or "shuffle" not in eff:
        return _not_measured("effective_context", cite, lit, "both the drop and the shuffle ablation")
    seq_len = out["config"]["lm_seq_len"]
    seeds = lm[v]["seeds"]
    text = (f"{v} char LM, effective context at {100 * out['tolerance']:g}% tolerance "
            f"({'mean ± std over seeds, ' if seeds > 1 else ''}in characters, window {seq_len}): drop "
            f"{_pm(eff['drop'], 0, seeds)}, shuffle {_pm(eff['shuffle'], 0, seeds)}")
    others = ", ".join(f"{o} {lm[o]['effective_context']['drop'][0]:.0f}" for o in lm if o != v)
    text += f"; other models (drop): {others}." if others else "."
    intervals = lm[v].get("effective_context_intervals", {})
    if "drop" in intervals and "shuffle" in intervals:
        verdict, said = _shape_within_error(intervals["drop"], intervals["shuffle"])
        text += (" 90% bootstrap intervals over the windows, per seed: " + "; ".join(
            f"drop {d[0]}-{d[1]}, shuffle {s[0]}-{s[1]}" for d, s in zip(intervals["drop"], intervals["shuffle"]))
            + f". {said}")
    else:   # runs recorded before the intervals: the point values
        sharp = eff["shuffle"][0] <= eff["drop"][0] and eff["drop"][0] > 1
        verdict = "reproduced (shape only)" if sharp else "not reproduced"
        text += (" Shuffling the far context costs less context than dropping it (order matters nearby only)."
                 if sharp else " Shuffling does not tolerate more far context than dropping here.")
    text += (f" The ~200-token magnitude is not comparable: these are characters (~{seq_len / 6:.0f} words at "
             f"most in a {seq_len}-character window), and the window caps the measurable context.")
    return _finding("effective_context", cite, lit, text, verdict)


def _shape_within_error(drop: list, shuffle: list) -> tuple[str, str]:
    """Khandelwal's shape (the shuffle effective context below the drop one) judged on every seed's bootstrap
    intervals: (verdict, sentence).  Only intervals that do not overlap count either way."""
    below = sum(s[1] < d[0] for d, s in zip(drop, shuffle))
    not_below = sum(s[0] >= d[1] for d, s in zip(drop, shuffle))
    if below == len(drop):
        return ("reproduced (shape only)", "Shuffling the far context costs less context than dropping it, "
                "beyond the error on every seed (order matters nearby only).")
    if not_below == len(drop):
        return ("not reproduced", "On every seed the shuffle interval lies at or above the drop interval: "
                "shuffling the far context costs at least as much context as dropping it.")
    return ("not established (within the error)", f"The intervals separate the two on {below + not_below} of "
            f"{len(drop)} seed(s) ({below} with shuffling the shorter); a difference counts only where the "
            "intervals do not overlap on every seed.")


def _recall_extremes(summary):
    ds = sorted({int(d) for r in summary["recall"].values() for d in r["accuracy"]})
    return (ds[0], ds[-1]) if ds else (None, None)


def _rnn_recall(summary, out):
    rec = summary["recall"]
    lo, hi = _recall_extremes(summary)
    cite = "Bengio, Simard & Frasconi (1994); Hochreiter & Schmidhuber (1997)"
    lit = ("Gradient-trained simple RNNs learn dependencies over ~10-20 steps but fail on longer time lags "
           "(vanishing gradients); Hochreiter & Schmidhuber's RNN baselines failed at lags of 100+.")
    if "rnn" not in rec or lo is None or lo == hi:
        return _not_measured("rnn_long_lag", cite, lit, "an RNN on recall at two or more distances")
    short, long = rec["rnn"]["accuracy"][str(lo)][0], rec["rnn"]["accuracy"][str(hi)][0]
    text = f"RNN delayed recall: d = {lo}: {_fmt_acc(rec['rnn'], lo)}; d = {hi}: {_fmt_acc(rec['rnn'], hi)}; chance {out['chance']:.3f}."
    fails = long <= out["chance"] + THRESHOLDS["near_chance"]
    verdict = ("reproduced" if short >= THRESHOLDS["solved"] and fails else
               "partly reproduced" if short > long + THRESHOLDS["margin"] else "not reproduced")
    return _finding("rnn_long_lag", cite, lit, text, verdict)


def _lstm_recall(summary, out):
    rec = summary["recall"]
    _, hi = _recall_extremes(summary)
    cite = "Hochreiter & Schmidhuber (1997)"
    lit = "LSTM bridges time lags of 100 to 1000+ steps on tasks where simple RNNs fail."
    lstms = [v for v in ("lstm", "lstm_fb3", "lstm_chrono") if v in rec]
    if not lstms or hi is None:
        return _not_measured("lstm_long_lag", cite, lit, "an LSTM on the recall task")
    best = max(lstms, key=lambda v: rec[v]["accuracy"][str(hi)][0])
    acc = rec[best]["accuracy"][str(hi)][0]
    text = "; ".join(f"{v} at d = {hi}: {_fmt_acc(rec[v], hi)}" for v in lstms)
    rnn = rec["rnn"]["accuracy"][str(hi)][0] if "rnn" in rec else None
    if rnn is not None:
        text += f"; RNN {rnn:.2f}"
    text += f" (training budget {out['config']['recall_steps']} steps)."
    beats = rnn is None or acc > rnn + THRESHOLDS["margin"]
    verdict = ("reproduced" if acc >= THRESHOLDS["solved"] and beats else
               "partly reproduced" if beats and acc > out["chance"] + THRESHOLDS["near_chance"] else "not reproduced")
    if verdict == "reproduced" and hi < LONG_LAG:
        verdict = "partly reproduced"
        text += (f" The claim is about lags of {LONG_LAG}+; the longest distance in this run is d = {hi} "
                 "(the full preset goes further).")
    return _finding("lstm_long_lag", cite, lit, text, verdict)


def _long_init(summary):
    rec = summary["recall"]
    _, hi = _recall_extremes(summary)
    cite = "Tallec & Ollivier (2018), chrono initialisation; Gers et al. (2000); Jozefowicz et al. (2015)"
    lit = ("A forget gate biased towards remembering (b_f large: a characteristic memory time ~ e^b_f; chrono: "
           "b_f ~ log U(1, T_max - 1)) lets an LSTM learn long dependencies much faster than the usual b_f = 1.")
    longs = [v for v in ("lstm_chrono", "lstm_fb3") if v in rec]
    if "lstm" not in rec or not longs or hi is None:
        return _not_measured("long_init", cite, lit, "an LSTM with both the default and a long-range initialisation")
    base = rec["lstm"]["accuracy"][str(hi)]
    parts = [f"lstm (b_f = 1) at d = {hi}: {_fmt_acc(rec['lstm'], hi)}"]
    verdict = "not reproduced"
    for v in longs:
        a = rec[v]["accuracy"][str(hi)]
        parts.append(f"{v}: {_fmt_acc(rec[v], hi)}")
        if a[0] > base[0] + max(THRESHOLDS["margin"] / 2, base[1] + a[1]):
            verdict = "reproduced"
    return _finding("long_init", cite, lit, "; ".join(parts) + ".", verdict)


def _transformer(summary):
    rec, lm = summary["recall"], summary["lm"]
    _, hi = _recall_extremes(summary)
    cite = "Vaswani et al. (2017)"
    lit = ("Self-attention connects any two positions by a path of constant length, so long-range "
           "dependencies are as easy to learn as short ones (no vanishing over distance).")
    if "gpt" not in rec and "gpt" not in lm:
        return _not_measured("transformer_constant_path", cite, lit, "a GPT")
    parts, verdict = [], "not measured"
    if "gpt" in rec and hi is not None:
        parts.append(f"GPT delayed recall at d = {hi}: {_fmt_acc(rec['gpt'], hi)}")
        verdict = "reproduced" if rec["gpt"]["accuracy"][str(hi)][0] >= THRESHOLDS["solved"] else "not reproduced"
    d = _probe_distance(lm)
    if "gpt" in lm and d is not None:
        recurrent = [v for v in lm if v in RECURRENT]
        parts.append(f"char-LM S({d})/S(1): GPT {_shown(lm, 'gpt', d)}" +
                     "".join(f", {v} {_shown(lm, v, d)}" for v in recurrent))
        flatter = all(_clearly_larger(lm, "gpt", v, d) for v in recurrent)
        if verdict == "reproduced" and not flatter:
            verdict = "partly reproduced"
        elif verdict == "not measured":
            verdict = "reproduced" if flatter else "not reproduced"
    return _finding("transformer_constant_path", cite, lit, "; ".join(parts) + ".", verdict)


def _rotary(summary):
    lm = summary["lm"]
    cite = "Su et al. (2021), RoFormer"
    lit = ("Rotating queries and keys by angles proportional to their positions makes attention depend on relative "
           "position only; in the paper's pre-training, the rotary model reached a lower loss in the same number "
           "of steps than BERT's learned absolute positions.")
    if "gpt" not in lm or "gpt_rope" not in lm:
        return _not_measured("rotary_positions", cite, lit, "a GPT with learned and one with rotary positions "
                             "(study.lm_models gpt and gpt_rope)")
    learned, rotary = lm["gpt"], lm["gpt_rope"]
    errors = [r["eval_loss"][1] / np.sqrt(r["seeds"]) for r in (learned, rotary) if r["seeds"] > 1]
    margin = THRESHOLDS["sigmas"] * float(np.hypot(*errors)) if len(errors) == 2 else 0.0
    lower = learned["eval_loss"][0] - rotary["eval_loss"][0]
    verdict = ("reproduced" if lower > margin else "not reproduced" if lower < -margin
               else "not established (within the error)")
    text = (f"char-LM eval loss at equal steps: learned positions {_pm(learned['eval_loss'], seeds=learned['seeds'])}, "
            f"rotary {_pm(rotary['eval_loss'], seeds=rotary['seeds'])} (mean ± std over seeds; a difference counts "
            f"beyond {THRESHOLDS['sigmas']:g} combined standard errors"
            + ("" if margin else "; one seed: no error, the point values decide") + ").")
    contexts = [f"{v} {m} {r['effective_context'][m][0]:.0f}" for v, r in (("gpt", learned), ("gpt_rope", rotary))
                for m in ("drop", "mask") if m in r["effective_context"]]
    if contexts:
        text += " Effective context: " + ", ".join(contexts) + " (under rotary positions drop and mask coincide)."
    return _finding("rotary_positions", cite, lit, text, verdict)


# ------------------------------------------------------------------------------------------------------------
# report.md
# ------------------------------------------------------------------------------------------------------------


def _pm(x, digits=3, seeds=2):
    """mean ± std over seeds; one seed's value alone (its std over seeds is no error)."""
    return f"{x[0]:.{digits}f}" + (f" ± {x[1]:.{digits}f}" if seeds > 1 else "")


def report(out: dict, images) -> str:
    s, summary = out["config"], out["summary"]
    lines = ["# The long-range study", "",
             "How RNNs, LSTMs, ELMo, GPT and BERT use distant context, at matched parameter counts "
             f"(size preset `{s['size']}`). Every number is a mean ± standard deviation over seeds (but a single "
             "seed's S(d)/S(1) is given ± its jackknife error over sequences, and its effective context with its "
             "90% bootstrap interval over windows); every verdict below is computed from these "
             "numbers (thresholds in `jaxlm/analysis/study_report.py`).", "",
             f"Time: the runs took {out['run_seconds']:.0f} s of wall-clock training and analysis when they were "
             f"trained; this invocation took {out['seconds']:.0f} s (runs found finished in the workdir are reused, "
             "not retrained).", ""]
    lines += _lm_section(summary["lm"], s, out) + _recall_section(summary["recall"], s, out)
    lines += ["## Findings against the literature", ""]
    for f in out["findings"]:
        lines += [f"### {f['citation']}: **{f['verdict']}**", "", f"*Literature.* {f['literature']}", "",
                  f"*This run.* {f['this_run']}", ""]
    lines += ["## Caveats", "",
              "These are ~0.1-0.4M-parameter models trained for minutes on CPU; the papers used larger models "
              "trained far longer (and word-level corpora for the LM results). A claim that does not reproduce here "
              "may hold at scale; the verdicts say what THIS run shows.", ""]
    return "\n".join(lines) + "\n"


def _modes(lm: dict) -> list[str]:
    """The ablation modes any LM model ran, in first-seen order (transformers add mask to the common ones)."""
    return list(dict.fromkeys(m for r in lm.values() for m in r["effective_context"]))


def _lm_section(lm: dict, s: dict, out: dict) -> list[str]:
    if not lm:
        return ["## Character LM", "", "Not run (study.lm_seeds = 0 or no study.lm_models).", ""]
    modes = _modes(lm)
    positional = any("position_loss" in r for r in lm.values())   # runs analysed before it existed have none
    ds = sorted({int(d) for r in lm.values() for d in r.get("sensitivity_relative", {}) if int(d) > 1})
    lines = ["## Character LM on the built-in corpus", "",
             f"{s['lm_steps']} steps, batch {s['lm_batch_size']}, windows of {s['lm_seq_len']} characters; "
             f"sensitivity on {s['num_sequences']} validation windows, ablation on {s['num_windows']} windows; "
             f"effective context at {100 * out['tolerance']:g}% of the best loss over d (mean ± std over seeds, or "
             "for a single seed its 90% bootstrap interval over the windows)"
             + ("; mask (transformers only): the far context hidden from attention in place, so the target keeps "
                "its position, which drop moves to d - 1" if "mask" in modes else "")
             + (". Last-position excess: the loss at a window's last position minus its mean over the window's "
                "second half, paired over the ablation windows (positive: the last position is fitted worse, which "
                "drop-style ablations read as context; ± over seeds, or one seed's paired standard error)"
                if positional else "")
             + ". S(d)/S(1): ± is the standard "
             "deviation over seeds, or for a single seed the jackknife standard error over its sequences.",
             "",
             "| model | params | seeds | eval loss | " + " | ".join(f"eff. ctx ({m})" for m in modes) + " | "
             + ("last-pos. excess | " if positional else "") + " | ".join(f"S({d})/S(1)" for d in ds) + " |",
             "|---|---|---|---|" + "---|" * (len(modes) + positional + len(ds))]

    def ratio(r: dict, d: int) -> str:
        mean_std = r.get("sensitivity_relative", {}).get(str(d))
        if mean_std is None:
            return ""
        err = mean_std[1] if r["seeds"] > 1 else _single_seed_stderr(r, d)   # the table's ±: std over seeds
        return f"{mean_std[0]:.2g}" + ("" if err is None else f" ± {err:.1g}")

    def context(r: dict, m: str) -> str:
        if m not in r["effective_context"]:
            return ""
        interval = r.get("effective_context_intervals", {}).get(m)
        if r["seeds"] > 1 or not interval:
            return _pm(r["effective_context"][m], 0, r["seeds"])
        return f"{r['effective_context'][m][0]:.0f} ({interval[0][0]}-{interval[0][1]})"

    def excess(r: dict) -> str:
        if "position_loss" not in r:
            return ""
        (mean, std), err = r["position_loss"]["last_excess"], r["position_loss"]["last_excess_stderr"]
        return f"{mean:+.3f}" + (f" ± {std:.3f}" if r["seeds"] > 1 else "" if err is None else f" ± {err:.3f}")

    for v, r in lm.items():
        lines.append(f"| {v} | {r['params']:,} | {r['seeds']} | {_pm(r['eval_loss'], seeds=r['seeds'])} | "
                     + " | ".join(context(r, m) for m in modes) + (f" | {excess(r)} | " if positional else " | ")
                     + " | ".join(ratio(r, d) for d in ds) + " |")
    lines += ["", "![sensitivity](sensitivity.png)", ""]
    if positional:
        lines += ["![loss by position](loss_by_position.png)", ""]
    lines += [f"![ablation {m}](ablation_{m}.png)" for m in modes]
    lines += ["", "Per-run analyses (inputs x outputs sensitivity maps, attention maps and offline head views): "
              + ", ".join(f"[{v}]({out['runs']['lm'][v]['seed0']['workdir']}/analysis/report.md)"
                          for v in lm if "seed0" in out["runs"]["lm"][v]), ""]
    return lines


def _recall_section(rec: dict, s: dict, out: dict) -> list[str]:
    if not rec:
        return ["## Delayed recall", "", "Not run (study.seeds = 0 or no study.models).", ""]
    ds = sorted({int(d) for r in rec.values() for d in r["accuracy"]})
    lines = ["## Delayed recall (synthetic:recall)", "",
             f"Recall the cue after d tokens ({s['filler']} fillers, {s['num_symbols']} symbols, chance "
             f"{out['chance']:.3f}); {s['recall_steps']} steps, batch {s['recall_batch_size']}; accuracy on held-out "
             f"examples; 'solved' = accuracy >= {THRESHOLDS['solved']}.", "",
             "| model | params | " + " | ".join(f"d = {d}" for d in ds) + " |", "|---|---|" + "---|" * len(ds)]
    for v, r in rec.items():
        lines.append(f"| {v} | {r['params']:,} | "
                     + " | ".join(_fmt_acc(r, d) if str(d) in r["accuracy"] else "" for d in ds) + " |")
    stop = s.get("stop_at_accuracy", 0)
    if stop:
        lines += ["", f"Steps trained (mean ± std over seeds): a run stops once its train accuracy reaches {stop}, "
                  f"so fewer than {s['recall_steps']} steps means solved that fast; the full budget means not solved "
                  "(or solved only at the end).", "",
                  "| model | " + " | ".join(f"d = {d}" for d in ds) + " |", "|---|" + "---|" * len(ds)]
        for v, r in rec.items():
            lines.append(f"| {v} | " + " | ".join("%.0f ± %.0f" % tuple(r["steps_trained"][str(d)])
                                                  if str(d) in r["steps_trained"] else "" for d in ds) + " |")
    return lines + ["", "![recall accuracy](recall_accuracy.png)", ""]
