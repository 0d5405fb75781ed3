"""The Python mirror (agent/datapath/abi.py) against the compiled C, read from BTF.

bcc compiles bpf/bulkhead.c with debug info and loads the BTF clang emits with
the programs and their maps; the kernel hands it back by id (agent/datapath/btf.py
reads it). Every struct that crosses to userspace is some map's key or value
(a flow_events record is built in ev_scratch in the perf-buffer build), so that BTF, of the session's one
compile, is the layout the agent must agree with:

  - every ctypes Structure of abi.STRUCTS: same size, same field names in order,
    same offset, size and shape (array length, element size, nested struct) per field;
  - every struct of a map key or value of the loaded programs has a mirror;
  - every C enum mirrored by an IntEnum has the same members and values, both ways,
    by the rule <prefix>NAME -> Enum.NAME (ENUM_PREFIX below).

BTF has no enums and no struct that only local variables use (bh_meta): clang
emits types reachable from maps, globals and function signatures only. Those
come from abi_anchor.c, the ABI headers compiled alone by bcc with the same
cflags, each type anchored in a map value. A mismatch names struct and field, or
enum and member. #define constants never reach BTF: tests/unit/test_abi.py
checks those against the headers.
"""
from __future__ import annotations

import ctypes as C
import os
import re
from pathlib import Path

import pytest

from bulkhead.core.paths import BPF_DIR
from bulkhead.datapath import abi, btf, libbpf, loader

ANCHOR_C = Path(__file__).with_name("abi_anchor.c")
BCC_MAP_RECORD = "____btf_map_"
# C enum -> prefix of its members: BH_R_DENY_RULE is Reason.DENY_RULE.
ENUM_PREFIX = {"bh_action": "BH_ACT_", "bh_reason": "BH_R_", "bh_event": "BH_EV_", "bh_tail": "BH_TAIL_",
               "bh_flow_ev": "BH_FE_", "bh_lat": "BH_LAT_", "bh_reject_path": "BH_REJECT_",
               "bh_fab_kind": "BH_FAB_"}
# C enums of enums.h with no Python mirror, and why each may stay C-only.
C_ONLY_ENUMS: dict[str, str] = {}
# C structs of types.h with no Python mirror, and why each may stay C-only.
C_ONLY_STRUCTS: dict[str, str] = {}


def _defined(header: str, what: str) -> list[str]:
    """Names of the `what` (enum / struct) types `header` defines; only to anchor them (the
    layout and values come from the compiler), so comments need not be stripped."""
    text = (BPF_DIR / "include" / header).read_text()
    return sorted(set(re.findall(rf"^\s*{what}\s+(bh_\w+)\s*\{{", text, flags=re.M)))


HEADER_ENUMS = _defined("enums.h", "enum")
HEADER_STRUCTS = _defined("types.h", "struct")


