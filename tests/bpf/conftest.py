"""Fixtures for BPF_PROG_TEST_RUN tests of the XDP program (bpf/bulkhead.c).

The program is compiled and loaded ONCE per session (bcc takes seconds) into a
private network namespace, then every test runs hand-made frames through it:

    frame (scapy one-liner) + ingress interface  ->  XDP code, output frame,
                                                     per-reason counter deltas

Topology of the session namespace `bhbpf-<pid>` (benchmarking ranges only):

    iface  segment  app (id)       addresses
    prod   1        web (1)        198.18.1.0/24  fd00:1::/64
    dev    2        laptops (2)    198.18.1.0/24  fd00:1::/64   <- same CIDRs as web
    core   3        payments (3)   198.19.0.10    fd00:19::10
                    catalog (4)    198.19.0.20    fd00:19::20
                    db (5)         198.19.0.30    fd00:19::30
    lo              (no segment)

The policy maps are seeded directly with a hand-built Bundle (base_bundle()):
these tests pin down the data path, not the YAML compiler. Each interface is
one end of a veth pair (this kernel has no `dummy` driver); `core` also routes
198.19.7.0/24 and fd00:19:7::/64, so the FIB fallback has somewhere to point.

Isolation between tests: the `xdp` fixture re-applies the base bundle if a test
changed the policy, clears the control flags and empties flows4/flows6/frags.
Counters are never reset: tests compare deltas (read before and after).
"""
from __future__ import annotations

import contextlib
import ctypes as C
import dataclasses
import enum
import ipaddress
import os

import pytest
from pyroute2 import IPRoute, netns
from scapy.all import Ether, Packet, raw

from bulkhead.datapath import abi, libbpf, loader
from bulkhead.policy.bundle import Bundle


class X(enum.IntEnum):
    """XDP return codes (linux/bpf.h enum xdp_action)."""

    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


R = abi.Reason
EV = abi.Event
A = abi.Action

# ---------------------------------------------------------------- topology
SEG_PROD, SEG_DEV, SEG_CORE = 1, 2, 3
IFACES = {"prod": SEG_PROD, "dev": SEG_DEV, "core": SEG_CORE}
APP_WEB, APP_LAPTOPS, APP_PAY, APP_CAT, APP_DB = 1, 2, 3, 4, 5

C4, C6 = "198.18.1.5", "fd00:1::5"  # a client address valid in prod (web) and dev (laptops)
PAY4, PAY6 = "198.19.0.10", "fd00:19::10"
CAT4, CAT6 = "198.19.0.20", "fd00:19::20"
DB4, DB6 = "198.19.0.30", "fd00:19::30"
ROUTED4, ROUTED6 = "198.19.7.7", "fd00:19:7::7"  # no app; the FIB says: out of core
UNROUTED4 = "198.18.200.9"  # no app, no route

CLIENT_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
E = Ether(src=CLIENT_MAC, dst=GW_MAC)  # every frame starts with this (or a copy with tags)

# Rules of the base policy: id -> (from, to, what, action, flags)
RULE_PAY_HTTPS = 1  # web -> payments tcp/443 allow
RULE_PAY_SSH = 2  # web -> payments tcp/22 reject
RULE_PAY_TELNET = 3  # web -> payments tcp/23 deny
RULE_PAY_DNS = 4  # web -> payments udp/53 allow
RULE_PAY_MDNS = 5  # web -> payments udp/5353 reject
RULE_PAY_AUDIT = 6  # web -> payments tcp/8080 deny, mode audit
RULE_PAY_L7 = 7  # web -> payments tcp/80 L7 (http rules)
RULE_PAY_SNI = 8  # web -> payments tcp/9443 destination by SNI
RULE_PAY_ICMP = 9  # web -> payments icmp + icmpv6 (any type) allow
RULE_PAY_GRE = 10  # web -> payments proto 47 allow
RULE_PAY_RANGE = 11  # web -> payments tcp/8192-8447 allow (prefix 80+8)
RULE_PAY_AUDIT_REJECT = 12  # web -> payments tcp/2323 reject, mode audit
RULE_CAT_ANY = 13  # web -> catalog any protocol allow (prefix 64)
RULE_DB_TCP = 14  # web -> db tcp any port allow (prefix 72)
RULE_LAP_PAY_DENY = 15  # laptops -> payments tcp/443 deny
RULE_LAP_CAT_HTTP = 16  # laptops -> catalog tcp/80 allow

