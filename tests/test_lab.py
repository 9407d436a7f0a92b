"""Smoke test of the convergence lab (``python -m lab.convergence_lab --quick``).

Beyond "the files were written", it checks the property the lab exists to show, on numbers
computed in this run: on the quadratic, SAM with a constant step and radius stalls on the
2-cycle of radius ``t rho L / (2 - t L)`` while plain GD with the same step converges, and
the paper's diminishing step (Diminish 1) ends closer to ``x*`` than the constant step.
"""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="the lab's plots need matplotlib (scripts/lab.sh installs it)")
pytest.importorskip("sklearn", reason="the lab's digits data need scikit-learn (scripts/lab.sh installs it)")

from lab.convergence_lab import main
from lab.quadratic import predicted_cycle_radius


def test_quick_lab_writes_outputs_and_shows_the_stall(tmp_path) -> None:
    out = tmp_path / "lab"
    results = main(["--quick", "--out", str(out), "--jobs", "1"])

    for name in ("results.md", "quadratic_dist.png", "quadratic_grad.png", "quadratic_gap.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("quadratic_sam_summary.png", "digits_accuracy.png", "digits_train_loss.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "Part 1" in text and "Part 2" in text

    runs = {(r["config"].method, r["config"].schedule, r["config"].rho_mode): r for r in results["quadratic"]}
    const = runs[("SAM", "constant", "constant")]
    dimin = runs[("SAM", "diminish1", "constant")]
    gd = runs[("GD", "constant", "constant")]
    cfg = const["config"]

    # GD with the same constant step converges: the stall below is SAM's, not the step's.
    assert gd["dist"][-1] < 1e-6
    # Constant step and radius: SAM ends on the predicted 2-cycle, far from x*.
    level = predicted_cycle_radius(cfg.lr, cfg.rho, const["L"])
    assert const["dist"][-1] == pytest.approx(level, rel=0.05)
    # The diminishing step ends much closer to x* than the constant one.
    assert dimin["dist"][-1] < 0.5 * const["dist"][-1]
    assert dimin["grad"][-1] < const["grad"][-1]

    digits = results["digits"]
    assert digits and all(0.0 <= r["test_acc"] <= 1.0 for r in digits)
