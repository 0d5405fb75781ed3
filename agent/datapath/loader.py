"""Load, pin, attach and program the XDP data path.

Pins live in /sys/fs/bpf/bulkhead/<instance>/ (maps/ and the programs). A
first load pins into a temporary directory and renames it into place, so a
crash never leaves a half-made pin tree. A restarted agent compiles against
the existing pins (bcc reuses a pinned map named in the C source), after
checking that every pinned map has the type and sizes this build expects.
A restart of the same build (same sources, flags, kernel and bcc: build_id)
compiles nothing: it opens the pinned programs and maps (Datapath.compiled is
False). An upgrade compiles the new build first, then replaces the pinned
programs and the attachments. XDP stays attached while the agent is gone:
enforcement never pauses.

Policy apply is double-buffered: fill the inactive slot, write its config
(generation), then flip ctl.active_slot with one array update.
"""
from __future__ import annotations

import ctypes as C
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bulkhead.core.paths import BPF_DIR
from bulkhead.datapath import abi, fastpath, fill, libbpf
from bulkhead.datapath.errors import DatapathError
from bulkhead.datapath.maps import (MAP_ARRAY, MAP_HASH, MAP_LPM_TRIE, MAP_LRU_HASH, MAP_PERCPU_ARRAY,  # noqa: F401
                                    MAP_PERCPU_HASH, MAP_PROG_ARRAY, check_pinned_maps, map_specs, misfits)

log = logging.getLogger("bulkhead.datapath")

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "bulkhead"
DEFAULT_STATE_DIR = "/run/bulkhead"
XDP_PROG = "bulkhead_xdp"
REJECT_PROG = "bulkhead_reject"
SNI_PROG = "bulkhead_sni"
RESET_ONWARD_PROG = "bulkhead_reset_onward"
# enum bh_tail slot -> the program the loader puts there
OBSERVE_PROG = "bulkhead_observe"
SNI_STREAM_PROG = "bulkhead_sni_stream"
FORWARD_PROG = "bulkhead_forward"
TAIL_PROGS = {abi.Tail.REJECT: REJECT_PROG, abi.Tail.SNI: SNI_PROG, abi.Tail.RESET_ONWARD: RESET_ONWARD_PROG,
              abi.Tail.MAIN: XDP_PROG, abi.Tail.OBSERVE: OBSERVE_PROG, abi.Tail.SNI_STREAM: SNI_STREAM_PROG,
              abi.Tail.FORWARD: FORWARD_PROG}
EMPTY_PROG = "bulkhead_empty"  # benchmarks' reference program: only in a BH_BENCH build
FLOOR_PROG = "bulkhead_bench_lookup"  # BH_BENCH only: parse + one flow-table hit (the established path's floor)
TC_PROG = "bulkhead_tc"  # clsact ingress: copies XDP's steering mark into skb->mark
TRANSIT_PROG = "bulkhead_transit_in"  # clsact ingress of the transit device: judges what other gateways sent
TC_PROGS = (TC_PROG, TRANSIT_PROG)  # the sched_cls programs (the others are XDP)
PINNED_PROGS = tuple(dict.fromkeys((XDP_PROG, *TAIL_PROGS.values(), *TC_PROGS)))
# Our filter's preference on clsact ingress: lets us replace and delete exactly ours.
TC_PREF = 0xB0C

XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
# Seconds to wait after a flip before the old slot may be rewritten: XDP runs
# under RCU and a packet takes microseconds, so this is generous.
SLOT_QUIESCE_S = 0.05


def instance_name(state_dir: str | os.PathLike) -> str:
    """Pins are per state dir, so two agents (e.g. tests) never share maps."""
    real = os.path.realpath(state_dir)
    if real == os.path.realpath(DEFAULT_STATE_DIR):
        return "default"
    return "sd-" + hashlib.sha1(real.encode()).hexdigest()[:12]


def pin_dir_for(state_dir: str | os.PathLike) -> Path:
    return PIN_ROOT / instance_name(state_dir)


def ensure_bpffs() -> None:
    if subprocess.run(["mountpoint", "-q", str(BPFFS)]).returncode != 0:
        BPFFS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
    PIN_ROOT.mkdir(exist_ok=True)


