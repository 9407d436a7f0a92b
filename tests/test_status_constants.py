"""The compiled backends' copy of the status layout is ``sam_fused/status.py``'s, entry for entry.

``csrc/sam_fused_common.h`` cannot import Python, so it spells the status indices again
(``kStatusSumsq`` for ``SUMSQ``, ``kStatusInvScale1`` for ``INV_SCALE1``...). These tests
read both sources as text and compare every name and value, so that a change on either side
alone fails here instead of making a kernel read the wrong entry. The same holds for the
ABI number Python checks the libraries against.
"""

from __future__ import annotations

import re
from pathlib import Path

from sam_fused import _extension
from sam_fused import status as S

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "sam_fused_common.h"
STATUS_PY = Path(S.__file__)

_HEADER_CONSTANT = re.compile(
    r"^\s*constexpr\s+(?:int|int64_t)\s+kStatus(\w+)\s*=\s*(-?\d+)\s*;", re.MULTILINE
)
_PY_CONSTANT = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(\d+)\b", re.MULTILINE)


def python_name(camel: str) -> str:
    """``InvScale1`` -> ``INV_SCALE1``, ``Gp2`` -> ``GP2``: the header's names in status.py's spelling."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", camel).upper()


def header_constants(text: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for camel, value in _HEADER_CONSTANT.findall(text):
        name = python_name(camel)
        assert name not in found, f"kStatus{camel} is defined twice in the header"
        found[name] = int(value)
    return found


def python_constants(text: str) -> dict[str, int]:
    """The integer entries of status.py (its slices and tuples are derived from them)."""
    return {name: int(value) for name, value in _PY_CONSTANT.findall(text)}


def mismatches(header: dict[str, int], python: dict[str, int]) -> list[str]:
    return [
        f"{name}: header {header.get(name)}, status.py {python.get(name)}"
        for name in sorted(set(header) | set(python))
        if header.get(name) != python.get(name)
    ]


def test_the_header_mirrors_status_py_entry_for_entry():
    header = header_constants(HEADER.read_text())
    python = python_constants(STATUS_PY.read_text())
    assert python["SIZE"] == S.SIZE and python["CLIP"] == S.CLIP  # the parser reads what Python runs
    assert len(python) == 12, python  # SUMSQ ... CLIP, and SIZE
    assert mismatches(header, python) == []


def test_a_change_on_either_side_alone_is_caught():
    header_text, python_text = HEADER.read_text(), STATUS_PY.read_text()
    header, python = header_constants(header_text), python_constants(python_text)
    # a moved index, a grown vector, a new entry, a dropped entry: on each side in turn
    edits = [
        (header_text.replace("kStatusSize = 11", "kStatusSize = 12"), python_text),
        (header_text, python_text.replace("CLIP = 10", "CLIP = 12")),
        (header_text, python_text.replace("SIZE = 11", "SCALE = 11\nSIZE = 12")),
        (re.sub(r"^constexpr int kStatusGv2 = 3;.*$", "", header_text, flags=re.MULTILINE), python_text),
    ]
    for new_header, new_python in edits:
        assert (new_header, new_python) != (header_text, python_text), "the edit did not apply"
        assert mismatches(header_constants(new_header), python_constants(new_python)), "not caught"
    assert mismatches(header, python) == []


def test_the_abi_version_is_the_header_s():
    found = re.search(r"constexpr\s+int64_t\s+kAbiVersion\s*=\s*(\d+)\s*;", HEADER.read_text())
    assert found is not None
    assert int(found[1]) == _extension.ABI_VERSION
