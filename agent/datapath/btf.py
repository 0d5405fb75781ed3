"""A small reader of BTF, the kernel's type format (Documentation/bpf/btf.rst).

bcc compiles bpf/bulkhead.c with debug info and loads the BTF clang emits
along with the programs and their maps; the kernel keeps it and hands it back
by id (libbpf.btf_raw). That BTF is the compiled layout of every type a map
carries, which the Python mirror (abi.py) must match: mirror_problems and
enum_problems say how they differ, by name (tests/bpf/test_abi_btf.py).
clang emits only types reachable from maps, globals and function signatures:
no enums, no struct only local variables use.

Only what that check needs: structs and unions (members with bit offsets and
sizes), enums (names and values), arrays, and typedef / const / volatile
chains resolved to what they name. Other kinds are kept by kind and name.
"""
from __future__ import annotations

import ctypes as C
import dataclasses
import struct as _struct

MAGIC = 0xEB9F

# enum btf_kind (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
# Kinds that only qualify or rename another type: resolved through.
_ALIASES = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# Kinds whose third word is a size in bytes (the others: a type id).
_SIZED = {INT, STRUCT, UNION, ENUM, FLOAT, DATASEC, ENUM64}


class BtfError(ValueError):
    pass


@dataclasses.dataclass
class Type:
    id: int
    kind: int
    name: str
    size: int = 0  # bytes, for sized kinds
    ref: int = 0  # the type id named by a pointer, alias, var, func
    members: list = dataclasses.field(default_factory=list)  # struct/union: [(name, type id, bit offset, bit size)]
    values: dict = dataclasses.field(default_factory=dict)  # enum: {name: value}
    elem: int = 0  # array: element type id
    nelems: int = 0  # array: element count


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    offset: int  # bytes from the start of the struct
    size: int  # bytes (a bitfield: the bytes its bits span, see bit_size)
    bit_offset: int
    bit_size: int  # 0 unless a bitfield
    type: str  # the resolved type, C-spelled: "__u8[16]", "struct bh_x", "__u32"


@dataclasses.dataclass(frozen=True)
class Struct:
    name: str
    size: int
    members: tuple[Member, ...]
    union: bool = False