class Compiled:
    """The BTF of the session's bulkhead.c object, and which types its maps carry."""

    def __init__(self, dp: loader.Datapath):
        map_ids: set[int] = set()
        btf_ids: set[int] = set()
        for fn in dp.fns.values():
            btf_ids.add(libbpf.prog_info(fn.fd).btf_id)
            map_ids.update(libbpf.prog_map_ids(fn.fd))
        map_ids.update(libbpf.map_info(fd).id for fd in dp.map_fds.values())
        self.maps: dict[str, tuple[int, int]] = {}  # map name -> (key type id, value type id)
        for map_id in map_ids:
            fd = libbpf.map_fd_by_id(map_id)
            try:
                info = libbpf.map_info(fd)
            finally:
                os.close(fd)
            if info.btf_id:
                btf_ids.add(info.btf_id)
                self.maps[info.name.decode()] = (info.btf_key_type_id, info.btf_value_type_id)
        # One compile, one BTF object: programs and maps share it.
        btf_ids.discard(0)
        assert btf_ids, "bcc loaded bulkhead.c without BTF: nothing to check the mirror against"
        assert len(btf_ids) == 1, f"more than one BTF object for one compile: {sorted(btf_ids)}"
        self.btf = btf.from_kernel(btf_ids.pop())
        # bcc records every map it declares as struct ____btf_map_<name> { key; value; }, also
        # the ones no program uses (ev_scratch only in the perf-buffer build).
        for t in self.btf.types[1:]:
            if t.kind == btf.STRUCT and t.name.startswith(BCC_MAP_RECORD):
                members = {name: type_id for name, type_id, _, _ in t.members}
                self.maps.setdefault(t.name[len(BCC_MAP_RECORD):], (members["key"], members["value"]))

    def crossing(self) -> dict[str, set[str]]:
        """struct name -> the maps whose key or value holds it (nested structs included)."""
        out: dict[str, set[str]] = {}

        def visit(type_id: int, where: str) -> None:
            t = self.btf.resolve(type_id)
            if t is None:
                return
            if t.kind == btf.ARRAY:
                visit(t.elem, where)
            elif t.kind in (btf.STRUCT, btf.UNION):
                out.setdefault(t.name or f"<anonymous in {where}>", set()).add(where)
                for _, mtype, _, _ in t.members:
                    visit(mtype, where)

        for name, (key, value) in self.maps.items():
            visit(key, name)
            visit(value, name)
        return out


@pytest.fixture(scope="session")
def compiled(xdp_session) -> Compiled:
    return Compiled(xdp_session.dp)


@pytest.fixture(scope="session")
def headers(xdp_session) -> btf.Btf:
    """BTF of abi_anchor.c: every enum of enums.h and struct of types.h, as bcc compiles them."""
    from bcc import BPF

    dp = xdp_session.dp
    anchors = [f"enum {n} e_{n};" for n in HEADER_ENUMS] + [f"struct {n} s_{n};" for n in HEADER_STRUCTS]
    b = BPF(src_file=str(ANCHOR_C).encode(),
            cflags=loader.cflags(dp.pin_dir / "maps", dp.sizes) + [f"-D{d}" for d in dp.defines]
            + ["-DBH_ABI_ANCHORS=" + " ".join(anchors)])
    try:
        info = libbpf.map_info(b.get_table(b"abi_anchor").map_fd)
        assert info.btf_id, "bcc loaded abi_anchor.c without BTF"
        return btf.from_kernel(info.btf_id)
    finally:
        b.cleanup()


def _layout_of(c_name: str, compiled: Compiled, headers: btf.Btf) -> btf.Btf:
    """The BTF to check `c_name` against: the session's object where it has the struct."""
    return compiled.btf if compiled.btf.struct(c_name) is not None else headers


def _report(problems: list[str]) -> str:
    return "the Python mirror differs from the compiled C:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------- structs
@pytest.mark.parametrize("c_name", sorted(abi.STRUCTS))
def test_struct_mirror_matches_the_compiled_layout(c_name, compiled, headers):
    b = _layout_of(c_name, compiled, headers)
    problems = btf.mirror_problems(b, c_name, abi.STRUCTS[c_name], abi.STRUCTS)
    assert not problems, _report(problems)


def test_every_struct_crossing_to_userspace_is_mirrored(compiled):
    crossing = compiled.crossing()
    # Guard against a reader that finds nothing: the flow tables cross, for one.
    assert {"bh_flow", "bh_flow4_key", "bh_flow_event"} <= set(crossing), sorted(crossing)
    missing = [f"struct {n} (in map {', '.join(sorted(maps))}) has no mirror in abi.STRUCTS"
               for n, maps in sorted(crossing.items()) if n not in abi.STRUCTS]
    assert not missing, _report(missing)


