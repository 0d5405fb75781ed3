"""The #define constants of the C headers and their Python mirror (agent/datapath/abi.py).

Structs and enums are checked against the compiled object's BTF by
tests/bpf/test_abi_btf.py (root: bcc loads it). Constants never reach BTF, so
this test reads bpf/include/{consts,types,enums}.h with a small regex parser
(no compiler, no root, no bcc):
  - every `#define BH_<name> <number>` == abi.<name> (map sizes: abi.DEFAULT_SIZES),
    and every int constant of abi.py is defined in C
  - the loader's map specs and tail slots follow those constants
A constant added on one side only fails here.
"""
from __future__ import annotations

import ctypes as C
import re
from pathlib import Path

import pytest

from bulkhead.datapath import abi, loader

INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"

# Constants with no abi.py mirror, and why each may stay C-only.
C_ONLY_DEFINES = {
    "BH_FLOW_IDLE_NS": "collision freshness, used only by the data path",
    "BH_FRAG_IDLE_NS": "fragment verdict lifetime, used only by the data path",
    "BH_TAIL_MAX": "checked against loader.map_specs() below",
}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _read(name: str) -> str:
    return _strip_comments((INCLUDE / name).read_text())


def parse_defines(text: str, known: dict[str, int] | None = None) -> dict[str, int]:
    """`#define BH_X <value>` (also inside #ifndef guards) -> int; valueless guards are skipped.

    A value is an integer literal or an arithmetic expression of literals and
    BH_ names defined earlier (in `known` or this text), e.g. `(BH_SEG_BITS + 128)`.
    """
    out = dict(known or {})
    for name, value in re.findall(r"^[ \t]*#[ \t]*define[ \t]+(BH_\w+)[ \t]+(\S[^\n]*?)[ \t]*$", text, flags=re.M):
        if value.startswith('"'):
            continue  # strings (paths) are not numbers
        out[name] = _eval(value, out, name)
    return {k: v for k, v in out.items() if k not in (known or {})}


_EXPR = re.compile(r"[\sA-Za-z0-9_()+\-*/<>|&~]+")


def _eval(expr: str, names: dict[str, int], what: str) -> int:
    assert _EXPR.fullmatch(expr), f"{what}: cannot read value {expr!r}"
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", lambda m: str(int(m.group(1), 0)), expr)
    expr = re.sub(r"\b(BH_\w+)\b", lambda m: str(names[m.group(1)]) if m.group(1) in names else m.group(1), expr)
    assert not re.search(r"[A-Za-z_]", expr), f"{what}: unknown name in {expr!r}"
    return int(eval(expr.replace("/", "//"), {"__builtins__": {}}))  # decimal digits and operators only


DEFINES: dict[str, int] = {}
for _h in ("consts.h", "types.h", "enums.h"):  # in include order: later values may use earlier names
    DEFINES.update(parse_defines(_read(_h), DEFINES))


# ------------------------------------------------------------------ parser
def test_parser_sees_the_headers():
    """Guard against a parser that silently matches nothing."""
    assert len(DEFINES) >= 15 and {"BH_REASON_MAX", "BH_META_MAGIC", "BH_SNI_LOG_LEN"} <= set(DEFINES)


def test_parser_reads_what_the_headers_write():
    assert parse_defines("#define BH_A 0xFFU\n#ifndef BH_B\n#define BH_B (BH_A + 2)\n#endif\n"
                         "#define BH_H_\n#define BH_P \"/x\"\n") == {"BH_A": 255, "BH_B": 257}
    assert parse_defines(_strip_comments("#define BH_A 4 /* four */\n#define BH_B (BH_A * 2) // eight\n")) == {
        "BH_A": 4, "BH_B": 8}
    with pytest.raises(AssertionError):
        parse_defines("#define BH_A (OTHER + 1)")


# ------------------------------------------------------------------- enums
def test_enum_values_fit_their_arrays():
    assert max(abi.Reason) < DEFINES["BH_REASON_MAX"]
    assert max(abi.Event) < DEFINES["BH_EVENT_MAX"]


def test_every_reason_has_a_verdict_class():
    assert set(abi.REASON_VERDICT) == set(abi.Reason)


def test_tail_slots_match_loader():
    """Every bh_tail slot gets a program from the loader, within BH_TAIL_MAX."""
    assert set(loader.TAIL_PROGS) == set(abi.Tail)
    assert all(0 <= t < DEFINES["BH_TAIL_MAX"] for t in abi.Tail)
    assert loader.map_specs(abi.DEFAULT_SIZES)["tails"][3] == DEFINES["BH_TAIL_MAX"]


# --------------------------------------------------------------- constants
def _mirror_of(define: str):
    if define in abi.DEFAULT_SIZES:
        return abi.DEFAULT_SIZES[define]
    return getattr(abi, define.removeprefix("BH_"), None)


@pytest.mark.parametrize("define", sorted(set(DEFINES) - set(C_ONLY_DEFINES)))
def test_define_matches(define):
    assert _mirror_of(define) == DEFINES[define]


def test_c_only_defines_exist():
    """The exemption list must not outlive the constants it names."""
    assert set(C_ONLY_DEFINES) <= set(DEFINES)


def test_every_python_constant_is_in_c():
    py_consts = {n for n, v in vars(abi).items() if n.isupper() and type(v) is int}
    assert {f"BH_{n}" for n in py_consts} <= set(DEFINES)
    assert set(abi.DEFAULT_SIZES) <= set(DEFINES)


def test_loader_map_sizes_follow_the_mirror():
    """The loader's expected map value sizes come from the mirror (checked against the compiled
    C by tests/bpf/test_abi_btf.py)."""
    specs = loader.map_specs(abi.DEFAULT_SIZES)
    assert specs["stats"][2:] == (C.sizeof(abi.Counter), DEFINES["BH_REASON_MAX"])
    assert specs["events"][3] == DEFINES["BH_EVENT_MAX"]
    assert specs["slot_cfg"][3] == DEFINES["BH_NUM_SLOTS"]