TCP, UDP, ICMP, ICMP6, GRE = 6, 17, 1, 58, 47
PORT_RANGE = (8192, 8447)  # 0x2000-0x20ff: the top 8 bits of the port fixed


def _net(cidr: str) -> tuple[bytes, int]:
    """(16-byte address, prefix length over 128 bits) as the bundle stores it."""
    n = ipaddress.ip_network(cidr)
    extra = abi.V4MAPPED_BITS if n.version == 4 else 0
    return loader.v4mapped(n.network_address), n.prefixlen + extra


def pol(src: int, dst: int, proto: int | None, port, action: int, rule: int, flags: int = 0) -> tuple:
    """A policy entry. proto None = any protocol; port None = any port; (lo, hi) = aligned range."""
    if proto is None:
        return (abi.POLICY_PLEN_ANY_PROTO, src, dst, 0, 0, action, flags, rule)
    if port is None:
        return (abi.POLICY_PLEN_ANY_PORT, src, dst, proto, 0, action, flags, rule)
    if isinstance(port, tuple):
        lo, hi = port
        span = hi - lo + 1
        bits = span.bit_length() - 1
        assert span == 1 << bits and lo % span == 0, "a single prefix covers only aligned ranges"
        return (abi.POLICY_PLEN_PORT_BASE + 16 - bits, src, dst, proto, lo, action, flags, rule)
    return (abi.POLICY_PLEN_PORT_BASE + 16, src, dst, proto, port, action, flags, rule)


BASE_POLICY = [
    pol(APP_WEB, APP_PAY, TCP, 443, A.ALLOW, RULE_PAY_HTTPS),
    pol(APP_WEB, APP_PAY, TCP, 22, A.REJECT, RULE_PAY_SSH),
    pol(APP_WEB, APP_PAY, TCP, 23, A.DENY, RULE_PAY_TELNET),
    pol(APP_WEB, APP_PAY, UDP, 53, A.ALLOW, RULE_PAY_DNS),
    pol(APP_WEB, APP_PAY, UDP, 5353, A.REJECT, RULE_PAY_MDNS),
    pol(APP_WEB, APP_PAY, TCP, 8080, A.DENY, RULE_PAY_AUDIT, abi.ACTF_AUDIT),
    pol(APP_WEB, APP_PAY, TCP, 80, A.L7, RULE_PAY_L7),
    pol(APP_WEB, APP_PAY, TCP, 9443, A.SNI, RULE_PAY_SNI),
    pol(APP_WEB, APP_PAY, ICMP, None, A.ALLOW, RULE_PAY_ICMP),
    pol(APP_WEB, APP_PAY, ICMP6, None, A.ALLOW, RULE_PAY_ICMP),
    pol(APP_WEB, APP_PAY, GRE, None, A.ALLOW, RULE_PAY_GRE),
    pol(APP_WEB, APP_PAY, TCP, PORT_RANGE, A.ALLOW, RULE_PAY_RANGE),
    pol(APP_WEB, APP_PAY, TCP, 2323, A.REJECT, RULE_PAY_AUDIT_REJECT, abi.ACTF_AUDIT),
    pol(APP_WEB, APP_CAT, None, None, A.ALLOW, RULE_CAT_ANY),
    pol(APP_WEB, APP_DB, TCP, None, A.ALLOW, RULE_DB_TCP),
    pol(APP_LAPTOPS, APP_PAY, TCP, 443, A.DENY, RULE_LAP_PAY_DENY),
    pol(APP_LAPTOPS, APP_CAT, TCP, 80, A.ALLOW, RULE_LAP_CAT_HTTP),
]

