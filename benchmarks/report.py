"""Markdown tables for the README from the JSON the benchmarks write.

    python -m benchmarks.report OUT_DIR            # bench.json, bench_variants.json, bench_e2e.json
    python -m benchmarks.report --step a.json --e2e b.json

Prints one section per file found: the device, versions and date of the run, the command
that reproduces it, and the table. Every number comes from the JSON as measured; ratios are
the benchmark's own (one run, one card), nothing is recomputed across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STEP_MODULE = "benchmarks.bench_sam_step"
E2E_MODULE = "benchmarks.bench_e2e"


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _machine(env: dict[str, Any]) -> str:
    cores = f"{env['cpus']} cores, " if env.get("cpus") else ""
    cpu = f"CPU ({cores}{env.get('torch_threads', '?')} torch threads)"
    where = env.get("gpu") or cpu
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "python") if env.get(k))
    return f"{where}; {versions}; {env.get('date', 'date unknown')}"


def _command(module: str, args: dict[str, Any]) -> str:
    """The command line that repeats the run: the arguments that differ from the defaults."""
    import importlib

    defaults = vars(importlib.import_module(module).parse_args([]))
    words = ["python -m " + module]
    for key, value in sorted(args.items()):
        if value in (None, False, "") or key in ("json", "time_limit") or defaults.get(key) == value:
            continue
        flag = "--" + key.replace("_", "-")
        words.append(flag if value is True else f"{flag} {value}")
    return " ".join(words)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def step_section(payload: dict[str, Any], title: str) -> str:
    env = payload.get("environment", {})
    head = ["set", "base", "implementation", "ms", "× vs per-param loop", "% of floor", "B/element", "GB/s"]
    rows = [
        [
            r["set"],
            r["base"],
            r["impl"],
            _num(r["ms"], ".3f") if not r.get("error") else f"failed: {r['error']}",
            _num(r.get("speedup"), ".1f"),
            _num(r.get("pct_floor"), ".0f"),
            _num(r.get("bytes_per_element"), "g"),
            _num(r.get("gbs"), ".0f"),
        ]
        for r in payload.get("rows", [])
    ]
    parts = [f"### {title}", "", f"{_machine(env)}."]
    if payload.get("copy_bandwidth_gbs"):
        parts.append(f"Copy bandwidth (read + write) {payload['copy_bandwidth_gbs']:.0f} GB/s.")
    parts += [f"`{_command(STEP_MODULE, payload.get('args', {}))}`", "", _table(head, rows)]
    skipped = payload.get("skipped") or {}
    parts += [f"\nSkipped {impl}: {reason}" for impl, reason in skipped.items()]
    return "\n".join(parts)


def e2e_section(payload: dict[str, Any]) -> str:
    env = payload.get("environment", {})
    head = ["workload", "step", "ms/step", "× eager SGD", "per-param SAM / this", "note"]
    rows = [
        [
            r["workload"],
            r["impl"],
            _num(r.get("ms"), ".2f") if not r.get("error") else f"failed: {r['error']}",
            _num(r.get("x_sgd"), ".2f"),
            _num(r.get("vs_perparam"), ".1f"),
            r.get("note", ""),
        ]
        for r in payload.get("rows", [])
    ]
    parts = [
        "### End-to-end training step (bf16 autocast)",
        "",
        f"{_machine(env)}.",
        f"`{_command(E2E_MODULE, payload.get('args', {}))}`",
        "",
        _table(head, rows),
    ]
    targets = payload.get("targets") or []
    if targets:
        parts += ["", "```", *targets, "```"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="a gpu_check.sh output folder")
    parser.add_argument("--step", help="bench_sam_step JSON")
    parser.add_argument("--variants", help="bench_sam_step JSON of the variant rows")
    parser.add_argument("--e2e", help="bench_e2e JSON")
    args = parser.parse_args(argv)
    files = {"step": args.step, "variants": args.variants, "e2e": args.e2e}
    if args.out_dir:
        folder = Path(args.out_dir)
        defaults = {"step": "bench.json", "variants": "bench_variants.json", "e2e": "bench_e2e.json"}
        for key, name in defaults.items():
            if files[key] is None and (folder / name).is_file():
                files[key] = str(folder / name)
    sections = []
    if files["step"]:
        sections.append(step_section(json.loads(Path(files["step"]).read_text()), "SAM optimizer step"))
    if files["variants"]:
        payload = json.loads(Path(files["variants"]).read_text())
        sections.append(step_section(payload, "Variants (Triton, SGD base)"))
    if files["e2e"]:
        sections.append(e2e_section(json.loads(Path(files["e2e"]).read_text())))
    if not sections:
        print("no benchmark JSON given or found", file=sys.stderr)
        return 1
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
