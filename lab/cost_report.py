"""Part 4's summary, its Pareto plot, its section of ``results.md`` and the generated verdict.

Pure functions of the run results, like :mod:`lab.noise_report`, whose per-seed statistics
and paired differences with SGD this reuses. The question the verdict answers is
part 4's: which methods reach SAM rho = 1's gain at no more than 1.25x SGD's gradient
evaluations? Its rules, applied per noise level:

* *cost* = gradient evaluations per step, counted (backward passes / optimizer steps),
  divided by SGD's; a method is *cheap* when that ratio is at most ``CHEAP`` (1.25);
* *gain* = the paired difference of final clean test accuracy with SGD (same seed: same
  noise, initialisation and minibatch order);
* a method *reaches SAM rho = 1's gain* when its gain is positive in every seed and its mean
  gain is no more than one standard error below SAM rho = 1's, the standard error being that
  of the per-seed paired difference between the method and SAM rho = 1.

Wall time per epoch is reported beside the counts but no verdict reads it: it depends on the
machine and on what else runs there.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless, as in lab.report
import matplotlib.pyplot as plt

from .cost import COST_METHODS
from .noise_report import DPI, SCALARS, Key, _pm, _stats, noise_summary

__all__ = ["CHEAP", "REFERENCE", "cost_markdown", "cost_summary", "label", "pareto_front", "plot_pareto"]

CHEAP = 1.25  # part 4's budget, in multiples of SGD's gradient evaluations per step
REFERENCE = ("SAM", 1.0)  # the gain to reach: SAM at the radius that worked in part 3
COST_SCALARS = (*SCALARS, "grad_evals_per_step", "epoch_seconds", "epoch_cpu_seconds")
COLOR = {
    "SGD": "black",
    "SAM": "tab:blue",
    "LookSAM": "tab:orange",
    "IntervalSAM": "tab:green",
    "MSAM": "tab:red",
    "AESAM": "tab:purple",
    "SAM-ON": "tab:brown",
    "SAMWindow": "tab:pink",
}


def label(key: Key) -> str:
    _, method, rho = key
    return method if method == "SGD" else f"{method} ρ={rho:g}"


def _ordered(keys: list[Key]) -> list[Key]:
    names = list(COST_METHODS)
    return sorted(keys, key=lambda k: (k[0], names.index(k[1]) if k[1] in names else len(names), k[2]))


def cost_summary(results: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Part 3's per-configuration summary plus cost ratios, the comparison with SAM rho = 1
    and the verdict's flags (``cheap``, ``consistent``, ``reaches``)."""
    summary = noise_summary(results, COST_SCALARS)
    final: dict[Key, dict[int, float]] = defaultdict(dict)
    for r in results:
        c = r["config"]
        final[(c.noise, c.method, c.rho)][c.seed] = r["final_test_acc"]
    for key in _ordered(list(summary)):
        e = summary[key]
        noise = key[0]
        sgd = summary.get((noise, "SGD", 0.0))
        if sgd is not None:
            e["eval_ratio"] = e["grad_evals_per_step"]["mean"] / sgd["grad_evals_per_step"]["mean"]
            e["time_ratio"] = e["epoch_seconds"]["mean"] / sgd["epoch_seconds"]["mean"]
            e["cpu_ratio"] = e["epoch_cpu_seconds"]["mean"] / sgd["epoch_cpu_seconds"]["mean"]
            e["cheap"] = e["eval_ratio"] <= CHEAP + 1e-9
        e["consistent"] = "above_final_test_acc" in e and e["above_final_test_acc"] == len(e["seeds"])
        ref_key = (noise, *REFERENCE)
        ref = summary.get(ref_key)
        if ref is None or key == ref_key or "delta_final_test_acc" not in e:
            continue
        paired = [s for s in e["seeds"] if s in final[ref_key]]
        diffs = [final[key][s] - final[ref_key][s] for s in paired]
        e["vs_reference"] = _stats(diffs)
        se = e["vs_reference"]["std"] / math.sqrt(len(diffs))
        gain, ref_gain = e["delta_final_test_acc"]["mean"], ref["delta_final_test_acc"]["mean"]
        e["gain_share"] = gain / ref_gain if ref_gain > 0 else None
        e["reaches"] = e["consistent"] and gain >= ref_gain - se
    return {key: summary[key] for key in _ordered(list(summary))}