_APPS = [
    # (id, name, segment, addresses)
    (APP_WEB, "web", SEG_PROD, ["198.18.1.0/24", "fd00:1::/64"]),
    (APP_LAPTOPS, "laptops", SEG_DEV, ["198.18.1.0/24", "fd00:1::/64"]),
    (APP_PAY, "payments", SEG_CORE, [f"{PAY4}/32", f"{PAY6}/128"]),
    (APP_CAT, "catalog", SEG_CORE, [f"{CAT4}/32", f"{CAT6}/128"]),
    (APP_DB, "db", SEG_CORE, [f"{DB4}/32", f"{DB6}/128"]),
]
# Client apps overlap across segments, so only servers are destinations
# (dst_ident has no segment: destinations must be distinct).
_DST_APPS = {APP_PAY, APP_CAT, APP_DB}


def base_bundle(settings: dict | None = None, policy: list | None = None) -> Bundle:
    """The session topology with `policy` (default BASE_POLICY) and settings overrides."""
    st = {"default_action": "deny", "mode": "enforce", "unknown_sni": "deny"}
    st.update(settings or {})
    src, dst = [], []
    for app_id, _name, seg, addrs in _APPS:
        for cidr in addrs:
            addr, plen = _net(cidr)
            src.append((seg, addr, plen, app_id))
            if app_id in _DST_APPS:
                dst.append((addr, plen, app_id, seg))
    seg_names = {v: k for k, v in IFACES.items()}
    return Bundle(
        settings=st,
        segments=[{"id": s, "name": seg_names[s], "interfaces": [seg_names[s]]} for s in sorted(seg_names)],
        apps=[{"id": i, "name": n, "segment": seg_names[s], "addresses": a, "ports": [], "hostnames": []}
              for i, n, s, a in _APPS],
        rules=[],
        src_entries=src,
        dst_entries=dst,
        policy_entries=list(BASE_POLICY if policy is None else policy),
    )


BASE = base_bundle()


# ----------------------------------------------------------------- running
@dataclasses.dataclass
class Verdict:
    retval: int
    data_out: bytes
    reasons: dict  # abi.Reason -> packets counted during the run (non-zero only)
    reason_bytes: dict  # abi.Reason -> bytes counted
    events: dict  # abi.Event -> count during the run (non-zero only)


def _meta_len(frame_len: int) -> int:
    """Metadata bytes to put in front of a frame shorter than Ethernet.

    BPF_PROG_TEST_RUN refuses input shorter than ETH_HLEN. XDP metadata
    (ctx.data > 0: a multiple of 4, at most 32) counts as input, so with
    metadata in front the input is long enough. Kernels that also check the
    frame itself (6.18 here does) still refuse: EINVAL, raised as OSError.
    """
    if frame_len >= 14:
        return 0
    return (14 - frame_len + 3) // 4 * 4


class SkBuffHead(C.Structure):
    """The head of struct __sk_buff, up to cb[]: what a SCHED_CLS test run may set."""

    _fields_ = [("len", C.c_uint32), ("pkt_type", C.c_uint32), ("mark", C.c_uint32),
                ("queue_mapping", C.c_uint32), ("protocol", C.c_uint32), ("vlan_present", C.c_uint32),
                ("vlan_tci", C.c_uint32), ("vlan_proto", C.c_uint32), ("priority", C.c_uint32),
                ("ingress_ifindex", C.c_uint32), ("ifindex", C.c_uint32), ("tc_index", C.c_uint32),
                ("cb", C.c_uint32 * 5), ("_rest", C.c_uint8 * 256)]  # the kernel copies the whole __sk_buff out