def test_every_header_struct_is_mirrored(compiled, headers):
    c_side = {n for n in headers.names(btf.STRUCT) if n.startswith("bh_")} - {"bh_abi_anchor"}
    assert "bh_meta" in c_side, "abi_anchor.c did not anchor types.h"
    problems = [f"struct {n} (types.h) has no mirror in abi.STRUCTS"
                for n in sorted(c_side - set(abi.STRUCTS) - set(C_ONLY_STRUCTS))]
    problems += [f"abi.STRUCTS names {n}, which the compiled C does not define" for n in sorted(abi.STRUCTS)
                 if headers.struct(n) is None and compiled.btf.struct(n) is None]
    problems += [f"C_ONLY_STRUCTS names {n}, which types.h does not define" for n in sorted(set(C_ONLY_STRUCTS) - c_side)]
    assert not problems, _report(problems)


def test_the_anchored_structs_are_the_compiled_ones(compiled, headers):
    """abi_anchor.c compiles the headers as bulkhead.c does: where both have a struct, same layout."""
    both = sorted(n for n in abi.STRUCTS if compiled.btf.struct(n) is not None)
    assert len(both) >= 10, both
    assert [n for n in both if compiled.btf.struct(n) != headers.struct(n)] == []


@pytest.mark.parametrize("c_name", sorted(abi.STRUCTS))
def test_struct_has_no_implicit_padding(c_name, compiled, headers):
    """Padding is explicit (STYLE.md convention 1): a hole is where map keys hash garbage."""
    problems = btf.implicit_padding(_layout_of(c_name, compiled, headers), c_name)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- enums
def test_every_enum_is_mirrored(headers):
    c_side = {n for n in headers.names(btf.ENUM) | headers.names(btf.ENUM64) if n.startswith("bh_")}
    assert {"bh_reason", "bh_action"} <= c_side, "abi_anchor.c did not anchor enums.h"
    problems = [f"enum {n} (enums.h) has no IntEnum in abi.ENUMS"
                for n in sorted(c_side - set(abi.ENUMS) - set(C_ONLY_ENUMS))]
    problems += [f"abi.ENUMS names {n}, which the compiled C does not define" for n in sorted(set(abi.ENUMS) - c_side)]
    problems += [f"abi.ENUMS[{n!r}] has no member prefix in ENUM_PREFIX (tests/bpf/test_abi_btf.py)"
                 for n in sorted(set(abi.ENUMS) - set(ENUM_PREFIX))]
    # The two tables must not outlive the enums they name.
    problems += [f"ENUM_PREFIX names {n}, which abi.ENUMS does not mirror" for n in sorted(set(ENUM_PREFIX) - set(abi.ENUMS))]
    problems += [f"C_ONLY_ENUMS names {n}, which enums.h does not define" for n in sorted(set(C_ONLY_ENUMS) - c_side)]
    assert not problems, _report(problems)


@pytest.mark.parametrize("c_name", sorted(abi.ENUMS))
def test_enum_mirror_matches_the_compiled_values(c_name, headers):
    values = headers.enum(c_name)
    assert values is not None, f"the compiled C has no enum {c_name}"
    problems = btf.enum_problems(c_name, values, ENUM_PREFIX.get(c_name, "?"), abi.ENUMS[c_name])
    assert not problems, _report(problems)


def test_enum_values_fit_the_fields_that_carry_them(compiled, headers):
    """Reasons and actions are stored in __u8 fields of flow entries and events."""
    b = compiled.btf
    for c_struct, field, c_enum in (("bh_flow", "reason", "bh_reason"), ("bh_flow_event", "reason", "bh_reason"),
                                    ("bh_flow", "action", "bh_action"), ("bh_policy_val", "action", "bh_action"),
                                    ("bh_lat_key", "kind", "bh_lat"), ("bh_flow_event", "kind", "bh_flow_ev")):
        size = next(m.size for m in b.struct(c_struct).members if m.name == field)
        biggest = max(headers.enum(c_enum).values())
        assert biggest < 1 << (8 * size), f"{c_enum} value {biggest} does not fit {c_struct}.{field} ({size} bytes)"


