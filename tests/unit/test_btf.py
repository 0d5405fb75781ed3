"""agent/datapath/btf.py: the BTF reader, on hand-made blobs and on the running kernel's own BTF.

No root: /sys/kernel/btf/vmlinux is world-readable. tests/bpf/test_abi_btf.py uses the
reader on the loaded datapath.
"""
from __future__ import annotations

import ctypes as C
import enum
import struct
from pathlib import Path

import pytest

from bulkhead.datapath import btf

VMLINUX = Path("/sys/kernel/btf/vmlinux")


class Blob:
    """Builds a little-endian BTF blob type by type (ids from 1, in call order)."""

    def __init__(self):
        self.types = b""
        self.strings = b"\0"
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, word3: int, extra: bytes = b"", vlen: int = 0, kind_flag: int = 0) -> int:
        info = kind_flag << 31 | kind << 24 | vlen
        self.types += struct.pack("<III", self.s(name), info, word3) + extra
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int) -> int:
        return self.add(btf.INT, name, size, struct.pack("<I", size * 8))

    def struct_(self, name: str, size: int, members, kind_flag: int = 0) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(btf.STRUCT, name, size, extra, vlen=len(members), kind_flag=kind_flag)

    def raw(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def sample() -> Blob:
    b = Blob()
    u8 = b.int_("unsigned char", 1)  # 1
    u32 = b.int_("unsigned int", 4)  # 2
    t_u8 = b.add(btf.TYPEDEF, "__u8", u8)  # 3
    t_u32 = b.add(btf.TYPEDEF, "__u32", u32)  # 4
    c_u32 = b.add(btf.CONST, "", t_u32)  # 5
    idx = b.int_("int", 4)  # 6
    arr = b.add(btf.ARRAY, "", 0, struct.pack("<III", t_u8, idx, 6))  # 7: __u8[6]
    inner = b.struct_("inner", 4, [("v", c_u32, 0)])  # 8
    b.struct_("outer", 16, [("a", t_u8, 0), ("b", arr, 8), ("in", inner, 64), ("tail", t_u32, 96)])  # 9
    b.add(btf.ENUM, "colour", 4, struct.pack("<IIII", b.s("RED"), 1, b.s("BLUE"), 7), vlen=2)  # 10
    b.add(btf.ENUM, "sign", 4, struct.pack("<II", b.s("MINUS"), 0xFFFFFFFF), vlen=1, kind_flag=1)  # 11
    b.add(btf.ENUM64, "big", 8, struct.pack("<III", b.s("HUGE"), 2, 1), vlen=1)  # 12
    # bitfields: kind_flag set, offset word = bit size << 24 | bit offset
    b.struct_("bits", 4, [("lo", t_u32, 4 << 24 | 0), ("hi", t_u32, 12 << 24 | 4)], kind_flag=1)  # 13
    b.add(btf.PTR, "", inner)  # 14
    b.add(btf.FUNC_PROTO, "", t_u32, struct.pack("<II", 0, t_u32), vlen=1)  # 15
    return b


def test_structs_resolve_typedefs_qualifiers_and_arrays():
    b = btf.parse(sample().raw())
    outer = b.struct("outer")
    assert (outer.size, [(m.name, m.offset, m.size, m.type) for m in outer.members]) == (16, [
        ("a", 0, 1, "__u8"), ("b", 1, 6, "__u8[6]"), ("in", 8, 4, "struct inner"), ("tail", 12, 4, "__u32")])
    assert b.struct("inner").members[0].type == "__u32"  # const dropped, typedef kept
    assert b.resolve(5).name == "unsigned int"
    assert b.struct("nothing") is None and b.enum("nothing") is None
    assert {"inner", "outer", "bits"} == b.names(btf.STRUCT)


def test_enums_keep_their_sign_and_width():
    b = btf.parse(sample().raw())
    assert b.enums() == {"colour": {"RED": 1, "BLUE": 7}, "sign": {"MINUS": -1}, "big": {"HUGE": 1 << 32 | 2}}


def test_bitfields_carry_bit_offsets():
    m = btf.parse(sample().raw()).struct("bits").members
    assert [(x.name, x.bit_offset, x.bit_size, x.offset, x.size) for x in m] == [
        ("lo", 0, 4, 0, 1), ("hi", 4, 12, 0, 2)]


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\0\0" + raw[2:], "bad magic"),
    (lambda raw: raw[:30], "past the end"),
    (lambda raw: raw[:8], "shorter than a BTF header"),
])
def test_malformed_blobs_are_refused(damage, message):
    with pytest.raises(btf.BtfError, match=message):
        btf.parse(damage(sample().raw()))


