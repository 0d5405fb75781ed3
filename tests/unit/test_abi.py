"""The C headers and their Python mirror (agent/datapath/abi.py) must not drift.

Parses bpf/include/{enums,types,consts}.h with a small regex parser (no
compiler, no root, no bcc) and checks, both ways:
  - every enum of enums.h: member names and values == the IntEnum's
  - every struct of types.h: field names in order, C type and array length
    of each field == the ctypes field's size, offsets, total size, the
    _Static_assert sizes, and no implicit padding (STYLE.md convention 1)
  - every `#define BH_<name> <number>` == abi.<name> (map sizes: abi.DEFAULT_SIZES)
A field or value added on one side only fails here.
"""
from __future__ import annotations

import ctypes as C
import re
from pathlib import Path

import pytest

from bulkhead.datapath import abi, loader

INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"

C_TYPES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__s8": 1, "__s16": 2, "__s32": 4, "__s64": 8}

# Enum member prefix -> IntEnum, per C enum.
ENUM_PREFIX = {"bh_action": "BH_ACT_", "bh_reason": "BH_R_", "bh_event": "BH_EV_", "bh_tail": "BH_TAIL_",
               "bh_flow_ev": "BH_FE_", "bh_lat": "BH_LAT_", "bh_reject_path": "BH_REJECT_"}
# C enums with no Python mirror, and why each may stay C-only.
C_ONLY_ENUMS: set[str] = set()
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


def _int(literal: str) -> int:
    return int(literal.rstrip("ULul"), 0)