def cflags(pin_maps_dir: Path, sizes: dict[str, int], defines: tuple[str, ...] = ()) -> list[str]:
    """The one place compile-time knobs become -D flags: the pin directory, map
    sizes (-DNAME=value, consts.h) and switches (-DNAME, see Datapath.defines)."""
    flags = [f"-I{BPF_DIR / 'include'}", f'-DBH_PIN_DIR="{pin_maps_dir}"', "-Wno-unused-function"]
    flags += [f"-D{k}={v}" for k, v in sorted(sizes.items())]
    flags += [f"-D{d}" for d in defines]
    return flags


# Bumped when what a pin tree holds changes in a way the sources don't show.
PIN_LAYOUT = "2"
BUILD_MARK = "build-"  # pin_dir/build-<id>: an empty bpffs directory naming the pinned programs' build
FLOW_EVENTS = "flow_events"  # the ring buffer: pinned by the loader (bcc can't pin a ring buffer output)
PROG_TYPE_XDP, PROG_TYPE_SCHED_CLS = 6, 3


def build_id(pin_maps_dir: Path, sizes: dict[str, int], defines: tuple[str, ...] = ()) -> str:
    """What the compiled object depends on, hashed: every source under bpf/, the flags, the
    kernel release (its headers), bcc's version and the programs the loader pins. Equal ids
    mean a compile would produce the same programs, so a restart may reuse the pinned ones."""
    import bcc

    h = hashlib.sha256(f"bulkhead pins {PIN_LAYOUT}\0".encode())
    for path in sorted(BPF_DIR.rglob("*")):
        if path.suffix in (".c", ".h") and path.is_file():
            h.update(str(path.relative_to(BPF_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in (*cflags(pin_maps_dir, sizes, defines), os.uname().release, getattr(bcc, "__version__", "?"),
                 *PINNED_PROGS):
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def pinned_prog(name: str, fd: int):
    """A pinned program opened by path, as bcc's function object (what BPF.attach_xdp takes)."""
    from bcc import BPF

    return BPF.Function(None, name.encode(), fd)


# How `bulkhead status` names each abi.RejectPath.
REJECT_PATH_NAMES = {abi.RejectPath.XDP_TX: "xdp_tx", abi.RejectPath.TC: "tc_redirect"}


def choose_reject_path(mode: str, link_kind: str | None) -> abi.RejectPath:
    """How a reject answer built on this interface leaves it (see bh_reject_send).

    XDP_TX is kept where it reaches the wire or the other end: native XDP on a
    NIC driver (no rtnetlink link kind), and generic XDP, whose XDP_TX is a
    dev_queue_xmit. Native XDP on a software device (veth above all) goes by
    TC: a veth's XDP_TX lands on the peer's XDP ring, drained only while the
    peer has an XDP program of its own, and the peer may sit in a namespace
    bulkhead doesn't control and gain or lose one at any time. So the choice
    is by driver and mode, never by what the peer has now.
    """
    if mode == "native" and link_kind:
        return abi.RejectPath.TC
    return abi.RejectPath.XDP_TX


def link_kind(ifname: str) -> str | None:
    """The rtnetlink link kind (veth, bond, tun, ...), None for a hardware driver."""
    from pyroute2 import IPRoute  # imported late: unit tests run without it

    with IPRoute() as ipr:
        links = ipr.link("get", ifname=ifname)
        info = links[0].get_attr("IFLA_LINKINFO") if links else None
        return info.get_attr("IFLA_INFO_KIND") if info else None


def v4mapped(addr: ipaddress._BaseAddress) -> bytes:
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


class Datapath:
    """The loaded programs and their maps, for one pin instance."""

    def __init__(self, pin_dir: Path, sizes: dict[str, int] | None = None, defines: tuple[str, ...] = ()):
        self.pin_dir = Path(pin_dir)
        self.sizes = dict(abi.DEFAULT_SIZES, **(sizes or {}))
        # Compile-time switches (-D NAME): BH_EVENTS_PERF (perf buffer instead of
        # the ring buffer), BH_NO_TELEMETRY (benchmarks: the cost of having it),
        # BH_BENCH (benchmark hooks: BH_CTL_BYPASS_FLOWS, BH_CTL_SNI_BENCH and
        # bulkhead_empty; the agent never builds it).
        self.defines = tuple(defines)
        self.bpf = None
        self.fns: dict[str, object] = {}
        self.map_fds: dict[str, int] = {}
        self.last_flip = 0.0
        self.build_id = ""
        self.events_fd: int | None = None  # the flow_events ring buffer (None: perf buffer or no telemetry)
        self.compiled = False  # this load compiled bpf/bulkhead.c (else it reused the pinned programs)
        self.fresh = False  # this load created the pin tree (nothing was pinned before)
        # What the last complete fill wrote into each slot (None: unknown, e.g. after a restart).
        self.slot_content: dict[int, fill.Packed | None] = {n: None for n in range(abi.NUM_SLOTS)}
        self.writer = fill.SlotWriter()

    @property
    def bench(self) -> bool:
        """Built with the benchmark hooks (BH_BENCH)."""
        return "BH_BENCH" in self.defines

    @property
    def xdp_meta(self) -> bool:
        """bulkhead_xdp hands bulkhead_tc XDP metadata (the kernel has bpf_xdp_adjust_meta)."""
        return "BH_NO_XDP_META" not in self.defines

    @property
    def events_perf(self) -> bool:
        """flow_events is a perf event array (BH_EVENTS_PERF), not a ring buffer."""
        return "BH_EVENTS_PERF" in self.defines

    # ---------------------------------------------------------------- load
    def load(self) -> "Datapath":
        """Compile, load and pin, or reuse the pins of the same build without compiling. Does not attach."""
        ensure_bpffs()
        if "BH_EVENTS_PERF" not in self.defines and "BH_NO_TELEMETRY" not in self.defines:
            from bulkhead.datapath import probe

            if probe.PROBES["ringbuf"]() is not True:
                log.warning("no BPF ring buffer in this kernel: flow events use a perf buffer")
                self.defines += ("BH_EVENTS_PERF",)
        if "BH_NO_XDP_META" not in self.defines:
            from bulkhead.datapath import probe

            if probe.PROBES["xdp_adjust_meta"]() is not True:
                log.warning("no bpf_xdp_adjust_meta in this kernel: bulkhead_tc looks up each packet's flow instead")
                self.defines += ("BH_NO_XDP_META",)
        maps_dir = self.pin_dir / "maps"
        self.fresh = not maps_dir.exists()
        self.build_id = build_id(maps_dir, self.sizes, self.defines)
        if not self.fresh:
            problems = check_pinned_maps(maps_dir, self.sizes)
            if problems:
                raise DatapathError(
                    f"pinned maps under {maps_dir} do not match this build ("
                    + "; ".join(problems)
                    + "): run `bulkhead down` to remove them, then start again"
                )
            if self._reuse_pins():
                log.info("reusing pinned programs (build %s): no compile", self.build_id)
                return self
        self._compile()
        return self

    def _reuse_pins(self) -> bool:
        """Open the pinned programs and maps if they are this build's; False: compile instead."""
        why = None
        if not (self.pin_dir / f"{BUILD_MARK}{self.build_id}").is_dir():
            why = "they are another build's (sources, flags, kernel or bcc changed)"
        elif self.events_perf or self.bench or "BH_NO_TELEMETRY" in self.defines:
            why = "this build's flow events or benchmark hooks need the compiled object"
        if why is None:
            fds: dict[str, int] = {}
            try:
                for name in PINNED_PROGS:
                    fd = fds[name] = libbpf.obj_get(str(self.pin_dir / name))
                    want = PROG_TYPE_SCHED_CLS if name in TC_PROGS else PROG_TYPE_XDP
                    if libbpf.prog_info(fd).type != want:
                        raise OSError(f"{name} is not a program of type {want}")
                for name in (*map_specs(self.sizes), FLOW_EVENTS):
                    fds["map:" + name] = libbpf.obj_get(str(self.pin_dir / "maps" / name))
            except OSError as e:
                for fd in fds.values():
                    os.close(fd)
                why = f"a pin can't be opened ({e})"
        if why is not None:
            log.info("compiling: the pinned programs can't be reused: %s", why)
            return False
        self.fns = {n: pinned_prog(n, fds[n]) for n in PINNED_PROGS}
        self.events_fd = fds.pop("map:" + FLOW_EVENTS)
        self.map_fds = {k[4:]: fd for k, fd in fds.items() if k.startswith("map:")}
        self.compiled = False
        return True

    def _compile(self) -> None:
        """Compile against the pinned maps (or a new pin tree, renamed into place when done),
        then replace the program pins one by one, each with an atomic rename."""
        from bcc import BPF  # imported late: unit tests run without bcc

        if self.fresh:
            build_dir = self.pin_dir.parent / f"tmp-{self.pin_dir.name}-{os.getpid()}"  # bpffs forbids dots
            shutil.rmtree(build_dir, ignore_errors=True)
            (build_dir / "maps").mkdir(parents=True)
        else:
            build_dir = self.pin_dir
        try:
            t0 = time.monotonic()
            self.bpf = BPF(src_file=str(BPF_DIR / "bulkhead.c").encode(),
                           cflags=cflags(build_dir / "maps", self.sizes, self.defines))
            bench = (EMPTY_PROG, FLOOR_PROG) if self.bench else ()
            for name in dict.fromkeys((XDP_PROG, *TAIL_PROGS.values(), *bench)):
                self.fns[name] = self.bpf.load_func(name.encode(), BPF.XDP)
            for name in TC_PROGS:
                self.fns[name] = self.bpf.load_func(name.encode(), BPF.SCHED_CLS)
            log.info("compiled and loaded bpf/bulkhead.c in %.1fs (build %s)", time.monotonic() - t0, self.build_id)
            tails = self.bpf.get_table(b"tails")
            for slot, prog in TAIL_PROGS.items():
                tails[C.c_int(slot)] = C.c_int(self.fns[prog].fd)
            # The build mark goes first and comes back last: pins of two builds are never marked as one.
            for old in build_dir.glob(BUILD_MARK + "*"):
                old.rmdir()
            pins = [(self.fns[n].fd, build_dir / n) for n in PINNED_PROGS]
            if not self.events_perf and "BH_NO_TELEMETRY" not in self.defines:
                pins.append((self.bpf.get_table(FLOW_EVENTS.encode()).map_fd, build_dir / "maps" / FLOW_EVENTS))
            for fd, path in pins:  # to a temp name, then renamed over the old pin (atomic)
                tmp = path.with_name(f"new-{path.name}")
                if tmp.exists():
                    tmp.unlink()
                libbpf.obj_pin(fd, str(tmp))
                os.rename(tmp, path)
            (build_dir / f"{BUILD_MARK}{self.build_id}").mkdir()
            if self.fresh:
                if self.pin_dir.exists():
                    shutil.rmtree(self.pin_dir)
                os.rename(build_dir, self.pin_dir)
        except Exception:
            if self.fresh:
                shutil.rmtree(build_dir, ignore_errors=True)
            raise
        for name in map_specs(self.sizes):
            self.map_fds[name] = self.bpf.get_table(name.encode()).map_fd
        if not self.events_perf and "BH_NO_TELEMETRY" not in self.defines:
            self.events_fd = self.bpf.get_table(FLOW_EVENTS.encode()).map_fd
        self.compiled = True

    def prog_fd(self, name: str = XDP_PROG) -> int:
        return self.fns[name].fd

    # -------------------------------------------------------------- attach
    def attach(self, ifname: str, mode: str = "auto") -> str:
        """Attach (or atomically replace) XDP on an interface and set its reject
        path (if_cfg) for the mode it got. Returns the mode used.

        Attach bulkhead_tc first (attach_tc): a reject path "tc" hands answers to it."""
        from bcc import BPF

        fn = self.fns[XDP_PROG]
        used = "generic"
        if mode in ("auto", "native"):
            try:
                BPF.attach_xdp(ifname, fn, XDP_FLAGS_DRV_MODE)
                used = "native"
            except Exception as e:  # driver without XDP support
                if mode == "native":
                    raise DatapathError(f"{ifname}: native XDP failed: {e}") from e
                log.warning("%s: native XDP unavailable (%s), using generic XDP", ifname, e)
        if used == "generic":
            BPF.attach_xdp(ifname, fn, XDP_FLAGS_SKB_MODE)
        kind = link_kind(ifname)
        path = choose_reject_path(used, kind)
        redirect = fastpath.redirect_ok(used, kind, ifname)
        self.set_reject_path(socket.if_nametoindex(ifname), path, redirect_ok=redirect)
        log.info("%s: %s XDP, reject answers sent by %s, fast path %s", ifname, used, REJECT_PATH_NAMES[path],
                 "redirects out of it" if redirect else "passes what leaves by it to the stack")
        return used

    def set_reject_path(self, ifindex: int, path: abi.RejectPath, redirect_ok: bool = False) -> None:
        """if_cfg[ifindex]: reject_path, read by bh_reject_send for every reject on the interface, and
        redirect_ok, whether the fast path may redirect frames out of it (datapath/fastpath.py)."""
        if ifindex >= self.sizes["BH_MAX_IFINDEX"]:
            return  # no segment can name it: apply() refuses the interface
        self._upd("if_cfg", C.c_uint32(ifindex), abi.IfCfg(reject_path=path, redirect_ok=int(redirect_ok)))

    def reject_path(self, ifindex: int) -> str:
        """The reject path the kernel uses on an interface, as `status` names it."""
        v = abi.IfCfg()
        if ifindex < self.sizes["BH_MAX_IFINDEX"]:
            libbpf.lib().bpf_map_lookup_elem(self.map_fds["if_cfg"], C.byref(C.c_uint32(ifindex)), C.byref(v))
        try:
            return REJECT_PATH_NAMES[abi.RejectPath(v.reject_path)]
        except ValueError:
            return f"unknown ({v.reject_path})"

    @staticmethod
    def detach(ifname: str) -> None:
        from bcc import BPF

        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                BPF.remove_xdp(ifname, flags)
            except Exception:
                pass

    def attach_tc(self, ifname: str, prog: str = TC_PROG) -> None:
        """Attach (or replace) bulkhead_tc (or `prog`, another pinned TC program) on the
        interface's clsact ingress.

        bulkhead_tc copies the steering mark of L7 flows (see bh_steer) and sends back
        out the reject answers of interfaces whose reject path is TC
        (bh_reject_send); packets without bulkhead metadata pass untouched. A clsact qdisc is added if
        the interface has none (and removed by detach_tc once it is empty)."""
        qd = subprocess.run(["tc", "qdisc", "add", "dev", ifname, "clsact"], capture_output=True, text=True)
        if qd.returncode and "File exists" not in qd.stderr and "Exclusivity" not in qd.stderr:
            raise DatapathError(f"{ifname}: adding a clsact qdisc failed: {qd.stderr.strip()}")
        pinned = self.pin_dir / prog
        r = subprocess.run(["tc", "filter", "replace", "dev", ifname, "ingress", "pref", str(TC_PREF),
                            "handle", "1", "bpf", "direct-action", "object-pinned", str(pinned)],
                           capture_output=True, text=True)
        if r.returncode:
            raise DatapathError(f"{ifname}: attaching {prog} on TC ingress failed: {r.stderr.strip()}")

    @staticmethod
    def detach_tc(ifname: str) -> bool:
        """Remove our TC filter (only ours, by preference); drop clsact if nothing else uses it."""
        r = subprocess.run(["tc", "filter", "del", "dev", ifname, "ingress", "pref", str(TC_PREF)],
                           capture_output=True, text=True)
        left = ""
        for direction in ("ingress", "egress"):
            left += subprocess.run(["tc", "filter", "show", "dev", ifname, direction],
                                   capture_output=True, text=True).stdout.strip()
        if not left:
            subprocess.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], capture_output=True)
        return r.returncode == 0

    @staticmethod
    def tc_attached(ifname: str) -> bool:
        out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress", "pref", str(TC_PREF)],
                             capture_output=True, text=True).stdout
        return TC_PROG in out

    # -------------------------------------------------------------- policy
    def _upd(self, name: str, key, value) -> None:
        libbpf.map_update(self.map_fds[name], key, value)

    def _zero_seg_map(self, slot: int) -> None:
        """Arrays can't delete: zero every ifindex with one batch update."""
        n = self.sizes["BH_MAX_IFINDEX"]
        keys = (C.c_uint32 * n)(*range(n))
        vals = (abi.SegVal * n)()
        count = C.c_uint32(n)
        libbpf.map_update_batch(self.map_fds[f"seg_map_{slot}"], keys, vals, count)

    def ctl(self) -> abi.Ctl:
        v = abi.Ctl()
        libbpf.lib().bpf_map_lookup_elem(self.map_fds["ctl"], C.byref(C.c_uint32(0)), C.byref(v))
        return v

    def slot_cfg(self, slot: int) -> abi.SlotCfg:
        v = abi.SlotCfg()
        libbpf.lib().bpf_map_lookup_elem(self.map_fds["slot_cfg"], C.byref(C.c_uint32(slot)), C.byref(v))
        return v

    def active_generation(self) -> int:
        return self.slot_cfg(self.ctl().active_slot & 1).generation

    def set_ctl_flags(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        c = self.ctl()
        c.flags = (c.flags | set_bits) & ~clear_bits
        self._upd("ctl", C.c_uint32(0), c)

    def apply(self, bundle, ifindexes: dict[str, int], generation: int, progress=None,
              fab_self: tuple[int, int, bytes] | None = None) -> dict:
        """Program the inactive slot with `bundle` and flip to it.

        Raises (leaving the active slot untouched) if anything fails: the
        inactive slot is marked empty (generation 0) before it is written, so
        a half-written slot can never become active. A policy that doesn't fit
        the maps is refused before the slot is touched. A fill that takes over
        a second logs a progress line a second (or calls progress(done, total, map)).
        `fab_self`: this gateway's own fab entry (fill.pack_slot), None when it has no transit.
        """
        t0 = time.monotonic()
        problems = misfits(bundle, self.sizes, ifindexes)
        if problems:
            raise DatapathError("the policy does not fit the maps: " + "; ".join(problems))
        active = self.ctl().active_slot & 1
        slot = 1 - active
        wait = SLOT_QUIESCE_S - (time.monotonic() - self.last_flip)
        if wait > 0:
            time.sleep(wait)
        packed, flags = fill.pack_slot(bundle, fab_self)
        t_pack = time.monotonic()
        self._upd("slot_cfg", C.c_uint32(slot), abi.SlotCfg(generation=0))
        before, self.slot_content[slot] = self.slot_content[slot], None  # unknown until the fill completes
        self._zero_seg_map(slot)
        for seg in bundle.segments:
            for ifname in seg["interfaces"]:
                self._upd(f"seg_map_{slot}", C.c_uint32(ifindexes[ifname]), abi.SegVal(segment_id=seg["id"]))

        def report(done: int, total: int, what: str) -> None:
            log.info("applying generation %d: %d of %d entries in slot %d (%s), %.1fs", generation, done, total,
                     slot, what, time.monotonic() - t0)

        fill.fill_slot(self.writer, self.map_fds, slot, packed, before, progress or report)
        self.slot_content[slot] = packed
        st = bundle.settings
        cfg = abi.SlotCfg(
            generation=generation,
            default_action=abi.Action.ALLOW if st.get("default_action") == "allow" else abi.Action.DENY,
            flags=flags | (abi.SLOTF_AUDIT if st.get("mode") == "audit" else 0),
            unknown_sni=abi.Action.ALLOW if st.get("unknown_sni") == "allow" else abi.Action.DENY,
        )
        self._upd("slot_cfg", C.c_uint32(slot), cfg)
        # The flip: one array update. Packets read the slot once each.
        c = self.ctl()
        c.active_slot = slot
        self._upd("ctl", C.c_uint32(0), c)
        self.last_flip = time.monotonic()
        if self.last_flip - t0 > 1.0:
            log.info("generation %d: %d entries in slot %d, packed in %.2fs, written and flipped in %.2fs",
                     generation, sum(len(k) for k, _ in packed.values()), slot, t_pack - t0,
                     self.last_flip - t_pack)
        return {"slot": slot, "generation": generation, "seconds": self.last_flip - t0,
                "pack_s": t_pack - t0, "write_s": self.last_flip - t_pack}

    def set_fab_self(self, slot: int, fab_self: tuple[int, int, bytes]) -> None:
        """Rewrite the SELF entry of a slot in place (one hash update: packets see the old or the
        new value): after the transit device was made again under a slot already filled."""
        gw_id, ifindex, addr = fab_self
        key = abi.FabKey(kind=abi.FAB_SELF, id=0)
        val = abi.FabVal(a=gw_id, b=ifindex)
        C.memmove(val.addr, bytes(addr), 16)
        self._upd(f"fab_{slot}", key, val)

    # ------------------------------------------------------------ counters
    def counters(self) -> dict[str, dict[str, int]]:
        """Per-reason packets/bytes, summed over CPUs at read time."""
        out = {}
        stats = dict((k.value, v) for k, v in libbpf.map_items(self.map_fds["stats"], C.c_uint32, abi.Counter,
                                                               percpu=True))
        for r in abi.Reason:
            vals = stats.get(int(r), [])
            out[r.name.lower()] = {
                "packets": sum(v.packets for v in vals),
                "bytes": sum(v.bytes for v in vals),
                "verdict": abi.REASON_VERDICT[r],
            }
        return out

    def events(self) -> dict[str, int]:
        counts = {k.value: sum(v.value for v in vals)
                  for k, vals in libbpf.map_items(self.map_fds["events"], C.c_uint32, C.c_uint64, percpu=True)}
        return {e.name.lower(): int(counts.get(int(e), 0)) for e in abi.Event}

    def pair_flows(self) -> dict[tuple[int, int, int, int], int]:
        """Flows judged per (src app id, dst app id, rule id, reason): pair_flows summed over CPUs."""
        out = {}
        for k, vals in libbpf.map_items(self.map_fds["pair_flows"], abi.PairKey, C.c_uint64, percpu=True):
            out[(k.src_app, k.dst_app, k.rule_id, k.reason)] = sum(v.value for v in vals)
        return out

    def latency(self) -> dict[tuple[int, int, int], dict]:
        """Hop-latency histograms: (src app id, dst app id, abi.Lat) -> {"buckets": [count per
        log2 bucket of 2**LAT_SHIFT ns, abi.LAT_BUCKETS long], "count": n, "sum_s": seconds}."""
        out: dict[tuple[int, int, int], dict] = {}
        unit = (1 << abi.LAT_SHIFT) / 1e9
        for k, vals in libbpf.map_items(self.map_fds["lat_hist"], abi.LatKey, abi.LatVal, percpu=True):
            h = out.setdefault((k.src_app, k.dst_app, k.kind),
                               {"buckets": [0] * abi.LAT_BUCKETS, "count": 0, "sum_s": 0.0})
            n = sum(v.count for v in vals)
            h["buckets"][min(k.bucket, abi.LAT_BUCKETS - 1)] += n
            h["count"] += n
            h["sum_s"] += sum(v.sum_units for v in vals) * unit
        return out

    @staticmethod
    def latency_bounds() -> list[float]:
        """Upper bound in seconds of each lat_hist bucket (bucket b holds [2**b, 2**(b+1)) units)."""
        unit = (1 << abi.LAT_SHIFT) / 1e9
        return [(2 ** (b + 1)) * unit for b in range(abi.LAT_BUCKETS)]

    def flow_entries(self) -> list[tuple[str, object, abi.Flow]]:
        """Every flow-table entry as (\"flows4\"|\"flows6\", key, value), read in batches."""
        out = []
        for fam, key_t in (("flows4", abi.Flow4Key), ("flows6", abi.Flow6Key)):
            out += [(fam, k, v) for k, v in libbpf.map_items(self.map_fds[fam], key_t, abi.Flow)]
        return out

    def occupancy(self, name: str) -> int:
        """Entries in a hash/LRU/trie map now (counted key by key: use for small maps or rarely)."""
        key_t = {"flows4": abi.Flow4Key, "flows6": abi.Flow6Key, "frags": abi.FragKey, "sni_state": abi.Flow6Key,
                 "lat_hist": abi.LatKey, "pair_flows": abi.PairKey}.get(name)
        if key_t is None:
            for prefix, kt in (("src_host", abi.SrcKey), ("src_ident", abi.SrcKey), ("dst_host", abi.DstKey),
                               ("dst_ident", abi.DstKey), ("pol_exact", abi.PolicyKey), ("policy", abi.PolicyKey),
                               ("sni_names", abi.SniKey), ("fab", abi.FabKey)):
                if name.startswith(prefix + "_"):
                    key_t = kt
        if key_t is None:
            raise KeyError(f"{name}: not a map whose entries can be counted")
        return len(libbpf.map_keys(self.map_fds[name], key_t))

    def flow_count(self) -> dict[str, int]:
        return {
            "flows4": len(libbpf.map_keys(self.map_fds["flows4"], abi.Flow4Key)),
            "flows6": len(libbpf.map_keys(self.map_fds["flows6"], abi.Flow6Key)),
        }


def remove_pins(pin_dir: Path) -> None:
    if pin_dir.exists():
        shutil.rmtree(pin_dir)
    # leftovers of interrupted first loads
    for p in PIN_ROOT.glob(f"tmp-{pin_dir.name}-*"):
        shutil.rmtree(p, ignore_errors=True)
    try:
        PIN_ROOT.rmdir()  # only if empty
    except OSError:
        pass