class Xdp:
    """The loaded datapath plus helpers; one per session."""

    def __init__(self, dp: loader.Datapath, ifindex: dict[str, int], ns_fd: int, orig_ns_fd: int):
        self.dp = dp
        self.ifindex = ifindex
        self.ns_fd, self.orig_ns_fd = ns_fd, orig_ns_fd
        self.generation = 0
        self.active: str | None = None  # checksum of the bundle in force, None = unknown

    @property
    def meta(self) -> bool:
        """The kernel has bpf_xdp_adjust_meta: bulkhead_xdp puts struct bh_meta in front of
        what it hands bulkhead_tc. Without it (BH_NO_XDP_META) nothing is in front: the fast
        path's input travels in the per-CPU meta_handoff, reject answers are counted in
        send_back_pending, and bulkhead_tc looks the flow up itself (bh_tc_nometa)."""
        return self.dp.xdp_meta

    def send_back_pending(self) -> int:
        """Reject answers bulkhead_xdp passed up for bulkhead_tc, not taken yet (all CPUs;
        BH_NO_XDP_META builds only)."""
        t = self.dp.bpf[b"send_back_pending"]
        return sum(int(v.count) for v in t.getvalue(t.Key(0)))

    def tc(self, frame, ifname: str, mark: int = 0) -> tuple[int, bytes, int]:
        """bulkhead_tc on an skb arriving on `ifname` (the skb test run takes no XDP
        metadata) -> (TC code, output frame, skb->mark after)."""
        data = frame if isinstance(frame, bytes) else raw(frame)
        buf_in = C.create_string_buffer(data, len(data))
        buf_out = C.create_string_buffer(len(data) + 256)
        idx = self.ifindex[ifname]
        ctx_in, ctx_out = SkBuffHead(mark=mark, ifindex=idx, ingress_ifindex=idx), SkBuffHead()
        opts = libbpf.TestRunOpts(sz=C.sizeof(libbpf.TestRunOpts), repeat=1)
        opts.data_in, opts.data_size_in = C.cast(buf_in, C.c_void_p), len(data)
        opts.data_out, opts.data_size_out = C.cast(buf_out, C.c_void_p), len(buf_out)
        opts.ctx_in, opts.ctx_size_in = C.cast(C.pointer(ctx_in), C.c_void_p), SkBuffHead._rest.offset
        opts.ctx_out, opts.ctx_size_out = C.cast(C.pointer(ctx_out), C.c_void_p), C.sizeof(ctx_out)
        libbpf._check(libbpf.lib().bpf_prog_test_run_opts(self.dp.prog_fd(loader.TC_PROG), C.byref(opts)),
                      "tc test run")
        return opts.retval, buf_out.raw[: opts.data_size_out], ctx_out.mark

    def inside(self):
        """Context: the process in the test namespace, where `ifindex` is valid."""
        return _inside(self.ns_fd, self.orig_ns_fd)

    # -- frames
    def run(self, frame, ifname: str) -> tuple[int, bytes]:
        """One frame through bulkhead_xdp arriving on `ifname` -> (XDP code, frame out)."""
        data = raw(frame) if isinstance(frame, Packet) else bytes(frame)
        meta = _meta_len(len(data))
        if not meta:
            r = libbpf.prog_test_run_xdp(self.dp.prog_fd(), data, self.ifindex[ifname])
            return r.retval, r.data_out
        buf_in = C.create_string_buffer(b"\0" * meta + data, meta + len(data))
        buf_out = C.create_string_buffer(meta + len(data) + 256)
        ctx = libbpf.XdpMd(data=meta, data_end=meta + len(data), ingress_ifindex=self.ifindex[ifname])
        opts = libbpf.TestRunOpts(sz=C.sizeof(libbpf.TestRunOpts), repeat=1)
        opts.data_in = C.cast(buf_in, C.c_void_p)
        opts.data_size_in = meta + len(data)
        opts.data_out = C.cast(buf_out, C.c_void_p)
        opts.data_size_out = len(buf_out)
        opts.ctx_in = C.cast(C.pointer(ctx), C.c_void_p)
        opts.ctx_size_in = C.sizeof(ctx)
        libbpf._check(libbpf.lib().bpf_prog_test_run_opts(self.dp.prog_fd(), C.byref(opts)), "test run")
        return opts.retval, buf_out.raw[meta: opts.data_size_out]  # data_out starts with the metadata

    def counters(self) -> tuple[dict, dict]:
        c = self.dp.counters()
        return ({r: c[r.name.lower()]["packets"] for r in R}, {r: c[r.name.lower()]["bytes"] for r in R})

    def events(self) -> dict:
        e = self.dp.events()
        return {ev: e[ev.name.lower()] for ev in EV}

    def judge(self, frame, ifname: str) -> Verdict:
        p0, b0 = self.counters()
        e0 = self.events()
        retval, out = self.run(frame, ifname)
        p1, b1 = self.counters()
        e1 = self.events()
        return Verdict(
            retval,
            out,
            {r: p1[r] - p0[r] for r in R if p1[r] != p0[r]},
            {r: b1[r] - b0[r] for r in R if b1[r] != b0[r]},
            {ev: e1[ev] - e0[ev] for ev in EV if e1[ev] != e0[ev]},
        )

    def expect(self, frame, ifname: str, code: int, reason: abi.Reason) -> Verdict:
        """Run a frame; assert its XDP code and that exactly `reason` counted it, once."""
        data = raw(frame) if isinstance(frame, Packet) else bytes(frame)
        v = self.judge(data, ifname)
        assert (X(v.retval).name, {r.name: n for r, n in v.reasons.items()}) == (
            X(code).name,
            {reason.name: 1},
        )
        assert v.reason_bytes == {reason: len(data)}
        return v

    # -- policy and state
    def apply(self, bundle: Bundle, fab_self: tuple[int, int, bytes] | None = None) -> int:
        """Fill the inactive slot with `bundle` (and `fab_self`, this gateway's SELF entry in
        fab_N: (gateway id, transit ifindex, transit address16), see fill.pack_slot) and flip."""
        self.generation += 1
        self.active = None  # unknown until apply returns
        self.dp.apply(bundle, self.ifindex, self.generation, fab_self=fab_self)
        # A SELF entry is no part of the bundle: the next reset re-applies BASE.
        self.active = bundle.checksum if fab_self is None else None
        return self.generation

    def clear_flows(self) -> None:
        for name, key in (("flows4", abi.Flow4Key), ("flows6", abi.Flow6Key), ("frags", abi.FragKey),
                          ("sni_state", abi.Flow6Key), ("fab_snat", abi.SnatKey)):
            fd = self.dp.map_fds[name]
            for k in libbpf.map_keys(fd, key):
                libbpf.map_delete(fd, k)

    def flows(self, family: int = 4) -> list[tuple]:
        """(key, value) of every entry of flows4/flows6."""
        name, key_t = ("flows4", abi.Flow4Key) if family == 4 else ("flows6", abi.Flow6Key)
        fd = self.dp.map_fds[name]
        out = []
        for k in libbpf.map_keys(fd, key_t):
            v = abi.Flow()
            if libbpf.lib().bpf_map_lookup_elem(fd, C.byref(k), C.byref(v)) == 0:
                out.append((k, v))
        return out

    def reset(self) -> None:
        self.dp.set_ctl_flags(clear_bits=abi.CTL_BYPASS_FLOWS | abi.CTL_SNI_BENCH | abi.CTL_L7_READY)
        if self.active != BASE.checksum:
            self.apply(BASE)
        self.clear_flows()
        if not self.meta:  # answers the test runs built that no TC run took
            t = self.dp.bpf[b"send_back_pending"]
            t[t.Key(0)] = t.Leaf(*([t.sLeaf()] * len(t.getvalue(t.Key(0)))))

    @contextlib.contextmanager
    def no_policy(self):
        """The active slot reads as never filled (generation 0) inside the block."""
        fd = self.dp.map_fds["slot_cfg"]
        slot = C.c_uint32(self.dp.ctl().active_slot & 1)
        self.active = None  # whatever happens, the next reset re-applies
        libbpf.map_update(fd, slot, abi.SlotCfg(generation=0))
        try:
            yield
        finally:
            self.apply(BASE)


