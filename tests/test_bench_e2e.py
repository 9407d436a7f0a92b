"""Smoke test of the end-to-end benchmark (``benchmarks/bench_e2e.py``) on tiny CPU models.

It runs the CLI in-process and checks that every row of every workload is produced: the
eager rows with finite times and losses, the graphed rows as n/a on a CPU. Nothing here
is timed against a target; the speed targets live in the benchmark's output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the checkout, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_e2e  # noqa: E402
from benchmarks.models import TransformerConfig, TransformerLM, resnet18_cifar  # noqa: E402

EAGER = ("sgd", "perparam_sam", "sam_fused")
GRAPHED = ("sam_fused_graphed", "sgd_graphed")


@pytest.fixture
def restore_threads():
    # the benchmark sets one torch thread on a CPU; later tests should get the usual count back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_quick_tiny_run_produces_every_row(tmp_path, capsys, restore_threads):
    out = tmp_path / "e2e.json"
    # the reference backend keeps the smoke run free of a C++ build and of the Triton interpreter
    rc = bench_e2e.main(
        [
            *[
                "--device",
                "cpu",
                "--quick",
                "--tiny",
                "--warmup",
                "1",
                "--iters",
                "2",
                "--sam-backend",
                "reference",
            ],
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    payload = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"]): r for r in payload["rows"]}
    assert set(rows) == {(w, i) for w in bench_e2e.WORKLOADS for i in bench_e2e.IMPLS}
    for workload in bench_e2e.WORKLOADS:
        for impl in EAGER:
            row = rows[workload, impl]
            assert row["error"] is None, row
            assert math.isfinite(row["ms"]) and row["ms"] > 0, row
            assert math.isfinite(row["loss"]), row
            assert len(row["samples"]) == 2
            assert math.isfinite(row["x_sgd"]) and math.isfinite(row["vs_perparam"])
        assert rows[workload, "sgd"]["x_sgd"] == pytest.approx(1.0)
        assert rows[workload, "sam_fused"]["note"] == "backend reference"
        for impl in GRAPHED:
            row = rows[workload, impl]
            assert row["ms"] is None and row["error"] is None
            assert row["note"].startswith("n/a")
    printed = capsys.readouterr().out
    assert "vs per-param" in printed and "targets (graphed SAM, resnet18_b128)" in printed

    from benchmarks import report  # the README's markdown of the same run

    assert report.main(["--e2e", str(out)]) == 0
    markdown = capsys.readouterr().out
    for r in payload["rows"]:
        cell = f"{r['ms']:.2f}" if r["ms"] is not None else "–"
        assert f"| {r['workload']} | {r['impl']} | {cell} |" in markdown
    assert "python -m benchmarks.bench_e2e --device cpu" in markdown


def test_time_limit_reports_the_rest_as_not_run(restore_threads, capsys):
    rc = bench_e2e.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--time-limit",
            "0",
            "--workloads",
            "transformer_b8",
            "--impls",
            "sgd,sam_fused",
            "--sam-backend",
            "reference",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.count("not run (time limit") >= 2


def test_models_have_the_documented_sizes():
    """The full models as the benchmark describes them (built on the CPU, not run)."""
    resnet = list(resnet18_cifar().parameters())
    assert len(resnet) == 62 and sum(p.numel() for p in resnet) == 11_173_962
    assert resnet18_cifar()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    cfg = TransformerConfig()
    assert (cfg.layers, cfg.width, cfg.heads, cfg.mlp, cfg.seq, cfg.vocab) == (12, 768, 12, 3072, 128, 32000)
    tf = list(TransformerLM(cfg).parameters())
    assert len(tf) == 150 and sum(p.numel() for p in tf) == 134_338_304
    tiny = TransformerLM(TransformerConfig.tiny())
    assert tiny(torch.randint(0, 128, (2, 16))).shape == (2 * 16, 128)


def test_tables_render_with_no_rows():
    """A run whose every row was skipped (the triton rows on a CPU) still prints its header."""
    from benchmarks import bench_sam_step

    step_lines = bench_sam_step.table([], {}).splitlines()
    assert step_lines[0].split() == [
        "set",
        "base",
        "impl",
        "ms",
        "x-vs-baseline",
        "%",
        "of",
        "floor",
        "extra",
        "MiB",
        "B/el",
        "GB/s",
    ]
    assert bench_e2e.table([], {}).splitlines()[0].split()[:2] == ["workload", "step"]


def test_step_benchmark_cpu_quick_run(tmp_path, capsys, restore_threads):
    """The main job's benchmark on one small set: every CPU row times, agrees with the
    per-parameter loop (the benchmark's own check, against an independent implementation),
    and a row for the other device is skipped with its reason."""
    from benchmarks import bench_sam_step

    out = tmp_path / "step.json"
    argv = ["--quick", "--sets", "resnet50", "--base", "sgd,adamw", "--device", "cpu"]
    argv += ["--impls", "baseline,reference,foreach,cpp,cuda_noskip", "--json", str(out)]
    assert bench_sam_step.main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {(r["base"], r["impl"]): r for r in payload["rows"]}
    for base in ("sgd", "adamw"):
        for impl in ("baseline", "reference", "foreach", "cpp"):
            assert rows[(base, impl)]["ms"] > 0, rows[(base, impl)]
    assert "cuda" in payload["skipped"]["cuda_noskip"]
    agreement = payload["agreement"]
    assert set(agreement) == {"sgd", "adamw"}, agreement
    impls = {"baseline", "reference", "foreach", "cpp"}
    assert all(set(per_impl) == impls for per_impl in agreement.values())
    for per_impl in agreement.values():
        for impl, difference in per_impl.items():
            assert difference < 1e-5, (impl, difference)
    assert "skipped sam_fused cuda, no skip" in capsys.readouterr().out

    # the README's markdown table of the same run: one line per row, the measured times
    from benchmarks import report

    assert report.main(["--step", str(out)]) == 0
    markdown = capsys.readouterr().out
    for r in payload["rows"]:
        assert f"| {r['set']} | {r['base']} | {r['impl']} | {r['ms']:.3f} |" in markdown
    assert "--impls baseline,reference,foreach,cpp,cuda_noskip" in markdown
