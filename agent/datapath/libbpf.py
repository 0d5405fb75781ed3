"""Thin ctypes layer over libbpf.so.1 for what bcc 0.26 lacks.

bcc has no Python wrapper for BPF_PROG_TEST_RUN, batch map updates, or
object info; libbpf's C API (the one every distribution ships) does.
Functions return negative errno (libbpf 1.x convention); we raise OSError.
"""
from __future__ import annotations

import ctypes as C
import ctypes.util
import dataclasses
import errno
import os

_lib = None


def lib() -> C.CDLL:
    global _lib
    if _lib is None:
        for name in ("libbpf.so.1", ctypes.util.find_library("bpf") or "libbpf.so.0"):
            try:
                _lib = C.CDLL(name, use_errno=True)
                break
            except OSError:
                continue
        else:
            raise OSError("libbpf not found: install the libbpf1 package (scripts/setup.sh does)")
        _lib.bpf_obj_get.argtypes = [C.c_char_p]
        _lib.bpf_obj_pin.argtypes = [C.c_int, C.c_char_p]
        _lib.bpf_obj_get_info_by_fd.argtypes = [C.c_int, C.c_void_p, C.POINTER(C.c_uint32)]
        _lib.bpf_prog_test_run_opts.argtypes = [C.c_int, C.c_void_p]
        _lib.bpf_map_update_elem.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_uint64]
        _lib.bpf_map_lookup_elem.argtypes = [C.c_int, C.c_void_p, C.c_void_p]
        _lib.bpf_map_delete_elem.argtypes = [C.c_int, C.c_void_p]
        _lib.bpf_map_update_batch.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.POINTER(C.c_uint32), C.c_void_p]
        _lib.bpf_map_get_next_key.argtypes = [C.c_int, C.c_void_p, C.c_void_p]
        _lib.bpf_map_lookup_batch.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_void_p, C.c_void_p,
                                              C.POINTER(C.c_uint32), C.c_void_p]
        _lib.bpf_prog_get_fd_by_id.argtypes = [C.c_uint32]
        _lib.bpf_map_get_fd_by_id.argtypes = [C.c_uint32]
        _lib.bpf_btf_get_fd_by_id.argtypes = [C.c_uint32]
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = -rc if rc != -1 else (C.get_errno() or errno.EINVAL)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


class MapInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("key_size", C.c_uint32),
        ("value_size", C.c_uint32),
        ("max_entries", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("name", C.c_char * 16),
        ("ifindex", C.c_uint32),
        ("btf_vmlinux_value_type_id", C.c_uint32),
        ("netns_dev", C.c_uint64),
        ("netns_ino", C.c_uint64),
        # BTF of the map's key and value (0: created without BTF).
        ("btf_id", C.c_uint32),
        ("btf_key_type_id", C.c_uint32),
        ("btf_value_type_id", C.c_uint32),
        ("_pad", C.c_uint32),
        ("map_extra", C.c_uint64),
        ("_rest", C.c_uint8 * 16),
    ]


class ProgInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("tag", C.c_uint8 * 8),
        ("jited_prog_len", C.c_uint32),
        ("xlated_prog_len", C.c_uint32),
        ("jited_prog_insns", C.c_uint64),
        ("xlated_prog_insns", C.c_uint64),
        ("load_time", C.c_uint64),
        ("created_by_uid", C.c_uint32),
        ("nr_map_ids", C.c_uint32),
        ("map_ids", C.c_uint64),
        ("name", C.c_char * 16),
        ("ifindex", C.c_uint32),
        ("gpl_compatible", C.c_uint32),
        ("netns_dev", C.c_uint64),
        ("netns_ino", C.c_uint64),
        ("nr_jited_ksyms", C.c_uint32),
        ("nr_jited_func_lens", C.c_uint32),
        ("jited_ksyms", C.c_uint64),
        ("jited_func_lens", C.c_uint64),
        ("btf_id", C.c_uint32),  # BTF loaded with the program (0: none)
        ("_rest", C.c_uint8 * 108),
    ]


