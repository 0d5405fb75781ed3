"""Writing a bundle into one slot's maps: entries packed as bytes, written and deleted in batches.

At 100k rules the per-entry path (one bpf_map_update_elem per entry, plus a get_next_key and a
delete per key to clear the slot) spent seconds in syscalls and ctypes objects. Here every map's
entries are packed with struct into one buffer and written with BPF_MAP_UPDATE_BATCH, chunked so
a progress line can be logged. Clearing the slot deletes only what the previous fill of that slot
wrote and the new one lacks (the Datapath remembers it, as packed keys); when it doesn't know (after a restart, or a
fill that failed half-way) it reads the map's keys and deletes them all.

Where the kernel has no batch operation for a map type (older kernels' trie_map_ops had none), the
same buffers are written one entry per syscall, and a line says so once per map.
"""
from __future__ import annotations

import ctypes as C
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable

from bulkhead.datapath import abi, libbpf
from bulkhead.datapath.errors import DatapathError

log = logging.getLogger("bulkhead.datapath")

ENOTSUPP = 524  # the kernel's "no such operation for this map type" (not in errno)
BATCH_CHUNK = 32768  # entries per batch syscall: a progress line between chunks, bounded copies

# The per-slot maps' key and value layouts, byte for byte the abi structs (tests/unit/test_fill.py).
SRC_KEY = struct.Struct("<II16s")  # SrcKey: prefixlen, segment_id, addr
DST_KEY = struct.Struct("<I16s")  # DstKey: prefixlen, addr
IDENT = struct.Struct("<II")  # Ident: app_id, segment_id
POL_KEY = struct.Struct("<IIIBxH")  # PolicyKey: prefixlen, src_app, dst_app, proto, pad, dport_be
POL_VAL = struct.Struct("<BBxxI")  # PolicyVal: action, flags, pad, rule_id
SNI_KEY = struct.Struct("<QIIHB5x")  # SniKey: name_hash, src_app, dst_app, dport_be, proto, pad
SNI_VAL = struct.Struct("<BBxxII")  # SniVal: action, flags, pad, rule_id, app_id
FAB_KEY = struct.Struct("<II16s")  # FabKey: kind, id, addr
FAB_VAL = struct.Struct("<II16s")  # FabVal: a, b, addr

# base name -> (key layout, value layout), in the order a slot is filled
SLOT_MAPS = {
    "src_host": (SRC_KEY, IDENT), "src_ident": (SRC_KEY, IDENT),
    "dst_host": (DST_KEY, IDENT), "dst_ident": (DST_KEY, IDENT),
    "pol_exact": (POL_KEY, POL_VAL), "policy": (POL_KEY, POL_VAL),
    "sni_names": (SNI_KEY, SNI_VAL),
    "fab": (FAB_KEY, FAB_VAL),
}
EXACT_PLENS = (abi.POLICY_PLEN_EXACT, abi.POLICY_PLEN_ANY_PORT, abi.POLICY_PLEN_ANY_PROTO)

Packed = dict[str, tuple[list[bytes], list[bytes]]]  # base name -> (keys, values)


def _mask16(addr: bytes, plen: int) -> bytes:
    """`addr` with the bits past `plen` cleared. A trie ignores them, so two keys differing only
    there are one entry: canonical keys keep the record of what a slot holds exact."""
    if plen >= 128:
        return addr
    return (int.from_bytes(addr, "big") & (((1 << plen) - 1) << (128 - plen))).to_bytes(16, "big")


ZERO16 = bytes(16)


