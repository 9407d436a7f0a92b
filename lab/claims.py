"""The claims table of ``results.md``: each published claim next to what this run measured.

Generated, like every number in ``results.md``: the verdicts are fixed rules applied to the
run's results (stated in the table's preamble), so rerunning the lab after a change in an
optimizer updates them instead of leaving a stale hand-written conclusion. Rows whose
experiments were not run (``--parts``, ``--quick``) are left out.
"""

from __future__ import annotations

from typing import Any

from .cost_claims import cost_claim_rows
from .noise_report import noise_summary
from .quadratic import predicted_cycle_radius
from .report import SCHEDULE_LABEL, digits_summary

__all__ = ["claims_markdown"]

KHANH = "Khanh et al. 2024 (seed paper)"
FORET = "Foret et al. 2021"


def _quadratic_rows(quad: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    runs = {(r["config"].method, r["config"].schedule, r["config"].rho_mode): r for r in quad}
    rows = []
    sam, gd = runs.get(("SAM", "constant", "constant")), runs.get(("GD", "constant", "constant"))
    if sam is not None and gd is not None:
        d, d_gd = sam["dist"][-1], gd["dist"][-1]
        level = predicted_cycle_radius(sam["config"].lr, sam["config"].rho, sam["L"])
        ok = abs(d / level - 1) < 0.05 and d_gd < 1e-3 * d
        rows.append(
            (
                "SAM with a constant step (and radius) can fail to converge, even on a strongly "
                "convex quadratic",
                KHANH,
                f"quadratic: SAM ends at ‖x_K − x*‖ = {d:.2e}, the predicted 2-cycle radius is "
                f"{level:.2e}; GD with the same step reaches {d_gd:.2e}",
                "reproduced (within 5 % of the predicted stall)" if ok else "not reproduced",
            )
        )
        diminishing = {
            s: r for (m, s, mode), r in runs.items() if m == "SAM" and mode == "poly" and s != "constant"
        }
        if diminishing:
            ends = ", ".join(
                f"{SCHEDULE_LABEL.get(s, s)}: {r['dist'][-1]:.2e}" for s, r in sorted(diminishing.items())
            )
            ok = all(r["dist"][-1] < 0.1 * d for r in diminishing.values())
            poly_const = runs.get(("SAM", "constant", "poly"))
            extra = (
                f"; outside the hypotheses, the constant step with the shrinking radius ends at "
                f"{poly_const['dist'][-1]:.2e}"
                if poly_const is not None
                else ""
            )
            rows.append(
                (
                    "with diminishing steps and radii (Σ t_k = ∞, Σ t_k ρ_k < ∞) SAM converges",
                    KHANH,
                    f"quadratic, ρ_k = ρ/(k+1)^p: SAM ends at {ends} against {d:.2e} for the constant "
                    f"step and radius{extra}",
                    "consistent: every such run ends ≥ 10× closer than the stall (a finite run "
                    "cannot show the limit)"
                    if ok
                    else "not seen: a diminishing run ends within 10× of the stall",
                )
            )
    usam = runs.get(("USAM", "constant", "constant"))
    if usam is not None:
        d = usam["dist"][-1]
        rows.append(
            (
                "unnormalized SAM (USAM) converges with a small enough constant step and radius",
                KHANH,
                f"quadratic: USAM with the constant step ends at ‖x_K − x*‖ = {d:.2e}",
                "reproduced" if d < 1e-10 else "not reproduced",
            )
        )
    return rows


def _winners(entries: dict) -> list[tuple[float, str, float]]:
    """Configurations whose final accuracy is above SGD's in every paired seed."""
    return [k for k, e in entries.items() if e["above_final_test_acc"] == len(e["seeds"])]


def _names(keys: list[tuple[float, str, float]]) -> str:
    return ", ".join(f"{m} ρ={r:g}" for _, m, r in sorted(keys, key=lambda k: (k[1], k[2]))) or "none"


def _digits_row(digits: list[dict[str, Any]], noisy_summary: dict) -> tuple[str, str, str, str] | None:
    parts, seen = [], []
    if digits:
        summary = digits_summary(digits)
        better = []
        for (sched, method), e in summary.items():
            base = summary.get((sched, "SGD"))
            if method == "SGD" or base is None:
                continue
            if e["test_acc"][0] - base["test_acc"][0] > max(e["test_acc"][1], base["test_acc"][1]):
                better.append(f"{method} ({sched})")
        parts.append(
            f"part 2 (ρ = {digits[0]['config'].rho:g}, {len({s for s, _ in summary})} step schedules): "
            f"above SGD by more than the seed spread: {', '.join(better) or 'none'}"
        )
        seen.append(f"part 2: {', '.join(better)}" if better else "")
    clean = {k: e for k, e in noisy_summary.items() if k[0] == 0.0 and "delta_final_test_acc" in e}
    if clean:
        every = _winners(clean)
        top = max(clean, key=lambda k: clean[k]["delta_final_test_acc"]["mean"])
        parts.append(
            f"part 3 at 0 % noise: above SGD in every paired seed: {_names(every)}; largest mean gain "
            f"{top[1]} ρ={top[2]:g}, {clean[top]['delta_final_test_acc']['mean']:+.4f} "
            f"(one test image = {1 / clean[top]['n_test']:.4f})"
        )
        seen.append(f"part 3: {_names(every)}" if every else "")
    if not parts:
        return None
    found = [s for s in seen if s]
    verdict = f"only where listed ({'; '.join(found)})" if found else "not seen"
    return ("SAM improves generalization (clean labels)", FORET, "; ".join(parts), verdict)


def _still_rising(entry: dict[str, Any]) -> bool:
    """Whether the fitted fraction of the flips grew by > 2 points over the last quarter of training."""
    curve = entry["memorized_curve"]
    return float(curve[-1] - curve[(3 * (len(curve) - 1)) // 4]) > 0.02


def _noise_row(noisy_summary: dict) -> tuple[str, str, str, str] | None:
    measured, winners_all, smallest_sam_wins, oracle_wins = [], [], [], []
    for noise in sorted({k[0] for k in noisy_summary if k[0] > 0}):
        sgd = noisy_summary.get((noise, "SGD", 0.0))
        others = {k: e for k, e in noisy_summary.items() if k[0] == noise and "delta_final_test_acc" in e}
        if sgd is None or not others:
            continue
        every = _winners(others)
        winners_all.append([others[k] for k in every])
        top = max(others, key=lambda k: others[k]["delta_final_test_acc"]["mean"])
        sam = sorted(k for k in others if k[1] == "SAM")
        sam_text = ""
        if sam:
            smallest_sam_wins.append(sam[0] in every)
            sam_text = f"SAM ρ={sam[0][2]:g} {others[sam[0]]['delta_final_test_acc']['mean']:+.3f}; "
        oracle_wins.append(sgd["best_test_acc"]["mean"] > others[top]["final_test_acc"]["mean"])
        t = others[top]
        measured.append(
            f"{noise:.0%}: SGD {sgd['best_test_acc']['mean']:.3f} at its best epoch → "
            f"{sgd['final_test_acc']['mean']:.3f} final, fitting {sgd['final_memorized']['mean']:.0%} of "
            f"the flipped labels; {sam_text}above SGD in every seed: {_names(every)}; largest gain "
            f"{top[1]} ρ={top[2]:g}: {t['delta_final_test_acc']['mean']:+.3f} final "
            f"(→ {t['final_test_acc']['mean']:.3f}), {t['delta_best_test_acc']['mean']:+.3f} best-epoch, "
            f"fitting {t['final_memorized']['mean']:.0%} of the flipped labels"
        )
    if not measured:
        return None
    if all(winners_all):
        verdicts = ["yes in final accuracy, at every noise level, for the configurations listed"]
    elif any(winners_all):
        verdicts = ["in final accuracy at some noise levels only"]
    else:
        verdicts = ["not seen"]
    if smallest_sam_wins and not any(smallest_sam_wins):
        verdicts.append("never for SAM at its smallest radius")
    winners = [e for entries in winners_all for e in entries]
    if winners and all(_still_rising(e) for e in winners):
        verdicts.append(
            "the winners' fit of the flipped labels still rises over the last quarter of training: "
            "slowed, not stopped"
        )
    if all(oracle_wins):
        verdicts.append("SGD stopped at its best epoch (an oracle) beats every final accuracy")
    return ("SAM is robust to noisy labels", FORET, "; ".join(measured), "; ".join(verdicts))


def claims_markdown(
    quad: list[dict[str, Any]],
    digits: list[dict[str, Any]],
    noisy: list[dict[str, Any]],
    cost: list[dict[str, Any]] = (),
) -> list[str]:
    """The "Claims against measurements" section (empty when nothing relevant was run);
    part 4 adds a row per method (:mod:`lab.cost_claims`)."""
    rows = _quadratic_rows(quad) if quad else []
    noisy_summary = noise_summary(noisy) if noisy else {}
    for row in (_digits_row(digits, noisy_summary), _noise_row(noisy_summary)):
        if row is not None:
            rows.append(row)
    if cost:
        rows += cost_claim_rows(list(cost))
    if not rows:
        return []
    return [
        "## Claims against measurements",
        "",
        'Verdicts are rules applied to this run\'s numbers: a stall is "reproduced" within 5 % of '
        "its predicted radius; a gain on digits counts when the mean exceeds the larger seed std "
        "(part 2) or when the paired difference with SGD is positive in every seed (part 3, judged "
        "on the final accuracy); part 4's rows apply its rules (the verdict under part 4).",
        "",
        "| claim | source | measured here | verdict |",
        "|---|---|---|---|",
        *(f"| {claim} | {source} | {measured} | {verdict} |" for claim, source, measured, verdict in rows),
        "",
    ]
