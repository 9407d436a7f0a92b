"""The convergence lab's command line: run the four parts, write the plots and ``results.md``.

    python -m lab.convergence_lab --out docs/lab            # the full lab (about 6 minutes on 2 cores)
    python -m lab.convergence_lab --out /tmp/lab --quick    # a smoke run (seconds)
    python -m lab.convergence_lab --out /tmp/lab4 --parts cost   # part 4 alone
    python -m lab.convergence_lab --out docs/lab --readme README.md  # also the README's cost table

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

from .cost import COST_METHODS, missing_api, run_cost
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
    "cost": {
        "noise_levels": (0.2, 0.4),
        # SAM at part 3's published and working radii; the methods that choose which steps are
        # SAM steps at the working one (the gain to keep); MSAM and SAM-ON at their published
        # radii, which are on other scales (a momentum direction; ASAM-ON's |w|-scaled ascent).
        "radii": {
            "SGD": (0.0,),
            "SAM": (0.05, 1.0),
            "LookSAM": (1.0,),
            "IntervalSAM": (1.0,),
            "MSAM": (3.0,),
            "AESAM": (1.0,),
            "SAM-ON": (10.0,),
            "SAMWindow": (1.0,),
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
    "cost": {
        "noise_levels": (0.4,),
        "radii": {"SGD": (0.0,), "SAM": (1.0,), "IntervalSAM": (1.0,)},
        "seeds": (0, 1),
        "config": NoiseConfig("SGD", 0.0, 0.0, 0, epochs=2),
    },
}
PARTS = ("quadratic", "digits", "label_noise", "cost")
RUNNERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "quadratic": run_quadratic,
    "digits": run_digits,
    "label_noise": run_label_noise,
    "cost": run_cost,
}


def _noise_tasks(part: str, spec: dict[str, Any], methods: Sequence[str] | None) -> list[tuple[str, Any]]:
    """Parts 3 and 4: every noise level x method x radius x seed (``methods`` filters)."""
    base: NoiseConfig = spec["config"]
    return [
        (part, NoiseConfig(**{**asdict(base), "method": method, "rho": rho, "noise": noise, "seed": seed}))
        for noise in spec["noise_levels"]
        for method, radii in spec["radii"].items()
        if methods is None or method in methods
        for rho in radii
        for seed in spec["seeds"]
    ]


def plan(
    quick: bool, parts: Sequence[str], cost_methods: Sequence[str] | None = None
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """The list of ``(part, config)`` runs and the settings that describe them.

    ``cost_methods`` restricts part 4 to those methods (default: all of its plan). A method
    whose API this install lacks is refused here, before anything runs.
    """
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
        tasks += _noise_tasks("label_noise", spec["label_noise"], None)
        settings["label_noise"] = asdict(spec["label_noise"]["config"])
    if "cost" in parts:
        cost = spec["cost"]
        chosen = [m for m in cost["radii"] if cost_methods is None or m in cost_methods]
        missing = missing_api(chosen)
        if missing:
            raise ValueError(
                "part 4 needs what this install of sam_fused lacks: "
                + "; ".join(missing)
                + ". Install a sam_fused that has them, or leave those methods out with --cost-methods "
                + " ".join(m for m in chosen if not any(x.startswith(m + ":") for x in missing))
            )
        tasks += _noise_tasks("cost", cost, chosen)
        settings["cost"] = asdict(cost["config"])
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
    if part == "cost":
        return f"cost {cfg.noise:.0%} {cfg.method} rho={cfg.rho:g} seed={cfg.seed}"
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
        help="which parts to run (default all; cost = part 4)",
    )
    parser.add_argument(
        "--cost-methods",
        nargs="+",
        choices=tuple(COST_METHODS),
        default=None,
        help="part 4: run only these methods (default all)",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="part 4: also rewrite this README's generated cost table (not with --quick)",
    )
    args = parser.parse_args(argv)
    if args.readme is not None and (args.quick or "cost" not in args.parts):
        parser.error("--readme writes part 4's full-run numbers: it needs part 4 and no --quick")
    # These import matplotlib: after parsing, so that --help stays instant.
    from . import claims, cost_claims, cost_report, noise_report, report

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        tasks, settings = plan(args.quick, args.parts, args.cost_methods)
    except ValueError as exc:
        parser.error(str(exc))
    settings["command"] = (
        "python -m lab.convergence_lab --out " + str(args.out) + (" --quick" if args.quick else "")
    )
    if tuple(args.parts) != PARTS:
        settings["command"] += " --parts " + " ".join(args.parts)
    if args.cost_methods:
        settings["command"] += " --cost-methods " + " ".join(args.cost_methods)
    log(f"convergence lab: {len(tasks)} runs on {args.jobs} process(es) -> {args.out}")
    start = time.perf_counter()
    results = run_all(tasks, args.jobs, log)
    quad = [r for r in results if r["part"] == "quadratic"]
    digits = [r for r in results if r["part"] == "digits"]
    noisy = [r for r in results if r["part"] == "label_noise"]
    cost = [r for r in results if r["part"] == "cost"]
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
    if cost:
        images += cost_report.plot_pareto(cost, args.out)
        sections += cost_report.cost_markdown(cost, settings["cost"])
    sections += claims.claims_markdown(quad, digits, noisy, cost)
    report.write_markdown(args.out / "results.md", quad, digits, settings, images, sections)
    if args.readme is not None:
        answer = cost_report.verdict_lines(cost_report.cost_summary(cost))[-1]
        cost_claims.update_readme(args.readme, cost, answer)
        log(f"rewrote the cost table in {args.readme}")
    log(f"wrote {len(images)} plots and results.md to {args.out} in {time.perf_counter() - start:.0f}s")
    return {
        "quadratic": quad,
        "digits": digits,
        "label_noise": noisy,
        "cost": cost,
        "images": images,
        "out": args.out,
    }


if __name__ == "__main__":
    main()