def test_an_unknown_kind_is_refused():
    b = Blob()
    b.add(31, "future", 0)
    with pytest.raises(btf.BtfError, match="unknown kind 31"):
        btf.parse(b.raw())


def test_mirror_and_enum_checks_name_what_differs():
    b = btf.parse(sample().raw())

    class Inner(C.Structure):
        _fields_ = [("v", C.c_uint32)]

    class Outer(C.Structure):
        _fields_ = [("a", C.c_uint8), ("b", C.c_uint8 * 6), ("in", Inner), ("tail", C.c_uint32)]

    mirrors = {"inner": Inner, "outer": Outer}
    assert btf.mirror_problems(b, "outer", Outer, mirrors) == []

    class OuterWrong(C.Structure):
        _fields_ = [("a", C.c_uint8), ("b", C.c_uint8 * 5), ("pad", C.c_uint8), ("in", C.c_uint32),
                    ("tail", C.c_uint32)]

    assert btf.mirror_problems(b, "outer", OuterWrong, mirrors) == [
        "outer.pad: in Python OuterWrong (offset 6, size 1), not in C",
        "outer.b: offset 1, size 6 in C; offset 1, size 5 in Python",
        "outer.b: 1-byte integer[6] in C (__u8[6]), 1-byte integer[5] in Python",
        "outer.in: struct inner in C (struct inner), 4-byte integer in Python"]
    assert btf.mirror_problems(b, "missing", Outer, mirrors) == [
        "missing: mirrored by Outer, but the compiled C has no struct missing"]
    assert btf.implicit_padding(b, "outer") == ["outer: 1 bytes of implicit padding before in (offset 7)"]

    Colour = enum.IntEnum("Colour", {"RED": 1, "GREEN": 2})
    assert btf.enum_problems("colour", {"C_RED": 1, "C_BLUE": 7, "X": 0}, "C_", Colour) == [
        "colour: C_BLUE = 7 in C, no Colour.BLUE in Python",
        "colour: X lacks the prefix C_ its mirror Colour is named by",
        "colour: Colour.GREEN = 2 in Python, no C_GREEN in C"]


@pytest.mark.skipif(not VMLINUX.exists(), reason="kernel built without CONFIG_DEBUG_INFO_BTF")
def test_the_kernels_own_btf():
    """The running kernel's BTF: uapi types whose layout is fixed."""
    b = btf.parse(VMLINUX.read_bytes())
    assert b.enum("xdp_action") == {"XDP_ABORTED": 0, "XDP_DROP": 1, "XDP_PASS": 2, "XDP_TX": 3, "XDP_REDIRECT": 4}
    eth = b.struct("ethhdr")
    assert (eth.size, [(m.name, m.offset, m.size) for m in eth.members]) == (
        14, [("h_dest", 0, 6), ("h_source", 6, 6), ("h_proto", 12, 2)])
    ip = {m.name: m for m in b.struct("iphdr").members}
    assert (ip["ihl"].bit_size, ip["version"].bit_size, ip["ttl"].offset, ip["protocol"].offset) == (4, 4, 8, 9)
    assert b.struct("iphdr").size == 20