def _write_sysctl(path: str, value: str) -> None:
    # /proc/sys/net/* resolves to the namespace of the process that opens it.
    with open(path, "w") as f:
        f.write(value)


@contextlib.contextmanager
def _inside(ns_fd: int, orig_fd: int):
    """Run the block in the namespace `ns_fd`, then return to `orig_fd` whatever happens."""
    netns.setns(ns_fd, flags=0)
    try:
        yield
    finally:
        netns.setns(orig_fd, flags=0)


@pytest.fixture(scope="session")
def xdp_session():
    """Private netns + veths + the program loaded once; everything removed at the end.

    The process enters the namespace only while a test using `xdp` runs
    (BPF_PROG_TEST_RUN resolves ctx.ingress_ifindex in the caller's
    namespace): tests that run later in the same session, such as
    tests/integration, start from the namespace they expect.
    """
    pid = os.getpid()
    ns_name = f"bhbpf-{pid}"
    pin = loader.PIN_ROOT / f"test-bpf-{pid}"  # bpffs names may not contain dots
    with contextlib.ExitStack() as stack:
        orig_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
        stack.callback(os.close, orig_ns)
        netns.create(ns_name)
        stack.callback(netns.remove, ns_name)
        ns_fd = os.open(os.path.join(netns.NETNS_RUN_DIR, ns_name), os.O_RDONLY)
        stack.callback(os.close, ns_fd)  # closed before the remove: the namespace then goes away

        # IPRoute is closed before we leave: an open socket would keep the namespace alive.
        with _inside(ns_fd, orig_ns), IPRoute() as ipr:
            _write_sysctl("/proc/sys/net/ipv6/conf/default/accept_dad", "0")
            _write_sysctl("/proc/sys/net/ipv6/conf/all/accept_dad", "0")
            for name in IFACES:
                ipr.link("add", ifname=name, kind="veth", peer=f"{name}-p")
            # Segment interfaces, plus lo and the veth peers: interfaces no segment names.
            names = list(IFACES) + [f"{n}-p" for n in IFACES] + ["lo"]
            ifindex = {name: ipr.link_lookup(ifname=name)[0] for name in names}
            for name in names:
                ipr.link("set", index=ifindex[name], state="up")
            # bpf_fib_lookup (the reply segment of a destination no app names)
            # answers only where forwarding is on, as on a real gateway.
            _write_sysctl("/proc/sys/net/ipv4/conf/all/forwarding", "1")
            _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            ipr.addr("add", index=ifindex["prod"], address="198.18.1.1", prefixlen=24)
            ipr.addr("add", index=ifindex["prod"], address="fd00:1::1", prefixlen=64)
            ipr.addr("add", index=ifindex["core"], address="198.19.7.1", prefixlen=24)
            ipr.addr("add", index=ifindex["core"], address="fd00:19:7::1", prefixlen=64)

        loader.remove_pins(pin)  # a leftover of a crashed run with the same pid
        stack.callback(loader.remove_pins, pin)
        dp = loader.Datapath(pin)
        stack.callback(lambda: dp.bpf and dp.bpf.cleanup())
        dp.load()
        yield Xdp(dp, ifindex, ns_fd, orig_ns)