class BtfInfo(C.Structure):
    _fields_ = [
        ("btf", C.c_uint64),  # user buffer for the raw BTF
        ("btf_size", C.c_uint32),
        ("id", C.c_uint32),
        ("name", C.c_uint64),
        ("name_len", C.c_uint32),
        ("kernel_btf", C.c_uint32),
    ]


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    n = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "map info")
    return info


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    n = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "prog info")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"prog id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"map id {map_id}")


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps a loaded program uses (ProgInfo.map_ids filled into a buffer)."""
    n = prog_info(fd).nr_map_ids
    ids = (C.c_uint32 * max(n, 1))()
    info = ProgInfo(nr_map_ids=n, map_ids=C.addressof(ids))
    size = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(size)), "prog info")
    return list(ids[: min(n, info.nr_map_ids)])


def btf_raw(btf_id: int) -> bytes:
    """The raw BTF blob of kernel BTF object `btf_id` (BPF_BTF_GET_FD_BY_ID, then OBJ_GET_INFO).

    The first info call reports the size, the second fills a buffer of it."""
    fd = _check(lib().bpf_btf_get_fd_by_id(btf_id), f"btf id {btf_id}")
    try:
        info = BtfInfo()
        n = C.c_uint32(C.sizeof(info))
        _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "btf info")
        buf = (C.c_uint8 * info.btf_size)()
        info = BtfInfo(btf=C.addressof(buf), btf_size=len(buf))
        n = C.c_uint32(C.sizeof(info))
        _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "btf info")
        return bytes(buf)
    finally:
        os.close(fd)


def map_update(fd: int, key: C.Structure, value, flags: int = 0) -> None:
    _check(lib().bpf_map_update_elem(fd, C.byref(key), C.byref(value), flags), "map update")


def map_update_batch(fd: int, keys, values, count: C.c_uint32) -> None:
    _check(lib().bpf_map_update_batch(fd, C.byref(keys), C.byref(values), C.byref(count), None), "map update batch")


def map_delete(fd: int, key) -> bool:
    rc = lib().bpf_map_delete_elem(fd, C.byref(key))
    if rc < 0 and -rc != errno.ENOENT and C.get_errno() != errno.ENOENT:
        _check(rc, "map delete")
    return rc == 0


def map_keys(fd: int, key_type) -> list:
    """All keys of a map (snapshot; entries may change meanwhile)."""
    keys = []
    prev, cur = None, key_type()
    while True:
        rc = lib().bpf_map_get_next_key(fd, C.byref(prev) if prev is not None else None, C.byref(cur))
        if rc < 0:
            break
        keys.append(cur)
        prev, cur = cur, key_type()
    return keys


def possible_cpus() -> int:
    """Number of possible CPUs: the value count of a per-CPU map."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def map_items(fd: int, key_type, value_type, percpu: bool = False, chunk: int = 4096) -> list:
    """All (key, value) pairs of a hash map, read in batches (one syscall per
    `chunk` entries); a per-CPU map gives a list of per-CPU values. A snapshot:
    entries may change meanwhile. Falls back to one lookup per key where the
    kernel has no batch operations for the map type."""
    ncpu = possible_cpus() if percpu else 1
    vsize = (C.sizeof(value_type) + 7) // 8 * 8 if percpu else C.sizeof(value_type)
    out = []
    keys = (key_type * chunk)()
    vals = (C.c_uint8 * (vsize * ncpu * chunk))()
    in_b, out_b = C.c_uint64(0), C.c_uint64(0)
    first = True
    while True:
        count = C.c_uint32(chunk)
        rc = lib().bpf_map_lookup_batch(fd, None if first else C.byref(in_b), C.byref(out_b), keys, vals,
                                        C.byref(count), None)
        err = C.get_errno() if rc < 0 else 0
        if rc < 0 and err not in (errno.ENOENT,):
            if first and err in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524, 524):
                return _map_items_slow(fd, key_type, value_type, ncpu, vsize, percpu)
            _check(rc, "map lookup batch")
        for i in range(count.value):
            k = key_type()
            C.memmove(C.byref(k), C.byref(keys, i * C.sizeof(key_type)), C.sizeof(key_type))
            base = i * vsize * ncpu
            if percpu:
                v = []
                for c in range(ncpu):
                    one = value_type()
                    C.memmove(C.byref(one), C.byref(vals, base + c * vsize), C.sizeof(value_type))
                    v.append(one)
            else:
                v = value_type()
                C.memmove(C.byref(v), C.byref(vals, base), C.sizeof(value_type))
            out.append((k, v))
        if rc < 0:  # ENOENT: that was the last batch
            return out
        in_b.value = out_b.value
        first = False