def pack_slot(bundle, fab_self: tuple[int, int, bytes] | None = None) -> tuple[Packed, int]:
    """Every per-slot map entry of `bundle` as packed bytes, and the slot flags they imply.

    Hosts go to the hash maps, prefixes to the tries; the flags say whether the datapath must
    consult a trie at all. `fab_self` is this gateway's own fabric entry, which the bundle
    can't know: (gateway id, ifindex of the transit device or 0, transit address as 16 bytes,
    IPv4-mapped; zeros: none), given when the agent runs as a named gateway of a policy with
    transit. It and `bundle.fab_entries` go to fab_N, and any entry there sets SLOTF_FABRIC."""
    out: Packed = {name: ([], []) for name in SLOT_MAPS}
    flags = 0
    hk, hv = out["src_host"]
    tk, tv = out["src_ident"]
    seg_bits = abi.SEG_BITS
    for seg_id, addr, plen, app_id in bundle.src_entries:
        v = IDENT.pack(app_id, seg_id)
        if plen == 128:
            hk.append(SRC_KEY.pack(seg_bits + plen, seg_id, addr)), hv.append(v)
        else:
            tk.append(SRC_KEY.pack(seg_bits + plen, seg_id, _mask16(addr, plen))), tv.append(v)
    if tk:
        flags |= abi.SLOTF_SRC_LPM
    hk, hv = out["dst_host"]
    tk, tv = out["dst_ident"]
    for addr, plen, app_id, seg_id in bundle.dst_entries:
        v = IDENT.pack(app_id, seg_id)
        if plen == 128:
            hk.append(DST_KEY.pack(plen, addr)), hv.append(v)
        else:
            tk.append(DST_KEY.pack(plen, _mask16(addr, plen))), tv.append(v)
    if tk:
        flags |= abi.SLOTF_DST_LPM
    hk, hv = out["pol_exact"]
    tk, tv = out["policy"]
    htons, any_port, any_proto = socket.htons, abi.POLICY_PLEN_ANY_PORT, abi.POLICY_PLEN_ANY_PROTO
    lo, hi = abi.POLICY_PLEN_PORT_BASE, abi.POLICY_PLEN_EXACT
    any_dst = False
    for plen, s_app, d_app, proto, dport, action, aflags, rule_id in bundle.policy_entries:
        if plen == any_proto:
            proto, dport = 0, 0
        elif plen == any_port:
            dport = 0
        elif not lo < plen <= hi:
            raise DatapathError(f"policy entry with prefix length {plen} is not a policy key")
        elif plen < hi:
            dport &= (0xFFFF << (hi - plen)) & 0xFFFF
        k, v = POL_KEY.pack(plen, s_app, d_app, proto, htons(dport)), POL_VAL.pack(action, aflags, rule_id)
        any_dst = any_dst or d_app == abi.APP_ANY
        if plen in EXACT_PLENS:
            hk.append(k), hv.append(v)
        else:
            tk.append(k), tv.append(v)
    if tk:
        flags |= abi.SLOTF_POL_LPM
    sk, sv = out["sni_names"]
    for name_hash, s_app, d_app, dport, action, aflags, rule_id, app_id in bundle.sni_entries:
        sk.append(SNI_KEY.pack(name_hash, s_app, d_app, htons(dport), 6))
        sv.append(SNI_VAL.pack(action, aflags, rule_id, app_id))
        any_dst = any_dst or d_app == abi.APP_ANY
    if any_dst:
        flags |= abi.SLOTF_SNI_ANY
    fk, fv = out["fab"]
    for kind, ident, key_addr, a, b, val_addr in bundle.fab_entries:
        if kind == abi.FAB_SELF:
            raise DatapathError("a fab entry of kind SELF in the bundle: only the agent writes its own")
        if len(key_addr) != 16 or len(val_addr) != 16:
            raise DatapathError(f"fab entry {(kind, ident)}: addresses must be 16 bytes (IPv4-mapped for IPv4)")
        fk.append(FAB_KEY.pack(kind, ident, bytes(key_addr))), fv.append(FAB_VAL.pack(a, b, bytes(val_addr)))
    if fab_self is not None:
        gw_id, ifindex, addr = fab_self
        if len(addr) != 16:
            raise DatapathError("this gateway's transit address must be 16 bytes (IPv4-mapped for IPv4)")
        fk.append(FAB_KEY.pack(abi.FAB_SELF, 0, ZERO16)), fv.append(FAB_VAL.pack(gw_id, ifindex, bytes(addr)))
    if len(set(fk)) != len(fk):
        raise DatapathError("the fab entries name one key twice")
    if fk:
        flags |= abi.SLOTF_FABRIC
    return out, flags


def _lib():
    L = libbpf.lib()
    if not getattr(L, "_bh_fill", False):
        L.bpf_map_delete_batch.argtypes = [C.c_int, C.c_void_p, C.POINTER(C.c_uint32), C.c_void_p]
        L._bh_fill = True
    return L


def _errno(rc: int) -> int:
    return -rc if rc < -1 else (C.get_errno() or errno.EINVAL)


class Progress:
    """Calls `report(done, total, what)` at most once a second, from one second into the fill on."""

    def __init__(self, total: int, report: Callable[[int, int, str], None] | None, every_s: float = 1.0):
        self.total, self.done, self.report, self.every = total, 0, report, every_s
        self.t0 = self.last = time.monotonic()

    def step(self, n: int, what: str) -> None:
        self.done += n
        now = time.monotonic()
        if self.report and now - self.t0 >= self.every and now - self.last >= self.every:
            self.last = now
            self.report(self.done, self.total, what)