@pytest.fixture
def xdp(xdp_session: Xdp):
    """The session datapath with the base policy in force and empty flow tables,
    the process inside the test namespace for the duration of the test."""
    xdp_session.reset()
    with xdp_session.inside():
        yield xdp_session


@pytest.fixture(scope="session")
def xdp_bench_session(xdp_session: Xdp):
    """The program built as the benchmarks build it (-DBH_BENCH: the benchmark
    hooks), in the session namespace: a second compile, once per session, and
    only if a test asks for it. `xdp` is the production object, without them."""
    pin = loader.PIN_ROOT / f"test-bpf-bench-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        loader.remove_pins(pin)
        stack.callback(loader.remove_pins, pin)
        dp = loader.Datapath(pin, defines=("BH_BENCH",))
        stack.callback(lambda: dp.bpf and dp.bpf.cleanup())
        dp.load()
        yield Xdp(dp, xdp_session.ifindex, xdp_session.ns_fd, xdp_session.orig_ns_fd)


@pytest.fixture
def xdp_bench(xdp_bench_session: Xdp):
    """Like `xdp`, for the bench build (its own maps: the two share nothing)."""
    xdp_bench_session.reset()
    with xdp_bench_session.inside():
        yield xdp_bench_session


def case(id: str, frame, ifname: str, code: int, reason: abi.Reason):
    """One row of a verdict table."""
    return pytest.param(frame, ifname, code, reason, id=id)

