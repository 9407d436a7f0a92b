"""Plots and the markdown table of the convergence lab.

Everything here is a pure function of the run results, so the same results always give
the same ``results.md`` (timings go to stderr, never into the file): re-running the lab
and diffing ``docs/lab/results.md`` is a regression check.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the lab runs on CI machines and servers
import matplotlib.pyplot as plt
import numpy as np

from .quadratic import NORMALIZED, predicted_cycle_radius

__all__ = ["digits_summary", "plot_digits", "plot_quadratic", "write_markdown"]

SCHEDULE_LABEL = {
    "constant": "Constant",
    "diminish1": "Diminish 1",
    "diminish2": "Diminish 2",
    "diminish3": "Diminish 3",
}
SCHEDULE_COLOR = {
    "constant": "tab:red",
    "diminish1": "tab:blue",
    "diminish2": "tab:green",
    "diminish3": "tab:purple",
}
RHO_LABEL = {"constant": "constant ρ", "poly": "ρ_k = ρ/(k+1)^p"}
METRICS = {
    "dist": ("‖x_k − x*‖", 1e-16),
    "grad": ("‖∇f(x_k)‖", 1e-16),
    "gap": ("f(x_k) − f*", 1e-32),
}
DPI = 100


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    return [v for v in order if v in set(values)] + sorted(set(values) - set(order))


# ----------------------------------------------------------------------------- quadratic
def plot_quadratic(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """One figure per metric (rows: methods, columns: radius mode), plus a SAM summary."""
    by_key = {(r["config"].method, r["config"].schedule, r["config"].rho_mode): r for r in results}
    methods = _ordered([m for m, _, _ in by_key if m != "GD"], ["SAM", "USAM", *NORMALIZED[1:]])
    schedules = _ordered([s for _, s, _ in by_key], list(SCHEDULE_LABEL))
    rho_modes = _ordered([m for _, _, m in by_key if m], ["constant", "poly"])
    gd = by_key.get(("GD", "constant", "constant"))
    written = []
    for metric, (label, floor) in METRICS.items():
        fig, axes = plt.subplots(
            len(methods),
            len(rho_modes),
            figsize=(5.2 * len(rho_modes), 2.6 * len(methods)),
            sharex=True,
            sharey=True,
            squeeze=False,
        )
        for i, method in enumerate(methods):
            for j, mode in enumerate(rho_modes):
                ax = axes[i][j]
                for sched in schedules:
                    r = by_key.get((method, sched, mode))
                    if r is None:
                        continue
                    ax.semilogy(
                        np.maximum(r[metric], floor),
                        color=SCHEDULE_COLOR.get(sched),
                        lw=1.1,
                        label=f"{method}, {SCHEDULE_LABEL.get(sched, sched)}",
                    )
                if gd is not None:
                    ax.semilogy(np.maximum(gd[metric], floor), "k:", lw=1.0, label="GD, Constant")
                if metric == "dist" and mode == "constant" and method in NORMALIZED:
                    r = by_key.get((method, "constant", mode))
                    if r is not None:
                        cfg = r["config"]
                        level = predicted_cycle_radius(cfg.lr, cfg.rho, r["L"])
                        ax.axhline(level, color="0.5", ls="--", lw=0.8, label="t ρ L / (2 − t L)")
                ax.set_title(f"{method}, {RHO_LABEL.get(mode, mode)}", fontsize=9)
                ax.grid(True, which="major", alpha=0.3)
                if j == 0:
                    ax.set_ylabel(label)
                if i == len(methods) - 1:
                    ax.set_xlabel("iteration k")
                if i == 0 and j == 0:
                    ax.legend(fontsize=7, loc="lower left")
        fig.suptitle(f"Quadratic: {label} (log scale)", fontsize=11)
        fig.tight_layout()
        path = out / f"quadratic_{metric}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    if "SAM" in methods:
        written.append(_plot_sam_summary(by_key, schedules, rho_modes, gd, out))
    return written


def _plot_sam_summary(by_key, schedules, rho_modes, gd, out: Path) -> Path:
    """The headline figure: SAM, three metrics, both radius modes."""
    fig, axes = plt.subplots(
        len(rho_modes), 3, figsize=(14, 3.4 * len(rho_modes)), sharex=True, squeeze=False
    )
    for i, mode in enumerate(rho_modes):
        for j, (metric, (label, floor)) in enumerate(METRICS.items()):
            ax = axes[i][j]
            for sched in schedules:
                r = by_key.get(("SAM", sched, mode))
                if r is not None:
                    ax.semilogy(
                        np.maximum(r[metric], floor),
                        color=SCHEDULE_COLOR.get(sched),
                        lw=1.1,
                        label=SCHEDULE_LABEL.get(sched, sched),
                    )
            if gd is not None:
                ax.semilogy(np.maximum(gd[metric], floor), "k:", lw=1.0, label="GD, Constant")
            ax.set_title(f"SAM, {RHO_LABEL.get(mode, mode)}: {label}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(rho_modes) - 1:
                ax.set_xlabel("iteration k")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "quadratic_sam_summary.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _quadratic_table(results: list[dict[str, Any]]) -> list[str]:
    order = ["GD", "SAM", "USAM", "VaSSO", "RSAM", "F-SAM"]
    rows = sorted(
        results,
        key=lambda r: (
            order.index(r["config"].method) if r["config"].method in order else 99,
            r["config"].rho_mode != "constant",
            list(SCHEDULE_LABEL).index(r["config"].schedule),
        ),
    )
    lines = [
        "| method | radius | step schedule | ‖∇f(x_K)‖ | f(x_K) − f* | ‖x_K − x*‖ | min_k ‖x_k − x*‖ "
        "| predicted t_K ρ_K L / (2 − t_K L) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = r["config"]
        if cfg.method in NORMALIZED:
            pred = f"{predicted_cycle_radius(r['last_lr'], r['last_rho'], r['L']):.2e}"
        else:
            pred = "— (no stall predicted)"
        radius = "—" if cfg.method == "GD" else RHO_LABEL[cfg.rho_mode]
        lines.append(
            f"| {cfg.method} | {radius} | {SCHEDULE_LABEL[cfg.schedule]} | {r['grad'][-1]:.2e} "
            f"| {r['gap'][-1]:.2e} | {r['dist'][-1]:.2e} | {r['dist'].min():.2e} | {pred} |"
        )
    return lines


# ----------------------------------------------------------------------------- digits
def digits_summary(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (schedule, method): mean and std over seeds of every final metric."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["config"].schedule, r["config"].method)].append(r)
    summary = {}
    for key, runs in groups.items():
        entry: dict[str, Any] = {"seeds": len(runs)}
        for name in ("test_acc", "train_loss", "grad_norm", "sharpness", "passes"):
            values = np.array([run[name] for run in runs], dtype=float)
            entry[name] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        curvature = [run["sharpness"] - run["config"].sharpness_rho * run["grad_norm"] for run in runs]
        entry["curvature"] = (
            float(np.mean(curvature)),
            float(np.std(curvature, ddof=1)) if len(runs) > 1 else 0.0,
        )
        entry["train_curve"] = np.mean([run["train_curve"] for run in runs], axis=0)
        entry["test_curve"] = np.mean([run["test_curve"] for run in runs], axis=0)
        summary[key] = entry
    return summary


def _methods_and_schedules(summary) -> tuple[list[str], list[str]]:
    from .digits import DIGITS_METHODS

    methods = _ordered([m for _, m in summary], list(DIGITS_METHODS))
    schedules = _ordered([s for s, _ in summary], list(SCHEDULE_LABEL))
    return methods, schedules


def plot_digits(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Test accuracy bars, training-loss curves and sharpness against accuracy."""
    summary = digits_summary(results)
    methods, schedules = _methods_and_schedules(summary)
    written = []

    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(methods) * len(schedules) / 2.5), 4.2))
    width = 0.8 / len(schedules)
    lows = []
    for j, sched in enumerate(schedules):
        means = [summary[(sched, m)]["test_acc"][0] if (sched, m) in summary else np.nan for m in methods]
        stds = [summary[(sched, m)]["test_acc"][1] if (sched, m) in summary else 0.0 for m in methods]
        xs = np.arange(len(methods)) + (j - (len(schedules) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=2, color=SCHEDULE_COLOR.get(sched), alpha=0.85)
        ax.plot([], [], color=SCHEDULE_COLOR.get(sched), lw=6, label=SCHEDULE_LABEL.get(sched, sched))
        lows.append(np.nanmin(np.array(means) - np.array(stds)))
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylim(max(0.0, math.floor((min(lows) - 0.02) * 50) / 50), 1.0)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Digits, MLP 64-64-10: final test accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(schedules), loc="lower right")
    fig.tight_layout()
    path = out / "digits_accuracy.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(
        1, len(schedules), figsize=(4.2 * len(schedules), 3.8), sharey=True, squeeze=False
    )
    cmap = plt.get_cmap("tab10")
    for j, sched in enumerate(schedules):
        ax = axes[0][j]
        for i, method in enumerate(methods):
            entry = summary.get((sched, method))
            if entry is None:
                continue
            style = "k-" if method == "SGD" else "-"
            kwargs = {"lw": 1.8} if method == "SGD" else {"color": cmap((i - 1) % 10), "lw": 1.0}
            ax.semilogy(entry["train_curve"], style, label=method, **kwargs)
        ax.set_title(f"{SCHEDULE_LABEL.get(sched, sched)}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if j == 0:
            ax.set_ylabel("full training loss (mean over seeds)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle("Digits: training loss per epoch (one epoch = one pass over the data for SGD)", fontsize=10)
    fig.tight_layout()
    path = out / "digits_train_loss.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    markers = "osD^v<>pP*Xh"
    for i, method in enumerate(methods):
        for sched in schedules:
            entry = summary.get((sched, method))
            if entry is None:
                continue
            style = {
                "color": SCHEDULE_COLOR.get(sched),
                "marker": markers[i % len(markers)],
                "s": 36,
                "label": method if sched == schedules[0] else None,
            }
            axes[0].scatter(entry["sharpness"][0], entry["test_acc"][0], **style)
            axes[1].scatter(entry["curvature"][0], entry["test_acc"][0], **style)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("sharpness L(w + ρ g/‖g‖) − L(w), training set")
    axes[1].set_xlabel("its second-order part: sharpness − ρ‖g‖")
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "Digits: sharpness (ρ = same for all) against test accuracy; colour = step schedule", fontsize=10
    )
    fig.tight_layout()
    path = out / "digits_sharpness.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    written.append(path)
    return written


def _digits_table(results: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    summary = digits_summary(results)
    methods, schedules = _methods_and_schedules(summary)
    lines = [
        "| step schedule | method | test accuracy | Δ mean vs SGD | final train loss | ‖∇L(w)‖ "
        "| sharpness | sharpness − ρ‖g‖ | passes / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for sched in schedules:
        base = summary.get((sched, "SGD"))
        worse, tie, within, better = [], [], [], []
        for method in methods:
            entry = summary.get((sched, method))
            if entry is None:
                continue
            acc, acc_sd = entry["test_acc"]
            delta = "—"
            if base is not None and method != "SGD":
                diff = acc - base["test_acc"][0]
                delta = f"{diff:+.4f}"
                spread = max(acc_sd, base["test_acc"][1])
                if abs(diff) < 1e-9:
                    tie.append(method)
                elif diff < 0:
                    worse.append(method)
                elif diff <= spread:
                    within.append(method)
                else:
                    better.append(method)
            lines.append(
                f"| {SCHEDULE_LABEL.get(sched, sched)} | {method} | {acc:.4f} ± {acc_sd:.4f} | {delta} "
                f"| {entry['train_loss'][0]:.4f} ± {entry['train_loss'][1]:.4f} "
                f"| {entry['grad_norm'][0]:.3e} | {entry['sharpness'][0]:.3e} | {entry['curvature'][0]:.2e} "
                f"| {entry['passes'][0]:.0f} |"
            )
        if base is not None:
            label = SCHEDULE_LABEL.get(sched, sched)
            verdicts.append(
                f"- **{label}**: below SGD: {', '.join(worse) or 'none'}; "
                f"equal to SGD: {', '.join(tie) or 'none'}; "
                f"above it by no more than the seed spread: {', '.join(within) or 'none'}; "
                f"above it by more than the seed spread: {', '.join(better) or 'none'}."
            )
    return lines, verdicts


# ----------------------------------------------------------------------------- markdown
def write_markdown(
    path: Path,
    quad: list[dict[str, Any]],
    digits: list[dict[str, Any]],
    settings: dict[str, Any],
    images: list[Path],
    sections: Sequence[str] = (),
) -> None:
    """``results.md``: the settings, the tables, ``sections`` (more parts) and links to the plots."""
    lines = [
        "# Convergence lab results",
        "",
        f"Generated by `{settings['command']}`; do not edit by hand. "
        "Explanations: [docs/convergence.md](../convergence.md).",
        "",
    ]
    if quad:
        q = settings["quadratic"]
        lines += [
            "## Part 1: strongly convex quadratic",
            "",
            f"f(x) = ½ xᵀAx − bᵀx in R^{q['dim']}, eigenvalues of A log-spaced in "
            f"[{q['mu']}, {q['L']}] (condition number {q['L'] / q['mu']:g}), random rotation, "
            f"seed {q['seed']}, float64; x_0 at distance 10 from x*. {q['steps']} iterations; base "
            f"step t_0 = {q['lr']}, the paper's schedules with one epoch = {q['steps_per_epoch']} "
            f"iterations; ρ = {q['rho']}, or ρ_k = ρ/(k+1)^{q['rho_power']} per iteration. "
            "SGD base, no momentum, no weight decay. Values at the last iterate x_K.",
            "",
            *_quadratic_table(quad),
            "",
        ]
    if digits:
        d = settings["digits"]
        table, verdicts = _digits_table(digits)
        lines += [
            "## Part 2: digits, MLP 64-64-10",
            "",
            f"scikit-learn digits, 75/25 stratified split (seed 0), standardized. {d['epochs']} "
            f"epochs, minibatch {d['batch_size']}, SGD base without momentum or weight decay, "
            f"t_0 = {d['lr']} with the paper's per-epoch schedules, ρ = {d['rho']} (ASAM: 0.5, "
            f"η = 0.01). Seeds {d['seeds']}: mean ± sample std. Gradient norm and sharpness "
            f"(ρ = {d['sharpness_rho']}, same for all) on the full training set at the final weights, "
            "mean over seeds; sharpness − ρ‖g‖ removes the first-order part ρ‖g‖ and leaves the "
            "curvature along g (≈ ρ² gᵀHg / (2‖g‖²)). Passes = forward/backward passes per run.",
            "",
            *table,
            "",
            "Against SGD with the same step schedule (mean test accuracy; spread = the larger of "
            "the two standard deviations):",
            "",
            *verdicts,
            "",
        ]
    lines += sections
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in images]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
