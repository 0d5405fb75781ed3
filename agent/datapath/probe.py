"""Kernel feature probes: ask the running kernel, never its version number.

Each probe loads a tiny program or creates a tiny map with the bpf() syscall (through
libbpf) and reports whether the kernel accepted it. Distribution kernels backport and
disable features, so `uname -r` says little; the verifier's answer is the truth.

    probe_all() -> {feature: True | "reason it is missing"}

| feature               | how it is probed                                  | data path needs it |
|-----------------------|---------------------------------------------------|--------------------|
| lru_hash              | create a 1-entry BPF_MAP_TYPE_LRU_HASH            | yes: flow tables   |
| lpm_trie              | create a BPF_MAP_TYPE_LPM_TRIE (no prealloc)      | yes: identities, port ranges |
| batch_map_ops         | bpf_map_update_batch() on a 2-entry array         | yes: the loader zeroes seg_map in one batch |
| ktime_get_coarse_ns   | load XDP calling bpf_ktime_get_coarse_ns()        | yes: flow timestamps |
| xdp_adjust_tail       | load XDP calling bpf_xdp_adjust_tail()            | yes: reject answers (RST / ICMP) |
| prog_test_run_xdp     | BPF_PROG_TEST_RUN of an XDP_PASS program          | no: tests/bpf only  |
| native_xdp_veth       | attach XDP in driver mode to a veth pair in a     | no: the agent falls back to generic XDP |
|                       | throw-away network namespace                      |                    |
| fib_lookup_tbid       | BPF_PROG_TEST_RUN of XDP calling bpf_fib_lookup   | no: the fast path looks replies up in |
|                       | with BPF_FIB_LOOKUP_TBID (6.8+, and backports):   | the main table instead |
|                       | -EINVAL if the kernel lacks it                    |                    |

A missing *required* feature makes `bulkhead agent run` exit 1 naming it (require()): the
program could not load, and bulkhead never degrades to allowing everything. A missing
optional feature is logged with what it costs.

`python -m bulkhead.datapath.probe` prints the table for this kernel (exit 1 if a required
feature is missing).
"""
from __future__ import annotations

import ctypes as C
import errno
import logging
import os
import struct
import subprocess
import sys

from bulkhead.datapath import libbpf
from bulkhead.datapath.errors import DatapathError

log = logging.getLogger("bulkhead.probe")

# linux/bpf.h
PROG_TYPE_XDP = 6
MAP_ARRAY, MAP_LRU_HASH, MAP_LPM_TRIE, MAP_RINGBUF = 2, 9, 11, 27
F_NO_PREALLOC = 1
HELPER_XDP_ADJUST_META = 54
HELPER_XDP_ADJUST_TAIL = 65
HELPER_KTIME_GET_COARSE_NS = 160
XDP_PASS = 2
XDP_FLAGS_DRV_MODE = 1 << 2

# feature -> (required by the data path?, what its absence means)
FEATURES: dict[str, tuple[bool, str]] = {
    "lru_hash": (True, "the flow tables (flows4, flows6, frags) are LRU hashes"),
    "lpm_trie": (True, "source/destination identities and port ranges are LPM tries"),
    "batch_map_ops": (True, "the loader zeroes the segment map with one batch update"),
    "ktime_get_coarse_ns": (True, "the XDP program timestamps flows with bpf_ktime_get_coarse_ns()"),
    "xdp_adjust_tail": (True, "reject answers (TCP RST, ICMP unreachable) resize the frame with bpf_xdp_adjust_tail()"),
    "xdp_adjust_meta": (False, ("bulkhead_xdp passes nothing in front of a packet: bulkhead_tc looks up the flow "
                                "of each packet it gets (steering marks, the fabric, reject answers), and allowed "
                                "packets go up unmarked, through conntrack")),
    "ringbuf": (False, "flow events use a per-CPU perf buffer instead of the BPF ring buffer (kernels < 5.8)"),
    "prog_test_run_xdp": (False, "tests/bpf cannot run packets through the program (BPF_PROG_TEST_RUN); enforcement is unaffected"),
    "native_xdp_veth": (False, "XDP attaches in generic (skb) mode on veth: same verdicts, more cost per packet"),
    "fib_lookup_tbid": (False, ("the XDP fast path looks a reply up in the main table and redirects it only if that "
                                "route leaves by the client's segment; else the stack routes it (fwd_other_segment)")),
}
REQUIRED = tuple(name for name, (req, _) in FEATURES.items() if req)


