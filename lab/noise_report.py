"""Plots and the markdown section of part 3 (label noise).

Pure functions of the run results, like :mod:`lab.report`: the same runs always give the
same text. Comparisons with SGD are *paired*: for a given seed every method sees the same
noisy labels, initialisation and minibatch order, so the per-seed difference removes most
of the seed-to-seed spread and "above SGD in k of n seeds" is a statement about those pairs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless, as in lab.report
import matplotlib.pyplot as plt
import numpy as np

from .label_noise import NOISE_METHODS

__all__ = ["noise_markdown", "noise_summary", "plot_noise"]

Key = tuple[float, str, float]  # (noise rate, method, rho)
METHOD_COLOR = {
    "SGD": "black",
    "SAM": "tab:blue",
    "ASAM": "tab:orange",
    "VaSSO": "tab:green",
    "FSAM": "tab:red",
    "GSAM": "tab:purple",
}
SCALARS = ("final_test_acc", "best_test_acc", "best_epoch", "final_train_noisy", "final_memorized", "passes")
DPI = 100


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _key(r: dict[str, Any]) -> Key:
    c = r["config"]
    return (c.noise, c.method, c.rho)


def _order(key: Key) -> tuple[float, int, float]:
    noise, method, rho = key
    rank = NOISE_METHODS.index(method) if method in NOISE_METHODS else len(NOISE_METHODS)
    return (noise, rank, rho)


def noise_summary(
    results: list[dict[str, Any]], scalars: tuple[str, ...] = SCALARS
) -> dict[Key, dict[str, Any]]:
    """Per (noise, method, rho): statistics of ``scalars`` over seeds, and paired differences with SGD."""
    groups: dict[Key, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in results:
        groups[_key(r)][r["config"].seed] = r
    summary: dict[Key, dict[str, Any]] = {}
    for key in sorted(groups, key=_order):
        runs = groups[key]
        seeds = sorted(runs)
        entry: dict[str, Any] = {"seeds": seeds, "n_test": runs[seeds[0]]["n_test"]}
        for name in scalars:
            entry[name] = _stats([runs[s][name] for s in seeds])
        for name in ("test", "train_noisy", "memorized"):
            stacked = np.stack([runs[s][f"{name}_curve"] for s in seeds])
            entry[f"{name}_curve"] = stacked.mean(axis=0)
            entry[f"{name}_lo"] = stacked.min(axis=0)
            entry[f"{name}_hi"] = stacked.max(axis=0)
        sgd = groups.get((key[0], "SGD", 0.0))
        if sgd is not None and key[1] != "SGD":
            paired = [s for s in seeds if s in sgd]
            for name in ("final_test_acc", "best_test_acc"):
                diffs = [runs[s][name] - sgd[s][name] for s in paired]
                entry[f"delta_{name}"] = _stats(diffs)
                entry[f"above_{name}"] = sum(d > 0 for d in diffs)
                entry[f"below_{name}"] = sum(d < 0 for d in diffs)
        summary[key] = entry
    return summary


def _label(key: Key) -> str:
    _, method, rho = key
    return method if method == "SGD" else f"{method} ρ={rho:g}"


def _line_style(key: Key, summary: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    """Colour by method; within a method, the larger the radius the more solid the line."""
    noise, method, rho = key
    if method == "SGD":
        return {"color": "black", "lw": 2.0, "ls": "-"}
    radii = sorted({r for n, m, r in summary if m == method and n == noise})
    rank = radii.index(rho) if len(radii) > 1 else 0
    styles = [":", "--", "-"][-len(radii) :] if len(radii) <= 3 else ["-"] * len(radii)
    return {"color": METHOD_COLOR.get(method, "gray"), "lw": 1.1, "ls": styles[rank]}


def plot_noise(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Curves per noise level (clean test accuracy; fit to the noisy labels) and final/best bars."""
    summary = noise_summary(results)
    levels = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(2, len(levels), figsize=(5.0 * len(levels), 7.6), sharex=True, squeeze=False)
    for j, noise in enumerate(levels):
        keys = [k for k in summary if k[0] == noise]
        for row, (name, ylabel) in enumerate(
            (("test", "clean test accuracy"), ("train_noisy", "train accuracy on the noisy labels"))
        ):
            ax = axes[row][j]
            for key in keys:
                entry = summary[key]
                ax.plot(entry[f"{name}_curve"], label=_label(key), **_line_style(key, summary))
                if key[1] == "SGD":  # SGD's min-max band over seeds; the others' would hide the lines
                    epochs = np.arange(len(entry[f"{name}_curve"]))
                    ax.fill_between(epochs, entry[f"{name}_lo"], entry[f"{name}_hi"], color="0.8")
            # Zoom on where the methods differ: the first epochs climb from chance for everyone.
            means = [summary[k][f"{name}_curve"] for k in keys]
            low = min(float(c[min(5, len(c) - 1) :].min()) for c in means)
            ax.set_ylim(max(0.0, math.floor((low - 0.03) * 20) / 20), 1.005)
            ax.set_title(f"{noise:.0%} of the training labels flipped", fontsize=9)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{ylabel} (mean over seeds)")
            if row == 1:
                ax.set_xlabel("epoch")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
    hidden = results[0]["config"].hidden
    fig.suptitle(
        f"Label noise, digits, MLP 64-{hidden}-10: grey band = SGD's min-max over seeds", fontsize=10
    )
    fig.tight_layout()
    curves = out / "label_noise_curves.png"
    fig.savefig(curves, dpi=DPI)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(levels), figsize=(5.0 * len(levels), 4.4), squeeze=False)
    for j, noise in enumerate(levels):
        ax = axes[0][j]
        keys = [k for k in summary if k[0] == noise]
        xs = np.arange(len(keys))
        for offset, name, alpha in ((-0.2, "final_test_acc", 0.9), (0.2, "best_test_acc", 0.35)):
            means = [summary[k][name]["mean"] for k in keys]
            errs = [summary[k][name]["std"] for k in keys]
            colors = [METHOD_COLOR.get(k[1], "gray") for k in keys]
            ax.bar(xs + offset, means, 0.4, yerr=errs, capsize=2, color=colors, alpha=alpha)
        low = min(summary[k]["final_test_acc"]["mean"] - summary[k]["final_test_acc"]["std"] for k in keys)
        ax.set_ylim(max(0.0, math.floor((low - 0.02) * 20) / 20), 1.0)
        ax.set_xticks(xs, [_label(k) for k in keys], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{noise:.0%} noise: final (dark) and best-epoch (light) test accuracy", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("clean test accuracy (mean ± std)")
    fig.tight_layout()
    bars = out / "label_noise_final.png"
    fig.savefig(bars, dpi=DPI)
    plt.close(fig)
    return [curves, bars]


def _pm(s: dict[str, float], digits: int = 4) -> str:
    # round() then + 0.0 turns a rounding-level negative mean into 0, not "-0.0000".
    return f"{round(s['mean'], digits) + 0.0:.{digits}f} ± {s['std']:.{digits}f}"


def noise_markdown(results: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """The section of ``results.md``: settings, the table and rule-based verdicts."""
    summary = noise_summary(results)
    c = settings
    seeds = summary[next(iter(summary))]["seeds"]
    flip = {r["config"].noise: r["flip_rate"] for r in results}
    n_train = results[0]["n_train"]
    lines = [
        f"## Part 3: label noise, digits, MLP 64-{c['hidden']}-10",
        "",
        f"The split of part 2 ({n_train} training / {results[0]['n_test']} test images). Symmetric noise "
        "on the training labels only: exactly round(p·n) training examples, chosen at random, get a "
        "label drawn uniformly from the other nine classes (realised rates: "
        + ", ".join(f"{p:.0%} → {flip[p]:.4f}" for p in sorted(flip))
        + "); the test labels are clean. A 64-"
        f"{c['hidden']}-10 ReLU MLP, minibatch {c['batch_size']}, SGD with momentum {c['momentum']}, "
        f"constant step {c['lr']}, no weight decay, {c['epochs']} epochs; every variant wraps that SGD. "
        f"Seeds {', '.join(map(str, seeds))} (noise draw, initialisation, minibatch order; shared by "
        "all methods, so differences with SGD are paired per seed). Test accuracy is on the clean test "
        "set: *final* = after the last epoch, *best* = the maximum over epochs 1…E (an oracle early "
        "stop, which needs clean validation labels); robustness is judged on *final*. Values are "
        "mean ± sample std over seeds; Δ is the paired difference with SGD, mean ± std; "
        '"above / below" counts the seeds in which the method\'s final accuracy is above / below '
        "SGD's. *Noise fitted* = fraction of the flipped training examples predicted as their wrong "
        "label at the end.",
        "",
        "| noise | method | ρ | final test acc | best test acc | best epoch | Δ final vs SGD "
        "| above / below SGD | Δ best vs SGD | train acc (noisy labels) | noise fitted | passes / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in summary.items():
        noise, method, rho = key
        delta = above = delta_best = "—"
        if "delta_final_test_acc" in e:
            delta = _pm(e["delta_final_test_acc"])
            above = f"{e['above_final_test_acc']} / {e['below_final_test_acc']}"
            delta_best = _pm(e["delta_best_test_acc"])
        lines.append(
            f"| {noise:.0%} | {method} | {'—' if method == 'SGD' else f'{rho:g}'} "
            f"| {_pm(e['final_test_acc'])} | {_pm(e['best_test_acc'])} | {_pm(e['best_epoch'], 1)} "
            f"| {delta} | {above} | {delta_best} | {_pm(e['final_train_noisy'], 3)} "
            f"| {_pm(e['final_memorized'], 3) if noise > 0 else '—'} | {e['passes']['mean']:.0f} |"
        )
    lines += ["", "Per noise level (rules applied to the numbers above):", ""]
    for noise in sorted({k[0] for k in summary}):
        lines.append(_verdict(noise, summary))
    lines.append("")
    return lines


def _verdict(noise: float, summary: dict[Key, dict[str, Any]]) -> str:
    sgd = summary.get((noise, "SGD", 0.0))
    others = [k for k in summary if k[0] == noise and k[1] != "SGD" and "delta_final_test_acc" in summary[k]]
    if sgd is None or not others:
        return f"- **{noise:.0%}**: no SGD baseline or no variant in this run."
    n = len(sgd["seeds"])
    final, best = sgd["final_test_acc"]["mean"], sgd["best_test_acc"]["mean"]
    every = [_label(k) for k in others if summary[k]["above_final_test_acc"] == n]
    never = [_label(k) for k in others if summary[k]["below_final_test_acc"] == n]
    top = max(others, key=lambda k: summary[k]["delta_final_test_acc"]["mean"])
    top_best = max(others, key=lambda k: summary[k]["delta_best_test_acc"]["mean"])
    return (
        f"- **{noise:.0%}**: SGD peaks at {best:.4f} (epoch {sgd['best_epoch']['mean']:.0f} on average) "
        f"and ends at {final:.4f} (drop {best - final:+.4f}; fits "
        f"{sgd['final_train_noisy']['mean']:.1%} of the noisy training labels). "
        f"Final accuracy above SGD in all {n} seeds: {', '.join(every) or 'none'}; below SGD in all "
        f"{n} seeds: {', '.join(never) or 'none'}. Largest mean gain in final accuracy: {_label(top)} "
        f"({summary[top]['delta_final_test_acc']['mean']:+.4f}, ending at "
        f"{summary[top]['final_test_acc']['mean']:.4f} with {summary[top]['final_memorized']['mean']:.1%} "
        f"of the flipped labels fitted); in best-epoch accuracy: {_label(top_best)} "
        f"({summary[top_best]['delta_best_test_acc']['mean']:+.4f})."
    )
