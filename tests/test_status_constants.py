"""The compiled libraries' copies of Python's numbers are Python's, entry for entry.

``csrc/sam_fused_common.h`` cannot import Python, so it spells the status indices again
(``kStatusSumsq`` for ``SUMSQ``, ``kStatusInvScale1`` for ``INV_SCALE1``...), and
``csrc/sam_fused_math.h`` numbers its functors as Python numbers the variants' rules
(``variants.Ascent``, ``variants.Descent``) and the fused bases (``BaseSpec.kernel``). These
tests read the sources as text and compare every name and number, so that a change on either
side alone fails here instead of making a kernel read the wrong entry or run the wrong rule.
The ABI number has one definition, the header's, which Python reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from sam_fused import _extension
from sam_fused import status as S
from sam_fused.base_updates import REGISTRY
from sam_fused.variants import Ascent, Descent

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "sam_fused_common.h"
MATH_HEADER = HEADER.parent / "sam_fused_math.h"
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


# ---------------------------------------------------------------------- functors
# a functor opens with its number and name: struct AscentVasso {  // ...
#   static constexpr int kNumber = 1;
#   static constexpr const char* kName = "VASSO";
_FUNCTOR = re.compile(
    r"struct (\w+) \{[^\n]*\n\s*static constexpr int kNumber = (\d+);\s*\n"
    r"\s*static constexpr const char\* kName = \"(\w+)\";"
)
_FAMILY = re.compile(r"using (AscentRules|DescentRules|Bases) = Family<([^>]*)>;")


def header_functors(text: str) -> dict[str, dict[str, int]]:
    """Each dispatch list of the header: {functor name: number}, for the functors it lists."""
    numbers = {struct: (name, int(number)) for struct, number, name in _FUNCTOR.findall(text)}
    families: dict[str, dict[str, int]] = {}
    for family, members in _FAMILY.findall(text):
        entries = families[family] = {}
        for struct in (m.strip() for m in members.split(",")):
            assert struct in numbers, f"{family} lists {struct}, which opens without kNumber and kName"
            name, number = numbers[struct]
            assert name not in entries, f"{family} lists {name} twice"
            entries[name] = number
    return families


def python_functors() -> dict[str, dict[str, int]]:
    return {
        "AscentRules": {rule.name: int(rule) for rule in Ascent},
        "DescentRules": {rule.name: int(rule) for rule in Descent},
        "Bases": {spec.name.upper(): spec.kernel for spec in set(REGISTRY.values())},
    }


def test_the_functors_carry_python_s_numbers():
    header = header_functors(MATH_HEADER.read_text())
    assert set(header["Bases"]) == {"SGD", "ADAM", "LION"}  # the parser reads what the header lists
    assert header == python_functors()


def test_a_renumbered_or_missing_functor_is_caught():
    text = MATH_HEADER.read_text()
    python = python_functors()
    rsam = 'static constexpr const char* kName = "RSAM"'
    edits = [
        text.replace(f"kNumber = 3;\n  {rsam}", f"kNumber = 4;\n  {rsam}"),
        text.replace("DescentLooksamFull, DescentLooksamReuse>", "DescentLooksamFull>"),
        text.replace('kName = "LION"', 'kName = "LIONS"'),
    ]
    for edited in edits:
        assert edited != text, "the edit did not apply"
        assert header_functors(edited) != python, "not caught"


# ---------------------------------------------------------------------- the ABI number
def test_the_abi_version_is_the_header_s(tmp_path):
    """Python's ABI number is read from the header it ships with: its one definition."""
    found = re.search(r"constexpr\s+int64_t\s+kAbiVersion\s*=\s*(\d+)\s*;", HEADER.read_text())
    assert found is not None
    assert int(found[1]) == _extension.ABI_VERSION == _extension._abi_version()
    (tmp_path / HEADER.name).write_text(HEADER.read_text().replace(f"= {found[1]};", "= 99;"))
    assert _extension._abi_version(tmp_path) == 99
    assert _extension._abi_version(tmp_path / "missing") is None
