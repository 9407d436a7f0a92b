"""What a user's install runs: one SAM step per variant on a fused backend, from outside the tree.

``scripts/check_install.sh`` runs this file with the interpreter of a fresh virtual
environment that holds only CPU torch and the installed sam_fused, from a temporary
directory (so ``import sam_fused`` is the installed package, never the checkout):

    python install_check.py --expect jit|prebuilt --checkout PATH

It checks, and exits non-zero naming the first thing that is wrong:

* the package imported is the installed one, and its version is the metadata's;
* the C++ backend is available, as expected: ``jit`` compiled on first use from the
  sources the install shipped, announced by one line on stderr; ``prebuilt`` built by
  setup.py at install time (``pip install --no-build-isolation``);
* one step of every variant (SAM, ASAM and the nine others of ``sam_fused.VARIANTS``) runs,
  with ``backend="auto"``, on the backend that ``auto`` documents: the ``cpp`` backend for
  each variant whose ascent and descent rules the ``cpp`` backend's capabilities declare,
  ``foreach`` for any others. The expectation is read from those capabilities,
  so it grows stricter by itself when they grow;
* each step equals the same step on the reference backend (the specification), from the
  same weights and data.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import sys
from pathlib import Path

import torch

VARIANT_KWARGS = {"asam": {"variant": "sam", "adaptive": True}}  # ASAM is SAM(adaptive=True)


class Tee(io.TextIOBase):
    """stderr that also keeps what was written, to check the compile message."""

    def __init__(self, stream) -> None:
        self.stream, self.kept = stream, []

    def write(self, text: str) -> int:
        self.kept.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def fail(message: str) -> None:
    raise SystemExit(f"install check FAILED: {message}")


def check_installed(checkout: Path) -> None:
    import sam_fused

    location = Path(sam_fused.__file__).resolve()
    if checkout in location.parents or checkout in Path.cwd().resolve().parents:
        fail(f"sam_fused was imported from the checkout ({location}), not from the install")
    metadata = importlib.metadata.version("sam_fused")
    if sam_fused.__version__ != metadata:
        fail(f"sam_fused.__version__ is {sam_fused.__version__}, the installed metadata says {metadata}")
    print(f"sam_fused {metadata} imported from {location.parent}")


def check_cpp_backend(expect: str) -> None:
    import sam_fused
    from sam_fused import _extension

    tee = Tee(sys.stderr)
    sys.stderr = tee
    try:
        info = sam_fused.available_backends()["cpp"]
    finally:
        sys.stderr = tee.stream
    if not info:
        fail(f"the cpp backend is unavailable: {info.detail}")
    announced = [line for line in "".join(tee.kept).splitlines() if "sam_fused: compiling" in line]
    if expect == "prebuilt":
        if not info.detail.startswith("prebuilt") or announced:
            fail(f"expected the extension setup.py built at install time, got: {info.detail}")
    else:
        if not info.detail.startswith("JIT build") or len(announced) != 1:
            fail(f"expected one announced first-use build, got {info.detail!r} and {announced}")
        package = Path(sam_fused.__file__).resolve().parent
        if package / "csrc" != _extension.CSRC:
            fail(f"the sources were read from {_extension.CSRC}, not from the installed package")
    print(f"cpp backend: {info.detail}")


def expected_backend(variant) -> str:
    """What ``backend="auto"`` documents for float32 CPU tensors: cpp where its capabilities
    declare the variant's rules, foreach elsewhere."""
    from sam_fused.backends import CppBackend

    refusal = CppBackend.capabilities.refusal(torch.device("cpu"), torch.float32, variant)
    return "cpp" if refusal is None else "foreach"


def one_step(kwargs: dict, backend: str) -> tuple[list[str], list[torch.Tensor]]:
    from sam_fused import SAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend, **kwargs)

    def closure() -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    after = [p.detach().clone() for p in model.parameters()]
    if all(torch.equal(a, b) for a, b in zip(after, before)):
        fail(f"{kwargs}: the step on {backend} changed no weight")
    return opt.backends, after


def check_variants() -> int:
    import sam_fused

    names = ["asam", *sam_fused.VARIANTS]
    for name in names:
        kwargs = VARIANT_KWARGS.get(name, {"variant": name})
        expected = expected_backend(sam_fused.VARIANTS[kwargs["variant"]])
        backends, weights = one_step(kwargs, "auto")
        if backends != [expected]:
            fail(f"{name}: backend='auto' ran on {backends}, expected [{expected!r}]")
        _, reference = one_step(kwargs, "reference")
        for got, want in zip(weights, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        print(f"  {name:<9} one step on {backends[0]}, equal to the reference backend's")
    return len(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", choices=("jit", "prebuilt"), required=True)
    parser.add_argument("--checkout", type=Path, required=True, help="the repository (must not be imported)")
    args = parser.parse_args()
    if os.environ.get("PYTHONPATH"):
        fail(f"PYTHONPATH is set ({os.environ['PYTHONPATH']}): the check must see the install alone")
    check_installed(args.checkout.resolve())
    check_cpp_backend(args.expect)
    count = check_variants()
    print(f"{count} variants checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