def pareto_front(points: dict[Key, tuple[float, float]]) -> list[Key]:
    """The keys whose (cost, accuracy) no other point beats: cost no higher and accuracy no
    lower, one of the two strictly. Ordered by cost."""
    front = [
        k
        for k, (x, y) in points.items()
        if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2 in points.values())
    ]
    return sorted(front, key=lambda k: points[k])


def _points(summary: dict[Key, dict[str, Any]], noise: float) -> dict[Key, tuple[float, float]]:
    return {
        k: (e["grad_evals_per_step"]["mean"], e["final_test_acc"]["mean"])
        for k, e in summary.items()
        if k[0] == noise
    }


def plot_pareto(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Final clean accuracy against counted gradient evaluations per step, one panel per noise."""
    summary = cost_summary(results)
    levels = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(1, len(levels), figsize=(5.6 * len(levels), 4.6), squeeze=False)
    for j, noise in enumerate(levels):
        ax = axes[0][j]
        points = _points(summary, noise)
        for key, (x, y) in points.items():
            e = summary[key]
            ax.errorbar(
                x, y, yerr=e["final_test_acc"]["std"], fmt="o", color=COLOR.get(key[1], "gray"), capsize=3
            )
            ax.annotate(label(key), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = pareto_front(points)
        ax.plot(*zip(*(points[k] for k in front)), color="0.4", lw=1.0, ls="-", drawstyle="steps-post")
        sgd = summary.get((noise, "SGD", 0.0))
        if sgd is not None:
            budget = CHEAP * sgd["grad_evals_per_step"]["mean"]
            ax.axvline(budget, color="0.5", ls="--", lw=0.8, label=f"{CHEAP:g}× SGD's evaluations")
        ref = summary.get((noise, *REFERENCE))
        if ref is not None:
            ax.axhline(
                ref["final_test_acc"]["mean"], color="tab:blue", ls=":", lw=0.8, label="SAM ρ=1's accuracy"
            )
        ax.set_xlabel("gradient evaluations per step (counted)")
        ax.set_title(f"{noise:.0%} of the training labels flipped; grey line = Pareto front", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("final clean test accuracy (mean ± std over seeds)")
    fig.tight_layout()
    path = out / "cost_pareto.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return [path]


def _share(e: dict[str, Any]) -> str:
    return "—" if e.get("gain_share") is None else f"{e['gain_share']:.0%}"


def _reaches(e: dict[str, Any]) -> str:
    if "reaches" not in e:
        return "—"
    return ("yes" if e["reaches"] else "no") + (" (cheap)" if e.get("cheap") else "")


def cost_markdown(results: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Part 4's section of ``results.md``: the settings, the measured table and the verdict."""
    summary = cost_summary(results)
    c = settings
    seeds = summary[next(iter(summary))]["seeds"]
    lines = [
        f"## Part 4: cost against benefit, digits with noisy labels, MLP 64-{c['hidden']}-LayerNorm-10",
        "",
        f"Part 3's data, noise and training (minibatch {c['batch_size']}, momentum SGD {c['momentum']}, step "
        f"{c['lr']}, no weight decay, {c['epochs']} epochs, seeds {', '.join(map(str, seeds))}), with a "
        "LayerNorm after the hidden layer for every method (SAM-ON perturbs only its weight and bias). "
        "Each method runs its own loop through the public API (`lab/cost.py`). *Grad evals / step* "
        "= backward passes counted by a hook on the model, divided by the optimizer steps; *s / epoch* "
        "= the median over epochs of the training loop's wall time (evaluation excluded), mean over "
        "seeds, with the CPU time of the same loop beside it (one thread per run: equal to the wall "
        "time on an idle core, and unaffected by other processes on a shared one). Δ = paired "
        "difference of final clean test accuracy with SGD (mean ± std over seeds); *share* = mean Δ "
        "over SAM ρ = 1's mean Δ; *vs SAM ρ=1* = paired difference with SAM ρ = 1.",
        "",
        "| noise | method | ρ | loop | grad evals / step | × SGD | s / epoch | × SGD | CPU s / epoch | × SGD "
        "| final test acc | Δ final vs SGD | above / below SGD | share of SAM ρ=1's gain | vs SAM ρ=1 "
        "| reaches it |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in summary.items():
        noise, method, rho = key
        delta = above = "—"
        if "delta_final_test_acc" in e:
            delta = _pm(e["delta_final_test_acc"])
            above = f"{e['above_final_test_acc']} / {e['below_final_test_acc']}"
        versus = _pm(e["vs_reference"]) if "vs_reference" in e else "—"
        lines.append(
            f"| {noise:.0%} | {method} | {'—' if method == 'SGD' else f'{rho:g}'} "
            f"| {COST_METHODS[method].loop if method in COST_METHODS else '?'} "
            f"| {e['grad_evals_per_step']['mean']:.3f} | {e.get('eval_ratio', math.nan):.2f} "
            f"| {e['epoch_seconds']['mean'] * 1e3:.1f} ms | {e.get('time_ratio', math.nan):.2f} "
            f"| {e['epoch_cpu_seconds']['mean'] * 1e3:.1f} ms | {e.get('cpu_ratio', math.nan):.2f} "
            f"| {_pm(e['final_test_acc'])} | {delta} | {above} | {_share(e)} | {versus} | {_reaches(e)} |"
        )
    lines += ["", *verdict_lines(summary), ""]
    return lines


def _names(keys: list[Key]) -> str:
    return ", ".join(label(k) for k in keys) or "none"


def verdict_lines(summary: dict[Key, dict[str, Any]]) -> list[str]:
    """The generated answer: one line per noise level, then the answer over all levels."""
    levels = sorted({k[0] for k in summary})
    lines = [
        f"Verdict (rules in `lab/cost_report.py`: *cheap* = at most {CHEAP:g}× SGD's counted gradient "
        "evaluations per step; *reaches SAM ρ = 1's gain* = above SGD in every paired seed and a mean "
        "gain at most one standard error of the paired difference below SAM ρ = 1's):",
        "",
    ]
    reached_everywhere: set[tuple[str, float]] | None = None
    for noise in levels:
        sgd, ref = summary.get((noise, "SGD", 0.0)), summary.get((noise, *REFERENCE))
        if sgd is None or ref is None or "delta_final_test_acc" not in ref:
            lines.append(
                f"- **{noise:.0%}**: no SGD baseline or no SAM ρ = 1 in this run: nothing to compare."
            )
            reached_everywhere = set()
            continue
        here = {k: e for k, e in summary.items() if k[0] == noise}
        cheap = [k for k, e in here.items() if e.get("cheap") and k[1] != "SGD"]
        reach = [k for k in cheap if here[k].get("reaches")]
        shares = ", ".join(f"{label(k)} {_share(here[k])}" for k in cheap)
        n = len(ref["seeds"])
        lines.append(
            f"- **{noise:.0%}**: SGD ends at {sgd['final_test_acc']['mean']:.4f}; SAM ρ = 1 at "
            f"{ref['final_test_acc']['mean']:.4f} ({ref['delta_final_test_acc']['mean']:+.4f}, above SGD in "
            f"{ref['above_final_test_acc']} of {n} seeds) for {ref['eval_ratio']:.2f}× SGD's gradient "
            f"evaluations. Cheap methods and the share of that gain they keep: {shares or 'none ran'}. "
            f"Cheap and reaching it: **{_names(reach)}**. Pareto front (evaluations, accuracy): "
            f"{_names(pareto_front(_points(summary, noise)))}."
        )
        found = {k[1:] for k in reach}
        reached_everywhere = found if reached_everywhere is None else reached_everywhere & found
    winners = sorted(reached_everywhere or set())
    answer = ", ".join(f"{m} ρ={r:g}" for m, r in winners) if winners else "none"
    lines += [
        "",
        f"**Answer: methods that reach SAM ρ = 1's gain at ≤ {CHEAP:g}× SGD's gradient evaluations, at "
        f"every noise level run: {answer}.**",
    ]
    return lines
