"""Smoke test of the convergence lab (``python -m lab.convergence_lab --quick``).

Beyond "the files were written", it checks the property the lab exists to show, on numbers
computed in this run: on the quadratic, SAM with a constant step and radius stalls on the
2-cycle of radius ``t rho L / (2 - t L)`` while plain GD with the same step converges, and
the paper's diminishing step (Diminish 1) ends closer to ``x*`` than the constant step.
For the label-noise part it checks the data the runs trained on: the training labels are
flipped at exactly the requested rate, each to another class, the test set is the clean
split, and the recorded train accuracies on the noisy and on the clean labels agree with the
recorded fraction of memorized flips.
"""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="the lab's plots need matplotlib (scripts/lab.sh installs it)")
pytest.importorskip("sklearn", reason="the lab's digits data need scikit-learn (scripts/lab.sh installs it)")

import numpy as np
import torch

from lab.convergence_lab import main
from lab.digits import load_data
from lab.label_noise import noisy_data, symmetric_noise
from lab.quadratic import predicted_cycle_radius


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory) -> dict:
    """One quick run of the whole lab (all three parts), shared by the tests below."""
    out = tmp_path_factory.mktemp("lab")
    return main(["--quick", "--out", str(out), "--jobs", "1"])


def test_quick_lab_writes_outputs_and_shows_the_stall(quick_lab) -> None:
    results = quick_lab
    out = results["out"]

    for name in ("results.md", "quadratic_dist.png", "quadratic_grad.png", "quadratic_gap.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("quadratic_sam_summary.png", "digits_accuracy.png", "digits_train_loss.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "Part 1" in text and "Part 2" in text and "Part 3" in text and "Part 4" in text
    assert "## Claims against measurements" in text and "| SAM is robust to noisy labels |" in text

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


def test_quick_lab_label_noise_flips_training_labels_only(quick_lab) -> None:
    runs = quick_lab["label_noise"]
    assert (quick_lab["out"] / "label_noise_curves.png").stat().st_size > 0
    assert {r["config"].noise for r in runs} >= {0.0, 0.4}
    x_tr, y_tr, x_te, y_te = load_data(0)
    # The clean test labels are scikit-learn's own, split independently of the lab's code.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)[3]
    assert np.array_equal(y_te.numpy(), y_test)
    for r in runs:
        cfg = r["config"]
        n = r["n_train"]
        # The rate the run measured on the labels it trained on: exactly round(p n) flips.
        assert r["flip_rate"] == pytest.approx(round(cfg.noise * n) / n, abs=1e-12)
        assert abs(r["flip_rate"] - cfg.noise) <= 1 / n
        # The data the run used: training images unchanged, test set = the clean split.
        xs, y_noisy, y_clean, xt, yt = noisy_data(cfg.split_seed, cfg.noise, cfg.seed)
        assert torch.equal(xs, x_tr) and torch.equal(y_clean, y_tr)
        assert torch.equal(xt, x_te) and torch.equal(yt, y_te) and r["n_test"] == len(y_te)
        assert int((y_noisy != y_clean).sum()) / n == r["flip_rate"]
        # Train accuracy on the noisy labels is reported per epoch; on the unflipped examples
        # noisy and clean labels agree, so acc_noisy - f * memorized = acc_clean - f * (flips
        # predicted as their clean label) lies in [0, acc_clean].
        noisy_acc, clean_acc = r["train_noisy_curve"], r["train_clean_curve"]
        assert len(noisy_acc) == cfg.epochs + 1 and np.all((noisy_acc >= 0) & (noisy_acc <= 1))
        unflipped = noisy_acc - r["flip_rate"] * r["memorized_curve"]
        assert np.all(unflipped >= -1e-6) and np.all(unflipped <= clean_acc + 1e-6)
        if cfg.noise == 0.0:
            assert np.array_equal(noisy_acc, clean_acc) and not r["memorized_curve"].any()


def test_symmetric_noise_is_exact_uniform_over_other_classes_and_nested() -> None:
    _, y, _, _ = load_data(0)
    low, high = symmetric_noise(y, 0.2, seed=3), symmetric_noise(y, 0.4, seed=3)
    for rate, noisy in ((0.2, low), (0.4, high)):
        changed = noisy != y
        assert int(changed.sum()) == round(rate * len(y))
        assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
        # Each offset 1..9 (new class = old + offset mod 10) is equally likely: loose bounds.
        offsets = torch.bincount((noisy[changed] - y[changed]) % 10, minlength=10)
        assert offsets[0] == 0
        expected = int(changed.sum()) / 9
        assert torch.all((offsets[1:] > 0.5 * expected) & (offsets[1:] < 1.5 * expected))
    # The 20 % flips are a subset of the 40 % ones, with the same new labels; seeded.
    flipped_low = low != y
    assert torch.all(high[flipped_low] == low[flipped_low])
    assert torch.equal(symmetric_noise(y, 0.4, seed=3), high)
    assert not torch.equal(symmetric_noise(y, 0.4, seed=4), high)
    assert torch.equal(symmetric_noise(y, 0.0, seed=3), y)