def parse_enums(text: str) -> dict[str, dict[str, int]]:
    """enum name -> {member: value}; every member must carry an explicit value."""
    enums = {}
    for name, body in re.findall(r"\benum\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.S):
        members = {}
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            m = re.fullmatch(r"(\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", item)
            assert m, f"enum {name}: cannot parse member {item!r} (append-only enums need explicit values)"
            assert m.group(1) not in members, f"enum {name}: {m.group(1)} twice"
            members[m.group(1)] = _int(m.group(2))
        enums[name] = members
    return enums


def parse_structs(text: str, defines: dict[str, int] | None = None) -> dict[str, list[tuple[str, str, int]]]:
    """struct name -> [(field, C type, array length or 0)] in declaration order.

    Array lengths may be integer literals or BH_ names from `defines`."""
    structs = {}
    for name, body in re.findall(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.S):
        fields = []
        for decl in (d.strip() for d in body.split(";")):
            if not decl:
                continue
            m = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?", decl)
            assert m, f"struct {name}: cannot parse field {decl!r}"
            ctype, field, length = m.groups()
            assert ctype in C_TYPES, f"struct {name}.{field}: type {ctype} is not a fixed-width integer"
            if length and length in (defines or {}):
                length = str(defines[length])
            fields.append((field, ctype, _int(length) if length else 0))
        structs[name] = fields
    return structs


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


def parse_static_asserts(text: str) -> dict[str, int]:
    return {n: int(v) for n, v in re.findall(r"_Static_assert\(\s*sizeof\(struct\s+(\w+)\)\s*==\s*(\d+)", text)}


def c_layout(fields) -> tuple[list[tuple[str, int, int]], int]:
    """Natural-alignment layout as clang lays it out for BPF: [(field, offset, size)], total size."""
    off, align_max, out = 0, 1, []
    for field, ctype, length in fields:
        size = C_TYPES[ctype]
        off = (off + size - 1) // size * size
        total = size * (length or 1)
        out.append((field, off, total))
        off += total
        align_max = max(align_max, size)
    return out, (off + align_max - 1) // align_max * align_max


ENUMS = parse_enums(_read("enums.h"))
DEFINES: dict[str, int] = {}
for _h in ("consts.h", "types.h", "enums.h"):  # in include order: later values may use earlier names
    DEFINES.update(parse_defines(_read(_h), DEFINES))
STRUCTS = parse_structs(_read("types.h"), DEFINES)
ASSERTS = parse_static_asserts(_read("types.h"))


# ------------------------------------------------------------------ parser
def test_parser_sees_the_headers():
    """Guard against a parser that silently matches nothing."""
    assert {"bh_action", "bh_reason", "bh_event"} <= set(ENUMS)
    assert len(STRUCTS) >= 10 and len(DEFINES) >= 15 and len(ASSERTS) >= 10


def test_parser_rejects_what_it_cannot_read():
    with pytest.raises(AssertionError):
        parse_structs("struct bh_x { struct other o; };")
    with pytest.raises(AssertionError):
        parse_structs("struct bh_x { int x; };")
    with pytest.raises(AssertionError):
        parse_enums("enum bh_x { BH_X_A, BH_X_B = 1 };")
    assert parse_structs(_strip_comments("struct bh_x { __u8 a; /* x */ __u16 b_be; __u8 pad[3]; };")) == {
        "bh_x": [("a", "__u8", 0), ("b_be", "__u16", 0), ("pad", "__u8", 3)]
    }
    assert c_layout(parse_structs("struct s { __u8 a; __u32 b; __u16 c; };")["s"]) == (
        [("a", 0, 1), ("b", 4, 4), ("c", 8, 2)], 12)
    assert parse_defines("#define BH_A 0xFFU\n#ifndef BH_B\n#define BH_B (BH_A + 2)\n#endif\n"
                         "#define BH_H_\n#define BH_P \"/x\"\n") == {"BH_A": 255, "BH_B": 257}
    with pytest.raises(AssertionError):
        parse_defines("#define BH_A (OTHER + 1)")


# ------------------------------------------------------------------- enums
def test_every_enum_is_mirrored():
    assert set(ENUMS) == set(abi.ENUMS) | C_ONLY_ENUMS
    assert set(ENUM_PREFIX) == set(abi.ENUMS)


@pytest.mark.parametrize("c_name", sorted(ENUM_PREFIX))
def test_enum_members_match(c_name):
    prefix = ENUM_PREFIX[c_name]
    members = ENUMS[c_name]
    assert all(m.startswith(prefix) for m in members), f"{c_name}: a member lacks prefix {prefix}"
    c_side = {m[len(prefix):]: v for m, v in members.items()}
    py_side = {e.name: int(e.value) for e in abi.ENUMS[c_name]}
    assert c_side == py_side
    assert len(set(c_side.values())) == len(c_side), f"{c_name}: a value is used twice"


def test_enum_values_fit_their_arrays():
    assert max(abi.Reason) < DEFINES["BH_REASON_MAX"]
    assert max(abi.Event) < DEFINES["BH_EVENT_MAX"]
    assert max(abi.Reason) <= 0xFF, "bh_flow.reason and bh_frag.reason are __u8"
    assert max(abi.Action) <= 0xFF, "bh_policy_val.action is __u8"


def test_every_reason_has_a_verdict_class():
    assert set(abi.REASON_VERDICT) == set(abi.Reason)


def test_tail_slots_match_loader():
    """Every bh_tail slot gets a program from the loader, within BH_TAIL_MAX."""
    assert set(loader.TAIL_PROGS) == set(abi.Tail)
    assert all(0 <= t < DEFINES["BH_TAIL_MAX"] for t in abi.Tail)
    assert loader.map_specs(abi.DEFAULT_SIZES)["tails"][3] == DEFINES["BH_TAIL_MAX"]


# ----------------------------------------------------------------- structs
def test_every_struct_is_mirrored():
    assert set(STRUCTS) == set(abi.STRUCTS)


@pytest.mark.parametrize("c_name", sorted(abi.STRUCTS))
def test_struct_layout_matches(c_name):
    mirror = abi.STRUCTS[c_name]
    c_fields = STRUCTS[c_name]
    py_fields = mirror._fields_
    assert [f[0] for f in py_fields] == [f[0] for f in c_fields], "field names / order"
    for (name, ctype, length), (_, pytype) in zip(c_fields, py_fields):
        if length:
            assert issubclass(pytype, C.Array), f"{name}: C array, ctypes scalar"
            assert (pytype._length_, C.sizeof(pytype._type_)) == (length, C_TYPES[ctype]), name
        else:
            assert not issubclass(pytype, C.Array), f"{name}: C scalar, ctypes array"
            assert C.sizeof(pytype) == C_TYPES[ctype], f"{name}: {ctype} vs {pytype.__name__}"
    layout, size = c_layout(c_fields)
    assert [(n, getattr(mirror, n).offset, getattr(mirror, n).size) for n, _, _ in layout] == layout
    assert C.sizeof(mirror) == size


@pytest.mark.parametrize("c_name", sorted(abi.STRUCTS))
def test_struct_has_no_implicit_padding(c_name):
    layout, size = c_layout(STRUCTS[c_name])
    assert sum(s for _, _, s in layout) == size, "add an explicit pad field"


def test_static_asserts_agree():
    for c_name, size in ASSERTS.items():
        assert c_layout(STRUCTS[c_name])[1] == size, c_name
        assert C.sizeof(abi.STRUCTS[c_name]) == size, c_name


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
    """The loader's expected map value sizes come from the mirror (checked against C above)."""
    specs = loader.map_specs(abi.DEFAULT_SIZES)
    assert specs["stats"][2:] == (C.sizeof(abi.Counter), DEFINES["BH_REASON_MAX"])
    assert specs["events"][3] == DEFINES["BH_EVENT_MAX"]
    assert specs["slot_cfg"][3] == DEFINES["BH_NUM_SLOTS"]
