"""The convergence lab's command line: run the three parts, write the plots and ``results.md``.

    python -m lab.convergence_lab --out docs/lab            # the full lab (about 5 minutes on 2 cores)
    python -m lab.convergence_lab --out /tmp/lab --quick    # a smoke run (seconds)

Runs are independent and each is seeded, so they are spread over ``--jobs`` processes
(default: two, the size of the machines this lab was written for) and every number is the
same whatever the process layout: each run computes with one intra-op thread, which is
also faster than two for tensors this small. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .digits import DIGITS_METHODS, DigitsConfig, run_digits
from .label_noise import NoiseConfig, run_label_noise
from .quadratic import QUADRATIC_METHODS, QuadConfig, run_quadratic

__all__ = ["main", "plan"]

FULL = {
    "quadratic": {
        "methods": tuple(QUADRATIC_METHODS),
        "schedules": ("constant", "diminish1", "diminish2", "diminish3"),
        "rho_modes": ("constant", "poly"),
        "config": QuadConfig("SAM", "constant", "constant", steps=600, steps_per_epoch=30),
    },
    "digits": {
        "methods": DIGITS_METHODS,
        "schedules": ("constant", "diminish1", "diminish2", "diminish3"),
        "seeds": (0, 1, 2),
        "config": DigitsConfig("SGD", "constant", 0, epochs=30),
    },
    "label_noise": {
        "noise_levels": (0.0, 0.2, 0.4),
        # SAM: the published 0.05 up to the radius where it visibly slows the fit of the noise;
        # ASAM's radius is on another scale (|w|-weighted), 0.5 being its published value.
        "radii": {
            "SGD": (0.0,),
            "SAM": (0.05, 0.2, 1.0),
            "ASAM": (0.5, 5.0),
            "VaSSO": (0.05, 1.0),
            "FSAM": (0.05, 1.0),
            "GSAM": (0.05, 1.0),
        },
        "seeds": (0, 1, 2, 3, 4),
        "config": NoiseConfig("SGD", 0.0, 0.0, 0, epochs=80),
    },
}
QUICK = {
    "quadratic": {
        "methods": ("GD", "SAM"),
        "schedules": ("constant", "diminish1"),
        "rho_modes": ("constant", "poly"),
        "config": QuadConfig("SAM", "constant", "constant", steps=200, steps_per_epoch=40),
    },
    "digits": {
        "methods": ("SGD", "SAM", "LookSAM"),
        "schedules": ("constant", "diminish1"),
        "seeds": (0, 1),
        "config": DigitsConfig("SGD", "constant", 0, epochs=2),
    },
    "label_noise": {
        "noise_levels": (0.0, 0.4),
        "radii": {"SGD": (0.0,), "SAM": (1.0,)},
        "seeds": (0, 1),
        "config": NoiseConfig("SGD", 0.0, 0.0, 0, epochs=2),
    },
}
PARTS = ("quadratic", "digits", "label_noise")
RUNNERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "quadratic": run_quadratic,
    "digits": run_digits,
    "label_noise": run_label_noise,
}


def plan(quick: bool, parts: Sequence[str]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """The list of ``(part, config)`` runs and the settings that describe them."""
    spec = QUICK if quick else FULL
    tasks: list[tuple[str, Any]] = []
    settings: dict[str, Any] = {}
    if "quadratic" in parts:
        q = spec["quadratic"]
        base: QuadConfig = q["config"]
        for method in q["methods"]:
            for rho_mode in q["rho_modes"]:
                if method == "GD" and rho_mode != "constant":
                    continue  # GD has no radius
                for schedule in q["schedules"]:
                    cfg = QuadConfig(
                        **{**asdict(base), "method": method, "schedule": schedule, "rho_mode": rho_mode}
                    )
                    tasks.append(("quadratic", cfg))
        settings["quadratic"] = asdict(base)
    if "digits" in parts:
        d = spec["digits"]
        base_d: DigitsConfig = d["config"]
        for schedule in d["schedules"]:
            for method in d["methods"]:
                for seed in d["seeds"]:
                    cfg = DigitsConfig(
                        **{**asdict(base_d), "method": method, "schedule": schedule, "seed": seed}
                    )
                    tasks.append(("digits", cfg))
        settings["digits"] = {**asdict(base_d), "seeds": ", ".join(str(s) for s in d["seeds"])}
    if "label_noise" in parts:
        n = spec["label_noise"]
        base_n: NoiseConfig = n["config"]
        for noise in n["noise_levels"]:
            for method, radii in n["radii"].items():
                for rho in radii:
                    for seed in n["seeds"]:
                        cfg = NoiseConfig(
                            **{**asdict(base_n), "method": method, "rho": rho, "noise": noise, "seed": seed}
                        )
                        tasks.append(("label_noise", cfg))
        settings["label_noise"] = asdict(base_n)
    return tasks, settings


def _run(task: tuple[str, Any]) -> dict[str, Any]:
    part, cfg = task
    start = time.perf_counter()
    result = RUNNERS[part](cfg)
    result["part"] = part
    result["seconds"] = time.perf_counter() - start
    return result


def _label(task: tuple[str, Any]) -> str:
    part, cfg = task
    if part == "quadratic":
        return f"quadratic {cfg.method} {cfg.schedule} rho={cfg.rho_mode}"
    if part == "label_noise":
        return f"label noise {cfg.noise:.0%} {cfg.method} rho={cfg.rho:g} seed={cfg.seed}"
    return f"digits {cfg.method} {cfg.schedule} seed={cfg.seed}"


def _summary(result: dict[str, Any]) -> str:
    if "dist" in result:
        return f"|x-x*|={result['dist'][-1]:.2e}"
    if "final_test_acc" in result:
        return f"test acc {result['final_test_acc']:.4f} (best {result['best_test_acc']:.4f})"
    return f"test acc {result['test_acc']:.4f}"


def run_all(tasks: list[tuple[str, Any]], jobs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run every task, in this process (``jobs == 1``) or in a spawn pool; keep task order."""
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    start = time.perf_counter()

    def report(index: int, result: dict[str, Any], done: int) -> None:
        results[index] = result
        log(
            f"[{done}/{len(tasks)}] {_label(tasks[index])}: {_summary(result)} "
            f"({result['seconds']:.1f}s; {time.perf_counter() - start:.0f}s elapsed)"
        )

    if jobs <= 1:
        for i, task in enumerate(tasks):
            report(i, _run(task), i + 1)
    else:
        # spawn, not fork: forking a process whose torch thread pools are running can hang.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_run, task): i for i, task in enumerate(tasks)}
            for done, future in enumerate(as_completed(futures), start=1):
                report(futures[future], future.result(), done)
    return [r for r in results if r is not None]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the lab; returns the results (used by the smoke test) after writing the files."""
    parser = argparse.ArgumentParser(prog="python -m lab.convergence_lab", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/lab"), help="output folder (default docs/lab)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds), for the tests")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=PARTS,
        help="which parts to run (default all)",
    )
    args = parser.parse_args(argv)
    # These import matplotlib: after parsing, so that --help stays instant.
    from . import claims, noise_report, report

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    tasks, settings = plan(args.quick, args.parts)
    settings["command"] = (
        "python -m lab.convergence_lab --out " + str(args.out) + (" --quick" if args.quick else "")
    )
    if tuple(args.parts) != PARTS:
        settings["command"] += " --parts " + " ".join(args.parts)
    log(f"convergence lab: {len(tasks)} runs on {args.jobs} process(es) -> {args.out}")
    start = time.perf_counter()
    results = run_all(tasks, args.jobs, log)
    quad = [r for r in results if r["part"] == "quadratic"]
    digits = [r for r in results if r["part"] == "digits"]
    noisy = [r for r in results if r["part"] == "label_noise"]
    args.out.mkdir(parents=True, exist_ok=True)
    images = []
    if quad:
        images += report.plot_quadratic(quad, args.out)
    if digits:
        images += report.plot_digits(digits, args.out)
    sections: list[str] = []
    if noisy:
        images += noise_report.plot_noise(noisy, args.out)
        sections += noise_report.noise_markdown(noisy, settings["label_noise"])
    sections += claims.claims_markdown(quad, digits, noisy)
    report.write_markdown(args.out / "results.md", quad, digits, settings, images, sections)
    log(f"wrote {len(images)} plots and results.md to {args.out} in {time.perf_counter() - start:.0f}s")
    return {"quadratic": quad, "digits": digits, "label_noise": noisy, "images": images, "out": args.out}


if __name__ == "__main__":
    main()
