"""The documentation users copy from must not rot: the README's and the docs pages' Python
snippets run, their links lead somewhere, and the README stays a newcomer's page.

Each page's snippets run in order in one namespace, as a reader's session would, seeded with
what the text leaves to the reader: ``model``, ``loss_fn``, ``loader``, ``x``, ``y``,
``epochs``, ``example_x``, ``example_y``, a checkpoint ``path`` and a folder
``checkpoint_dir``; a docs page first runs the README's quickstart, which builds ``opt`` and
``sched``. The device in the mixed-precision recipe is the test device. Not run here: the
CUDA-graph recipe off a GPU (``GraphedSAMStep`` needs CUDA tensors; tests/test_graph.py tests
its behaviour), the framework recipes (they need a framework's trainer and data;
tests/test_integration_<framework>.py runs each of them with the real package) and the DDP
recipes (they need a process group; tests/test_distributed.py runs them on two ranks).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
NOT_HERE = ["sam_fused.integrations", "DistributedDataParallel", "sam_fused.distributed"]
if DEVICE != "cuda":
    NOT_HERE.append("GraphedSAMStep")
# the README's order, for a newcomer: what and why (above the first heading), then these
README_SECTIONS = [
    "Install",
    "Quickstart",
    "Variants",
    "The two commands",
    "SAM at SGD's cost",
    "Documentation",
]


def snippets(page: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    return [textwrap.dedent(b) for b in blocks]


def runnable(page: Path) -> list[str]:
    return [b for b in snippets(page) if not any(marker in b for marker in NOT_HERE)]


PAGES = [page for page in [README, *DOCS] if runnable(page)]


def reader_session(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).to(DEVICE)
    loader = [(torch.randn(8, 7, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)) for _ in range(2)]
    x, y = loader[0]
    return {
        "torch": torch,
        "model": model,
        "loss_fn": torch.nn.functional.cross_entropy,
        "loader": loader,
        "x": x,
        "y": y,
        "epochs": 1,
        "example_x": x,
        "example_y": y,
        "path": tmp_path / "checkpoint.pt",
        "checkpoint_dir": tmp_path / "dcp",  # torch.distributed.checkpoint writes a folder
    }


def run_snippet(code: str, where: str, namespace: dict) -> None:
    if "rho_sched" in code and "rho_sched" not in namespace:  # the text assumes one exists
        from sam_fused.schedules import PolynomialRho

        namespace["rho_sched"] = PolynomialRho(namespace["opt"], power=0.5)
    code = code.replace('"cuda"', repr(DEVICE))
    model = namespace["model"]
    before = [p.detach().clone() for p in model.parameters()]
    try:
        exec(compile(code, where, "exec"), namespace)
    except Exception as exc:
        raise AssertionError(f"{where} failed:\n{code}") from exc
    if "backward()" in code:  # a training snippet must have trained
        assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)), where


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_snippets_run(page, tmp_path):
    namespace = reader_session(tmp_path)
    if page != README:
        run_snippet(snippets(README)[0], "the README's quickstart", namespace)
    for index, code in enumerate(runnable(page)):
        run_snippet(code, f"{page.relative_to(ROOT)} python block {index}", namespace)
    for p in namespace["model"].parameters():
        assert torch.isfinite(p).all()


def test_the_pages_keep_their_examples():
    assert len(snippets(README)) >= 3, "the README lost its quickstart?"
    assert sum(len(runnable(page)) for page in PAGES) >= 12, "the docs lost their examples?"


def test_the_readme_is_a_newcomers_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == README_SECTIONS
    assert re.search(r"^\| .*speed-up", text, flags=re.M), "the measured headline table is gone"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_files(page):
    missing = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the page
        if not (page.parent / target.partition("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"