class Btf:
    """The types of one BTF blob, by id (id 0 is void)."""

    def __init__(self, types: list[Type]):
        self.types = types
        self._named: dict[tuple[int, str], Type] = {}
        for t in types[1:]:
            self._named.setdefault((t.kind, t.name), t)  # the first of a name, as C would see it

    # ------------------------------------------------------------ lookup
    def named(self, kind: int, name: str) -> Type | None:
        return self._named.get((kind, name))

    def names(self, kind: int) -> set[str]:
        return {t.name for t in self.types if t is not None and t.kind == kind and t.name}

    def resolve(self, type_id: int) -> Type | None:
        """The type `type_id` names once typedefs and qualifiers are stripped (None: void)."""
        for _ in range(64):  # a chain longer than this is a loop in malformed BTF
            if type_id == 0:
                return None
            t = self.types[type_id]
            if t.kind not in _ALIASES:
                return t
            type_id = t.ref
        raise BtfError(f"type {type_id}: alias chain does not end")

    def sizeof(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t is None:
            return 0
        if t.kind == ARRAY:
            return t.nelems * self.sizeof(t.elem)
        if t.kind == PTR:
            return 8
        if t.kind in _SIZED:
            return t.size
        raise BtfError(f"type {t.id} ({t.name or 'anonymous'}): kind {t.kind} has no size")

    def spell(self, type_id: int) -> str:
        """A C spelling of a type, keeping the first typedef name (`__u32`, not `unsigned int`)."""
        if type_id == 0:
            return "void"
        t = self.types[type_id]
        if t.kind == TYPEDEF:
            return t.name
        if t.kind in _ALIASES:
            return self.spell(t.ref)
        if t.kind == ARRAY:
            return f"{self.spell(t.elem)}[{t.nelems}]"
        if t.kind == PTR:
            return self.spell(t.ref) + " *"
        prefix = {STRUCT: "struct ", UNION: "union ", ENUM: "enum ", ENUM64: "enum ", FWD: "struct "}.get(t.kind, "")
        return prefix + (t.name or "<anonymous>")

    def struct(self, name: str) -> Struct | None:
        """struct (or union) `name` with its members' byte offsets and sizes."""
        t = self.named(STRUCT, name) or self.named(UNION, name)
        if t is None:
            return None
        members = []
        for mname, mtype, bit_off, bit_size in t.members:
            if bit_size:
                size = (bit_off + bit_size + 7) // 8 - bit_off // 8
            else:
                size = self.sizeof(mtype)
            members.append(Member(mname, bit_off // 8, size, bit_off, bit_size, self.spell(mtype)))
        return Struct(name, t.size, tuple(members), union=t.kind == UNION)

    def structs(self) -> dict[str, Struct]:
        return {n: self.struct(n) for n in self.names(STRUCT) | self.names(UNION)}

    def enum(self, name: str) -> dict[str, int] | None:
        t = self.named(ENUM, name) or self.named(ENUM64, name)
        return None if t is None else dict(t.values)

    def enums(self) -> dict[str, dict[str, int]]:
        return {n: self.enum(n) for n in self.names(ENUM) | self.names(ENUM64)}


def parse(raw: bytes) -> Btf:
    """Parse a BTF blob (as the kernel hands it back, or an object's .BTF section)."""
    if len(raw) < 24:
        raise BtfError("shorter than a BTF header")
    magic = _struct.unpack_from("<H", raw)[0]
    if magic == MAGIC:
        e = "<"
    elif magic == _struct.unpack(">H", _struct.pack("<H", MAGIC))[0]:
        e = ">"
    else:
        raise BtfError(f"bad magic {magic:#x}")
    _magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _struct.unpack_from(e + "HBBIIIII", raw)
    types_raw = raw[hdr_len + type_off: hdr_len + type_off + type_len]
    strings = raw[hdr_len + str_off: hdr_len + str_off + str_len]
    if len(types_raw) != type_len or len(strings) != str_len:
        raise BtfError("type or string section runs past the end")

    def string(off: int) -> str:
        end = strings.find(b"\0", off)
        if off >= len(strings) or end < 0:
            raise BtfError(f"string offset {off} out of range")
        return strings[off:end].decode()

    def words(off: int, n: int) -> tuple:
        return _struct.unpack_from(f"{e}{n}I", types_raw, off)

    types: list = [None]  # id 0: void
    off = 0
    while off < len(types_raw):
        name_off, info, size_or_type = words(off, 3)
        off += 12
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        t = Type(len(types), kind, string(name_off))  # name "" for anonymous types
        if kind in _SIZED:
            t.size = size_or_type
        else:
            t.ref = size_or_type
        if kind == INT:
            off += 4
        elif kind == ARRAY:
            t.elem, _index_type, t.nelems = words(off, 3)
            off += 12
        elif kind in (STRUCT, UNION):
            for _ in range(vlen):
                m_name, m_type, m_off = words(off, 3)
                off += 12
                if kind_flag:  # bitfield-aware encoding: size in the top byte
                    t.members.append((string(m_name), m_type, m_off & 0xFFFFFF, m_off >> 24))
                else:
                    t.members.append((string(m_name), m_type, m_off, 0))
        elif kind == ENUM:
            for _ in range(vlen):
                v_name, v_val = words(off, 2)
                off += 8
                if kind_flag and v_val & 0x80000000:  # signed enum
                    v_val -= 1 << 32
                t.values[string(v_name)] = v_val
        elif kind == ENUM64:
            for _ in range(vlen):
                v_name, lo, hi = words(off, 3)
                off += 12
                v = hi << 32 | lo
                if kind_flag and v & 1 << 63:
                    v -= 1 << 64
                t.values[string(v_name)] = v
        elif kind == FUNC_PROTO:
            off += 8 * vlen
        elif kind == VAR:
            off += 4
        elif kind == DATASEC:
            off += 12 * vlen
        elif kind == DECL_TAG:
            off += 4
        elif kind not in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
            raise BtfError(f"type {t.id}: unknown kind {kind}")
        types.append(t)
    if off != len(types_raw):
        raise BtfError("type section ends inside a type")
    return Btf(types)


def from_kernel(btf_id: int) -> Btf:
    """The BTF object `btf_id` as the kernel holds it (root)."""
    from bulkhead.datapath import libbpf

    return parse(libbpf.btf_raw(btf_id))


# ------------------------------------------------------------------ mirrors
def _c_shape(b: Btf, type_id: int):
    """What a member is, for comparing with ctypes: ("int", size) / ("array", n, elem) / ("struct", name)."""
    t = b.resolve(type_id)
    if t is None:
        return ("void",)
    if t.kind == ARRAY:
        return ("array", t.nelems, _c_shape(b, t.elem))
    if t.kind in (STRUCT, UNION):
        return ("struct", t.name or "<anonymous>")
    return ("int", b.sizeof(type_id))  # ints, enums, pointers: only the size crosses


def _py_shape(ctype, c_names: dict) -> tuple:
    if issubclass(ctype, C.Array):
        return ("array", ctype._length_, _py_shape(ctype._type_, c_names))
    if issubclass(ctype, (C.Structure, C.Union)):
        return ("struct", c_names.get(ctype, f"<{ctype.__name__}, no C name in the mirror table>"))
    return ("int", C.sizeof(ctype))


def _spell_shape(shape: tuple) -> str:
    if shape[0] == "array":
        return f"{_spell_shape(shape[2])}[{shape[1]}]"
    if shape[0] == "struct":
        return f"struct {shape[1]}"
    if shape[0] == "int":
        return f"{shape[1]}-byte integer"
    return shape[0]


def mirror_problems(b: Btf, c_name: str, mirror, mirrors: dict) -> list[str]:
    """How ctypes `mirror` differs from struct `c_name` in `b`, one line per difference, each
    naming the struct and field; [] when they match. `mirrors` (C name -> ctypes) names the
    mirrors of nested structs."""
    c = b.struct(c_name)
    if c is None:
        return [f"{c_name}: mirrored by {mirror.__name__}, but the compiled C has no struct {c_name}"]
    c_names = {v: k for k, v in mirrors.items()}
    out = []
    py_size = C.sizeof(mirror)
    if c.size != py_size:
        out.append(f"{c_name}: size {c.size} in C, {py_size} in Python ({mirror.__name__})")
    fields = mirror._fields_
    if any(len(f) != 2 for f in fields) or any(m.bit_size for m in c.members):
        out.append(f"{c_name}: bitfields are not compared; give the field whole bytes")
    c_by = {m.name: m for m in c.members}
    py_by = {f[0]: f[1] for f in fields}
    for m in c.members:
        if m.name not in py_by:
            out.append(f"{c_name}.{m.name}: in C ({m.type} at offset {m.offset}, size {m.size}), "
                       f"not in Python {mirror.__name__}")
    for name in py_by:
        if name not in c_by:
            f = getattr(mirror, name)
            out.append(f"{c_name}.{name}: in Python {mirror.__name__} (offset {f.offset}, size {f.size}), not in C")
    common_c = [m.name for m in c.members if m.name in py_by]
    common_py = [f[0] for f in fields if f[0] in c_by]
    if common_c != common_py:
        out.append(f"{c_name}: fields in another order: C {common_c}, Python {common_py}")
    for name in common_c:
        m, f = c_by[name], getattr(mirror, name)
        if (m.offset, m.size) != (f.offset, f.size):
            out.append(f"{c_name}.{name}: offset {m.offset}, size {m.size} in C; "
                       f"offset {f.offset}, size {f.size} in Python")
        cs, ps = _c_shape(b, _member_type(b, c_name, name)), _py_shape(py_by[name], c_names)
        if cs != ps:
            out.append(f"{c_name}.{name}: {_spell_shape(cs)} in C ({m.type}), {_spell_shape(ps)} in Python")
    return out


def _member_type(b: Btf, c_name: str, member: str) -> int:
    t = b.named(STRUCT, c_name) or b.named(UNION, c_name)
    return next(mtype for mname, mtype, _, _ in t.members if mname == member)


def implicit_padding(b: Btf, c_name: str) -> list[str]:
    """Bytes of struct `c_name` no member covers (STYLE.md: padding is explicit), as problems."""
    c = b.struct(c_name)
    out, at = [], 0
    for m in sorted(c.members, key=lambda m: m.offset):
        if m.offset > at:
            out.append(f"{c_name}: {m.offset - at} bytes of implicit padding before {m.name} (offset {at})")
        at = max(at, m.offset + m.size)
    if c.size > at:
        out.append(f"{c_name}: {c.size - at} bytes of implicit padding at its end (offset {at})")
    return out


def enum_problems(c_name: str, c_values: dict[str, int], prefix: str, mirror) -> list[str]:
    """How IntEnum `mirror` differs from C enum `c_name`, both ways, one line per member.
    The rule: C member <prefix>NAME is mirror.NAME (BH_R_DENY_RULE -> Reason.DENY_RULE)."""
    out = []
    py = {e.name: int(e.value) for e in mirror}
    seen = set()
    for c_member, value in c_values.items():
        if not c_member.startswith(prefix):
            out.append(f"{c_name}: {c_member} lacks the prefix {prefix} its mirror {mirror.__name__} is named by")
            continue
        name = c_member[len(prefix):]
        seen.add(name)
        if name not in py:
            out.append(f"{c_name}: {c_member} = {value} in C, no {mirror.__name__}.{name} in Python")
        elif py[name] != value:
            out.append(f"{c_name}: {c_member} = {value} in C, {mirror.__name__}.{name} = {py[name]} in Python")
    for name, value in py.items():
        if name not in seen:
            out.append(f"{c_name}: {mirror.__name__}.{name} = {value} in Python, no {prefix}{name} in C")
    return out