# ------------------------------------------------------------------ bpf instructions
def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn: u8 code, u8 dst:4 src:4 (little-endian bitfield), s16 off, s32 imm."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst=dst, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def call(helper: int) -> bytes:
    return insn(0x85, imm=helper)  # BPF_JMP | BPF_CALL


def exit_() -> bytes:
    return insn(0x95)  # BPF_JMP | BPF_EXIT


XDP_PASS_PROG = mov64_imm(0, XDP_PASS) + exit_()


def _lib():
    lib = libbpf.lib()
    lib.bpf_prog_load.argtypes = [C.c_int, C.c_char_p, C.c_char_p, C.c_char_p, C.c_size_t, C.c_void_p]
    lib.bpf_map_create.argtypes = [C.c_int, C.c_char_p, C.c_uint32, C.c_uint32, C.c_uint32, C.c_void_p]
    return lib


def _errno(rc: int) -> int:
    """libbpf 1.x returns -errno (and sets errno); 0.x returned -1 and set errno."""
    return -rc if rc < -1 else (C.get_errno() or -rc)


def _why(rc: int, what: str) -> str:
    err = _errno(rc)
    return f"{what}: {errno.errorcode.get(err, err)} ({os.strerror(err)})"


def load_xdp(prog: bytes) -> int:
    """Load raw instructions as an XDP program; return its fd, or raise OSError (the verifier's errno)."""
    rc = _lib().bpf_prog_load(PROG_TYPE_XDP, b"bh_probe", b"GPL", prog, len(prog) // 8, None)
    if rc < 0:
        err = _errno(rc)
        raise OSError(err, os.strerror(err))
    return rc


class MapCreateOpts(C.Structure):
    """struct bpf_map_create_opts as of libbpf 1.0 (sz tells libbpf which fields we know)."""

    _fields_ = [
        ("sz", C.c_size_t),
        ("btf_fd", C.c_uint32),
        ("btf_key_type_id", C.c_uint32),
        ("btf_value_type_id", C.c_uint32),
        ("btf_vmlinux_value_type_id", C.c_uint32),
        ("inner_map_fd", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("map_extra", C.c_uint64),
        ("numa_node", C.c_uint32),
        ("map_ifindex", C.c_uint32),
    ]


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    opts = MapCreateOpts(sz=C.sizeof(MapCreateOpts), map_flags=flags)
    rc = _lib().bpf_map_create(map_type, b"bh_probe", key_size, value_size, max_entries, C.byref(opts))
    if rc < 0:
        err = _errno(rc)
        raise OSError(err, os.strerror(err))
    return rc


# ------------------------------------------------------------------ probes
# Each returns True, or a string saying why the feature is missing.
def probe_map_type(map_type: int, key_size: int = 4, value_size: int = 4, flags: int = 0) -> bool | str:
    try:
        os.close(create_map(map_type, key_size, value_size, 1, flags))
    except OSError as e:
        return f"the kernel refused a map of type {map_type}: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    return True


def _probe_ringbuf() -> bool | str:
    try:
        os.close(create_map(MAP_RINGBUF, 0, 0, os.sysconf("SC_PAGE_SIZE")))
    except OSError as e:
        return f"the kernel refused a BPF ring buffer: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    return True


def probe_helper(helper_id: int, prog: bytes | None = None) -> bool | str:
    """An XDP program that calls `helper_id` (args already set up by `prog`, else none) loads."""
    body = (prog or b"") + call(helper_id) + XDP_PASS_PROG
    try:
        os.close(load_xdp(body))
    except OSError as e:
        return f"the verifier refused a call to helper {helper_id}: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    return True


def probe_batch_ops() -> bool | str:
    try:
        fd = create_map(MAP_ARRAY, 4, 4, 2)
    except OSError as e:
        return f"could not create an array map: {e.strerror}"
    try:
        keys, vals, count = (C.c_uint32 * 2)(0, 1), (C.c_uint32 * 2)(7, 8), C.c_uint32(2)
        libbpf.map_update_batch(fd, keys, vals, count)
        got = C.c_uint32()
        libbpf.lib().bpf_map_lookup_elem(fd, C.byref(C.c_uint32(1)), C.byref(got))
        if got.value != 8:
            return f"bpf_map_update_batch() returned but wrote {got.value}, not 8"
    except OSError as e:
        return f"bpf_map_update_batch() failed: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    finally:
        os.close(fd)
    return True


def _test_run_once(fd: int):
    """One BPF_PROG_TEST_RUN of an IPv4 frame through `fd` (closed here): the result, or why not."""
    try:
        return libbpf.prog_test_run_xdp(fd, b"\x02" * 12 + b"\x08\x00" + b"\0" * 50)
    except OSError as e:
        return f"BPF_PROG_TEST_RUN failed: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    finally:
        os.close(fd)


def probe_test_run() -> bool | str:
    try:
        fd = load_xdp(XDP_PASS_PROG)
    except OSError as e:
        return f"could not load an XDP program: {e.strerror}"
    res = _test_run_once(fd)
    if isinstance(res, str):
        return res
    if res.retval != XDP_PASS:
        return f"BPF_PROG_TEST_RUN returned {res.retval}, not XDP_PASS"
    return True


def probe_native_xdp_veth(timeout: float = 30.0) -> bool | str:
    """Attach in driver mode to a veth in a network namespace that lives only as long as a child."""
    code = "from bulkhead.datapath import probe; probe._native_xdp_child()"
    try:
        p = subprocess.run(["unshare", "--net", sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not run the probe in a new network namespace: {e}"
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode == 0 and out == "ok":
        return True
    return out or (p.stderr.strip().splitlines() or [f"probe exited {p.returncode}"])[-1]


def _native_xdp_child() -> None:
    """Runs in a fresh network namespace (unshare --net); prints "ok" or the reason."""
    try:
        subprocess.run(["ip", "link", "add", "bhprobe0", "type", "veth", "peer", "name", "bhprobe1"],
                       check=True, capture_output=True, text=True)
        for dev in ("bhprobe0", "bhprobe1"):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"could not create a veth pair: {getattr(e, 'stderr', '') or e}".strip())
        return
    fd = load_xdp(XDP_PASS_PROG)
    lib = libbpf.lib()
    lib.bpf_xdp_attach.argtypes = [C.c_int, C.c_int, C.c_uint32, C.c_void_p]
    rc = lib.bpf_xdp_attach(socket_ifindex("bhprobe0"), fd, XDP_FLAGS_DRV_MODE, None)
    print("ok" if rc == 0 else _why(rc, "driver-mode XDP attach to veth"))
    # The namespace, the veth pair and the attachment go away when this process exits.


def socket_ifindex(name: str) -> int:
    import socket

    return socket.if_nametoindex(name)


HELPER_FIB_LOOKUP = 69
FIB_LOOKUP_DIRECT_TBID = (1 << 0) | (1 << 3)


def probe_fib_lookup_tbid() -> bool | str:
    """bpf_fib_lookup(ctx, params, 64, DIRECT | TBID) on lo: a kernel without the flag answers
    -EINVAL before looking at anything; one with it answers a BPF_FIB_LKUP_RET_* (>= 0; table 0
    does not exist: NOT_FWDED). The program returns XDP_PASS for >= 0, XDP_DROP for < 0."""
    stdw = lambda off: insn(0x7A, dst=10, off=off, imm=0)  # *(u64 *)(r10 + off) = 0
    prog = (insn(0xBF, dst=6, src=1)                          # r6 = ctx
            + b"".join(stdw(-64 + 8 * i) for i in range(8))  # struct bpf_fib_lookup, zeroed
            + insn(0x72, dst=10, off=-64, imm=2)              # family = AF_INET
            + insn(0x62, dst=10, off=-56, imm=1)              # ifindex = 1 (lo)
            + insn(0xBF, dst=1, src=6) + insn(0xBF, dst=2, src=10) + insn(0x07, dst=2, imm=-64)
            + mov64_imm(3, 64) + mov64_imm(4, FIB_LOOKUP_DIRECT_TBID) + call(HELPER_FIB_LOOKUP)
            + insn(0xC5, dst=0, off=2, imm=0)                 # if r0 s< 0 goto drop
            + mov64_imm(0, XDP_PASS) + exit_()
            + mov64_imm(0, 1) + exit_())                      # drop: XDP_DROP
    try:
        fd = load_xdp(prog)
    except OSError as e:
        return f"the verifier refused bpf_fib_lookup: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    res = _test_run_once(fd)
    if isinstance(res, str):
        return res
    return True if res.retval == XDP_PASS else "bpf_fib_lookup refused BPF_FIB_LOOKUP_TBID (upstream kernels before 6.8)"


PROBES = {
    "lru_hash": lambda: probe_map_type(MAP_LRU_HASH),
    # LPM keys start with a u32 prefix length; LPM tries must not preallocate.
    "lpm_trie": lambda: probe_map_type(MAP_LPM_TRIE, key_size=8, flags=F_NO_PREALLOC),
    "batch_map_ops": probe_batch_ops,
    "ktime_get_coarse_ns": lambda: probe_helper(HELPER_KTIME_GET_COARSE_NS),
    # r1 is the XDP context on entry; r2 = 0 asks to grow the frame by nothing.
    "xdp_adjust_tail": lambda: probe_helper(HELPER_XDP_ADJUST_TAIL, mov64_imm(2, 0)),
    # r2 = 0: no metadata, just the call (some kernels are built without the helper).
    "xdp_adjust_meta": lambda: probe_helper(HELPER_XDP_ADJUST_META, mov64_imm(2, 0)),
    # A ring buffer: no key or value, max_entries a power-of-two number of pages.
    "ringbuf": lambda: _probe_ringbuf(),
    "prog_test_run_xdp": probe_test_run,
    "native_xdp_veth": probe_native_xdp_veth,
    "fib_lookup_tbid": probe_fib_lookup_tbid,
}
assert PROBES.keys() == FEATURES.keys()


def probe_all() -> dict[str, bool | str]:
    """Every feature -> True, or the reason it is missing. Needs root (CAP_BPF, CAP_NET_ADMIN)."""
    out: dict[str, bool | str] = {}
    for name, fn in PROBES.items():
        try:
            out[name] = fn()
        except Exception as e:  # libbpf missing, no permission, ...: the feature is not usable
            out[name] = f"probe failed: {e}"
    return out


def missing_required(results: dict[str, bool | str]) -> dict[str, str]:
    """Required features that are not present -> reason."""
    return {n: str(results.get(n, "not probed")) for n in REQUIRED if results.get(n) is not True}


def report(results: dict[str, bool | str], logger: logging.Logger = log) -> None:
    """Log every missing feature with what its absence means."""
    for name, value in results.items():
        if value is True:
            continue
        required, meaning = FEATURES[name]
        level = logging.ERROR if required else logging.WARNING
        logger.log(level, "kernel feature %s missing (%s): %s%s", name, value, meaning,
                   "" if required else "; continuing")


def require(logger: logging.Logger = log) -> dict[str, bool | str]:
    """Probe, log what is missing, and raise DatapathError naming any missing required feature."""

    results = probe_all()
    report(results, logger)
    missing = missing_required(results)
    if missing:
        raise DatapathError(
            "this kernel lacks what the data path requires: "
            + "; ".join(f"{n} ({FEATURES[n][1]})" for n in missing)
            + ". Refusing to start: bulkhead never runs without enforcement."
        )
    present = [n for n, v in results.items() if v is True]
    logger.info("kernel features present: %s", ", ".join(present))
    return results


def main() -> int:
    results = probe_all()
    width = max(map(len, results))
    for name, value in results.items():
        required = "required" if FEATURES[name][0] else "optional"
        print(f"{name:<{width}}  {'yes' if value is True else 'NO '}  {required}"
              + ("" if value is True else f"  {value}"))
    return 1 if missing_required(results) else 0


if __name__ == "__main__":
    sys.exit(main())
