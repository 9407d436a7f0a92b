"""Smoke test of the FSDP2 benchmark (``benchmarks/bench_fsdp2.py``): two gloo ranks on the CPU.

The benchmark itself checks that the fused and per-parameter rows compute the same weights
(it raises otherwise); here: every row is produced with a finite time, the rows ran the
backends they name (the table layout's fused path where the compiled backend builds), and
the JSON holds what the table printed. Nothing is timed against a target: the targets are
the benchmark's output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the checkout, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_fsdp2  # noqa: E402
from sam_fused.backends import CppBackend  # noqa: E402


def test_two_rank_quick_run_produces_every_row(tmp_path, capsys):
    out = tmp_path / "fsdp2.json"
    CppBackend.info()  # build the extension here once, not in both ranks
    bench_fsdp2.main(["--quick", "--sets", "resnet50", "--base", "sgd", "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == list(bench_fsdp2.ROWS)
    by_row = {r["row"]: r for r in rows}
    fused = "cpp" if CppBackend.info().available else "foreach"
    assert by_row["per-parameter"]["backends"] == ["reference"]
    assert by_row["fused sharded"]["backends"] == [fused]
    assert by_row["flat, same shards"]["backends"] == [fused]
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["elements_per_rank"] < r["elements"]  # sharded: each rank holds part
        assert r["check_max_abs_diff"] < 1e-5
    printed = capsys.readouterr().out
    assert all(f"| {r['row']} |" in printed for r in rows)