def _map_items_slow(fd, key_type, value_type, ncpu, vsize, percpu) -> list:
    out = []
    buf = (C.c_uint8 * (vsize * ncpu))()
    for k in map_keys(fd, key_type):
        if lib().bpf_map_lookup_elem(fd, C.byref(k), buf) < 0:
            continue
        vs = []
        for c in range(ncpu):
            one = value_type()
            C.memmove(C.byref(one), C.byref(buf, c * vsize), C.sizeof(value_type))
            vs.append(one)
        out.append((k, vs if percpu else vs[0]))
    return out


class TestRunOpts(C.Structure):
    _fields_ = [
        ("sz", C.c_size_t),
        ("data_in", C.c_void_p),
        ("data_out", C.c_void_p),
        ("data_size_in", C.c_uint32),
        ("data_size_out", C.c_uint32),
        ("ctx_in", C.c_void_p),
        ("ctx_out", C.c_void_p),
        ("ctx_size_in", C.c_uint32),
        ("ctx_size_out", C.c_uint32),
        ("retval", C.c_uint32),
        ("repeat", C.c_int),
        ("duration", C.c_uint32),
        ("flags", C.c_uint32),
        ("cpu", C.c_uint32),
        ("batch_size", C.c_uint32),
    ]


class XdpMd(C.Structure):
    _fields_ = [
        ("data", C.c_uint32),
        ("data_end", C.c_uint32),
        ("data_meta", C.c_uint32),
        ("ingress_ifindex", C.c_uint32),
        ("rx_queue_index", C.c_uint32),
        ("egress_ifindex", C.c_uint32),
    ]


@dataclasses.dataclass
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


def prog_test_run_xdp(prog_fd: int, frame: bytes, ingress_ifindex: int = 0, repeat: int = 1) -> TestRunResult:
    """Run an XDP program on one frame (BPF_PROG_TEST_RUN).

    ingress_ifindex must name a device in the caller's network namespace;
    the kernel resolves it for the program's ctx->ingress_ifindex.
    """
    buf_in = C.create_string_buffer(frame, len(frame))
    out_len = len(frame) + 256  # a reject answer can grow the frame
    buf_out = C.create_string_buffer(out_len)
    opts = TestRunOpts()
    opts.sz = C.sizeof(opts)
    opts.data_in = C.cast(buf_in, C.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = C.cast(buf_out, C.c_void_p)
    opts.data_size_out = out_len
    opts.repeat = repeat
    ctx = None
    if ingress_ifindex:
        ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
        opts.ctx_in = C.cast(C.pointer(ctx), C.c_void_p)
        opts.ctx_size_in = C.sizeof(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, C.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRunResult(opts.retval, opts.duration, buf_out.raw[: opts.data_size_out])


# ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
RingSampleFn = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.c_size_t)


class RingBuffer:
    """A BPF ring buffer opened from its map fd (libbpf's ring_buffer__*).

    bcc opens ring buffers only through the BPF object that compiled the program; an agent
    that reuses pinned programs has no such object, only the pinned map."""

    def __init__(self, map_fd: int, callback):
        L = lib()
        L.ring_buffer__new.restype = C.c_void_p
        L.ring_buffer__new.argtypes = [C.c_int, RingSampleFn, C.c_void_p, C.c_void_p]
        L.ring_buffer__poll.argtypes = [C.c_void_p, C.c_int]
        L.ring_buffer__free.argtypes = [C.c_void_p]

        def sample(_ctx, data, size):
            callback(data, size)
            return 0

        self._cb = RingSampleFn(sample)  # kept alive as long as libbpf may call it
        self._rb = L.ring_buffer__new(map_fd, self._cb, None, None)
        if not self._rb:
            err = C.get_errno() or errno.EINVAL
            raise OSError(err, f"ring_buffer__new: {os.strerror(err)}")

    def poll(self, timeout_ms: int) -> int:
        rc = lib().ring_buffer__poll(self._rb, timeout_ms)
        if rc < 0 and -rc != errno.EINTR:
            _check(rc, "ring_buffer__poll")
        return rc

    def close(self) -> None:
        if self._rb:
            lib().ring_buffer__free(self._rb)
            self._rb = None