class SlotWriter:
    """Batch or per-entry writes and deletes on the maps of one Datapath; remembers per map fd
    whether the kernel has the batch operations (probed with a zero-count call, which the kernel
    answers before looking at any entry)."""

    def __init__(self, force_per_entry: frozenset[str] = frozenset()):
        self.batch: dict[tuple[int, str], bool] = {}
        # map base names whose batch ops are never used (tests force the fallback with it)
        self.force_per_entry = force_per_entry

    def has_batch(self, fd: int, op: str, name: str) -> bool:
        key = (fd, op)
        if key not in self.batch:
            base = name.rsplit("_", 1)[0]
            ok = base not in self.force_per_entry
            if ok:
                n = C.c_uint32(0)
                L = _lib()
                fn = L.bpf_map_update_batch if op == "update" else L.bpf_map_delete_batch
                args = (fd, None, None, C.byref(n), None) if op == "update" else (fd, None, C.byref(n), None)
                rc = fn(*args)
                ok = rc >= 0
                if not ok and _errno(rc) not in (ENOTSUPP, errno.EOPNOTSUPP, errno.EINVAL):
                    raise OSError(_errno(rc), f"{name}: probing batch {op}: {errno.errorcode.get(_errno(rc))}")
            if not ok:
                log.info("%s: no batch %s for this map type in this kernel: one syscall per entry", name, op)
            self.batch[key] = ok
        return self.batch[key]

    def update(self, fd: int, name: str, keys: list[bytes], vals: list[bytes], progress: Progress) -> None:
        if not keys:
            return
        ks = len(keys[0])
        L = _lib()
        if self.has_batch(fd, "update", name):
            for i in range(0, len(keys), BATCH_CHUNK):
                kb, vb = b"".join(keys[i:i + BATCH_CHUNK]), b"".join(vals[i:i + BATCH_CHUNK])
                n = C.c_uint32(len(kb) // ks)
                rc = L.bpf_map_update_batch(fd, kb, vb, C.byref(n), None)
                if rc < 0:
                    e = _errno(rc)
                    raise DatapathError(f"{name}: batch update failed after {i + n.value} of {len(keys)} "
                                        f"entries: {errno.errorcode.get(e, e)}")
                progress.step(n.value, name)
            return
        for i, (k, v) in enumerate(zip(keys, vals)):
            rc = L.bpf_map_update_elem(fd, k, v, 0)
            if rc < 0:
                e = _errno(rc)
                raise DatapathError(f"{name}: update failed after {i} of {len(keys)} entries: "
                                    f"{errno.errorcode.get(e, e)}")
            if i % BATCH_CHUNK == BATCH_CHUNK - 1:
                progress.step(BATCH_CHUNK, name)
        progress.step(len(keys) % BATCH_CHUNK, name)

    def delete(self, fd: int, name: str, keys: list[bytes]) -> None:
        """Delete `keys` (a key already gone is not an error)."""
        if not keys:
            return
        L = _lib()
        if self.has_batch(fd, "delete", name):
            ks = len(keys[0])
            for i in range(0, len(keys), BATCH_CHUNK):
                kb = b"".join(keys[i:i + BATCH_CHUNK])
                off = 0
                while off < len(kb):
                    n = C.c_uint32((len(kb) - off) // ks)
                    rc = L.bpf_map_delete_batch(fd, kb[off:], C.byref(n), None)
                    if rc >= 0:
                        break
                    e = _errno(rc)
                    if e != errno.ENOENT:
                        raise DatapathError(f"{name}: batch delete failed: {errno.errorcode.get(e, e)}")
                    off += (n.value + 1) * ks  # the batch stops at a missing key: skip it, go on
            return
        for k in keys:
            rc = L.bpf_map_delete_elem(fd, k)
            if rc < 0 and _errno(rc) != errno.ENOENT:
                e = _errno(rc)
                raise DatapathError(f"{name}: delete failed: {errno.errorcode.get(e, e)}")

    @staticmethod
    def keys(fd: int, key_size: int) -> list[bytes]:
        """Every key in the map (get_next_key: the one walk every map type has)."""
        L = libbpf.lib()
        out = []
        prev, cur = None, C.create_string_buffer(key_size)
        while L.bpf_map_get_next_key(fd, prev, cur) >= 0:
            out.append(cur.raw)
            prev, cur = cur, C.create_string_buffer(key_size)
        return out


def fill_slot(writer: SlotWriter, fds: dict[str, int], slot: int, packed: Packed, before: Packed | None,
              report: Callable[[int, int, str], None] | None = None) -> None:
    """Make slot `slot`'s maps hold exactly `packed`. `before` is what the previous fill of this
    slot wrote (None: unknown, so every key found in the maps is deleted)."""
    total = sum(len(k) for k, _ in packed.values())
    progress = Progress(total, report)
    if before is None:
        log.info("slot %d: what it holds is unknown (its first fill since this agent started, or one "
                 "that failed): reading its keys to delete them all", slot)
    for base, (key_l, _) in SLOT_MAPS.items():
        name, (keys, vals) = f"{base}_{slot}", packed[base]
        fd = fds[name]
        if before is None:
            writer.delete(fd, name, writer.keys(fd, key_l.size))
        elif before[base][0]:
            new = set(keys)
            writer.delete(fd, name, [k for k in before[base][0] if k not in new])
        # Every entry is written, unchanged ones too: one batch costs less than working out which.
        writer.update(fd, name, keys, vals, progress)