# ----------------------------------------------------------- the checker
def _broken(b: btf.Btf, c_name: str, fields: list, name: str) -> list[str]:
    """What a mirror with `fields` adds to the problems of the real one (none, while in sync)."""
    real = btf.mirror_problems(b, c_name, abi.STRUCTS[c_name], abi.STRUCTS)
    broken = type(name, (C.Structure,), {"_fields_": fields})
    return [p for p in btf.mirror_problems(b, c_name, broken, abi.STRUCTS) if p not in real]


def test_the_checker_names_a_field_the_mirror_lacks(compiled):
    b = compiled.btf
    assert _broken(b, "bh_ctl", abi.Ctl._fields_[:-1], "CtlShort") == [
        "bh_ctl: size 8 in C, 4 in Python (CtlShort)",
        "bh_ctl.flags: in C (__u32 at offset 4, size 4), not in Python CtlShort"]
    # ctypes rounds a size up to the alignment: without its last field a mirror may keep its
    # size (bh_flow does), so only the name tells.
    last = b.struct("bh_flow").members[-1]
    assert f"bh_flow.{last.name}: in C ({last.type} at offset {last.offset}, size {last.size}), " \
           "not in Python FlowShort" in _broken(b, "bh_flow", abi.Flow._fields_[:-1], "FlowShort")
    # A field only Python has fails by name as well.
    assert _broken(b, "bh_lat_val", abi.LatVal._fields_ + [("extra", C.c_uint32)], "LatValLong") == [
        "bh_lat_val: size 16 in C, 24 in Python (LatValLong)",
        "bh_lat_val.extra: in Python LatValLong (offset 16, size 4), not in C"]


def test_the_checker_names_a_moved_or_reshaped_field(compiled):
    """Same size, same names: a u8[1] where C has a u8, and two fields swapped, still fail."""
    b = compiled.btf
    fields = [("reason", C.c_uint8 * 1) if n == "reason" else (n, t) for n, t in abi.PairKey._fields_]
    assert _broken(b, "bh_pair_key", fields, "PairKeyReshaped") == [
        "bh_pair_key.reason: 1-byte integer in C (__u8), 1-byte integer[1] in Python"]
    assert _broken(b, "bh_lat_val", abi.LatVal._fields_[::-1], "LatValSwapped") == [
        "bh_lat_val: fields in another order: C ['count', 'sum_units'], Python ['sum_units', 'count']",
        "bh_lat_val.count: offset 0, size 8 in C; offset 8, size 8 in Python",
        "bh_lat_val.sum_units: offset 8, size 8 in C; offset 0, size 8 in Python"]


def test_the_checker_names_an_enum_member_on_one_side(headers):
    import enum

    values = dict(headers.enum("bh_lat"), BH_LAT_NEW_KIND=9)
    fewer = enum.IntEnum("Lat", {e.name: e.value for e in abi.Lat if e.name != "CLIENT_RTT"})
    assert btf.enum_problems("bh_lat", values, "BH_LAT_", fewer) == [
        "bh_lat: BH_LAT_CLIENT_RTT = 1 in C, no Lat.CLIENT_RTT in Python",
        "bh_lat: BH_LAT_NEW_KIND = 9 in C, no Lat.NEW_KIND in Python"]
    moved = enum.IntEnum("Lat", {e.name: e.value + (e.name == "SERVER_TIME") for e in abi.Lat})
    assert btf.enum_problems("bh_lat", headers.enum("bh_lat"), "BH_LAT_", moved) == [
        "bh_lat: BH_LAT_SERVER_TIME = 2 in C, Lat.SERVER_TIME = 3 in Python"]
    more = enum.IntEnum("Lat", {**{e.name: e.value for e in abi.Lat}, "GONE": 7})
    assert btf.enum_problems("bh_lat", headers.enum("bh_lat"), "BH_LAT_", more) == [
        "bh_lat: Lat.GONE = 7 in Python, no BH_LAT_GONE in C"]
