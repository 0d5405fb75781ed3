"""The live-rate lab: a real gateway namespace between a sender and a receiver, traffic from
BPF_PROG_RUN in live-frames mode, counted at the far end (../shared/BENCHMARKS.md, method 2).

    lrS (sender)            lrG (gateway)                         lrR (receiver)
    s0 --------------------- ga  [case under test]  gb ----------------- r0
    198.18.0.2/24     198.18.0.1/24          198.18.32.254/24       198.18.32.1/24
    clients 198.18.16.0/20 (routed via 198.18.0.2)

lr_gen (live_rate.bpf.c) runs in lrS with ingress_ifindex = s0 and returns XDP_TX: each
frame leaves s0 and arrives on ga as if from a NIC. lr_count on r0 counts what the gateway
forwarded. The gateway's receive work runs in ga's threaded NAPI kthread, pinned to one CPU;
the generator is pinned to the other; what r0 counts also runs on the gateway's CPU (the
forwarded frame's transmit schedules r0's NAPI there), the same for every case.

Neighbours are static (no ARP in the measured path); ga has GRO on, so it has a NAPI
context even with no XDP program (a veth takes XDP frames only into a NAPI ring).
"""
from __future__ import annotations

import ctypes as C
import ipaddress
import os
import subprocess
import time
from pathlib import Path

from bulkhead.datapath import abi, libbpf, loader
from bulkhead.lab.topology import NETNS_DIR, in_netns
from bulkhead.policy.bundle import Bundle

HERE = Path(__file__).resolve().parent
BPF_SRC = HERE / "live_rate.bpf.c"
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1  # linux/bpf.h
XDP_FLAGS_DRV_MODE = 1 << 2

GW_A, SND = "198.18.0.1", "198.18.0.2"
CLIENTS = ipaddress.ip_network("198.18.16.0/20")
CLIENT_ONE = "198.18.16.7"  # the established flow's client
SERVER, GW_B = "198.18.32.1", "198.18.32.254"
DPORT, SPORT = 8080, 40000
FILLER_BASE = int(ipaddress.IPv4Address("198.18.64.0"))  # filler apps: 198.18.64.0 + i, inside 198.18.0.0/15
GEN_CPU, GW_CPU = 0, 1


def sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p.stdout


def filler(i: int) -> str:
    return str(ipaddress.IPv4Address(FILLER_BASE + i))


# ------------------------------------------------------------------ policies
def bundle(n_rules: int) -> Bundle:
    """clients (198.18.16.0/20, segment 1 on ga) -> server (198.18.32.1, segment 2 on gb) tcp/8080,
    plus n_rules - 1 filler rules app i -> app i+1 tcp/443 between /32 apps; default deny."""
    m = lambda a: loader.v4mapped(ipaddress.ip_address(a))
    src = [(1, m(str(CLIENTS.network_address)), 96 + CLIENTS.prefixlen, 1)]
    dst = [(m(SERVER), 128, 2, 2)]
    pol = [(abi.POLICY_PLEN_EXACT, 1, 2, 6, DPORT, int(abi.Action.ALLOW), 0, 1)]
    n_fill = n_rules - 1
    for i in range(n_fill):
        app = 3 + i
        src.append((1, m(filler(i)), 128, app))
        dst.append((m(filler(i)), 128, app, 2))
    for i in range(n_fill):
        pol.append((abi.POLICY_PLEN_EXACT, 3 + i, 3 + (i + 1) % n_fill, 6, 443, int(abi.Action.ALLOW), 0, 2 + i))
    return Bundle(
        settings={"default_action": "deny", "mode": "enforce", "unknown_sni": "deny"},
        segments=[{"id": 1, "name": "clients", "interfaces": ["ga"]},
                  {"id": 2, "name": "servers", "interfaces": ["gb"]}],
        apps=[], rules=[], src_entries=src, dst_entries=dst, policy_entries=pol,
    )


def nft_ruleset(n_rules: int, form: str) -> str:
    """The same policy for nftables' forward hook, stateless as bulkhead's verdicts are:
    `linear` one rule per policy rule (the traffic's rule last: a first-match scan of all),
    `set` one lookup in a concatenated interval set (what an expert writes)."""
    n_fill = n_rules - 1
    out = ["table inet lrbench", "delete table inet lrbench", "table inet lrbench {"]
    if form == "set":
        elems = [f"{CLIENTS} . {SERVER} . {DPORT}"]
        elems += [f"{filler(i)} . {filler((i + 1) % n_fill)} . 443" for i in range(n_fill)]
        out += ["  set allow {", "    type ipv4_addr . ipv4_addr . inet_service", "    flags interval",
                "    elements = { " + ",\n      ".join(elems) + " }", "  }"]
    out += ["  chain lr_forward {", "    type filter hook forward priority filter; policy drop;"]
    if form == "set":
        out.append("    ip saddr . ip daddr . tcp dport @allow accept")
    else:
        out += [f"    ip saddr {filler(i)} ip daddr {filler((i + 1) % n_fill)} tcp dport 443 accept"
                for i in range(n_fill)]
        out.append(f"    ip saddr {CLIENTS} ip daddr {SERVER} tcp dport {DPORT} accept")
    out += ["  }", "}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------- lab
class LiveLab:
    """Three namespaces, two veth pairs, the generator and the counter. Use as a context manager:
    everything it made (namespaces, pins, plumbing records) is removed on exit, also on failure."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = {"s": f"lrS{tag}", "g": f"lrG{tag}", "r": f"lrR{tag}"}
        self.pin = loader.PIN_ROOT / f"liverate-{tag}"
        self.instance = f"liverate{tag}"
        self.bpf = None
        self.dp = None
        self.plumbing = None
        self.attached: list[tuple[str, str]] = []  # (ns key, ifname) with XDP of ours

    # ---------------------------------------------------------- set up, tear down
    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        from bcc import BPF

        s, g, r = self.ns["s"], self.ns["g"], self.ns["r"]
        for ns in (s, g, r):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "s0", "netns", s, "type", "veth", "peer", "ga", "netns", g)
        sh("ip", "link", "add", "gb", "netns", g, "type", "veth", "peer", "r0", "netns", r)
        for ns, dev, addr in ((s, "s0", f"{SND}/24"), (g, "ga", f"{GW_A}/24"), (g, "gb", f"{GW_B}/24"),
                              (r, "r0", f"{SERVER}/24")):
            sh("ip", "addr", "add", addr, "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        mac = lambda ns, dev: sh("cat", f"/sys/class/net/{dev}/address", ns=ns).strip()
        self.mac = {"s0": mac(s, "s0"), "ga": mac(g, "ga"), "gb": mac(g, "gb"), "r0": mac(r, "r0")}
        sh("ip", "route", "add", str(CLIENTS), "via", SND, "dev", "ga", ns=g)
        sh("ip", "neigh", "replace", SND, "lladdr", self.mac["s0"], "dev", "ga", "nud", "permanent", ns=g)
        sh("ip", "neigh", "replace", SERVER, "lladdr", self.mac["r0"], "dev", "gb", "nud", "permanent", ns=g)
        for k, v in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                     ("net.ipv4.conf.default.rp_filter", "0"), ("net.ipv4.conf.ga.rp_filter", "0")):
            sh("sysctl", "-qw", f"{k}={v}", ns=g)
        # ga: GRO gives it a NAPI context without XDP; threaded NAPI lets us put it on GW_CPU.
        sh("ethtool", "-K", "ga", "gro", "on", ns=g)
        sh("sh", "-c", "echo 1 > /sys/class/net/ga/threaded", ns=g)
        self.ifindex = {"s0": in_netns(s, lambda: socket_ifindex("s0")),
                        "ga": in_netns(g, lambda: socket_ifindex("ga")),
                        "gb": in_netns(g, lambda: socket_ifindex("gb"))}
        self.bpf = BPF(src_file=str(BPF_SRC))
        self.fn = {n: self.bpf.load_func(n, BPF.XDP) for n in ("lr_gen", "lr_count", "lr_pass", "lr_fwd")}
        self.attach_xdp("r", "r0", "lr_count")

    def close(self) -> None:
        errors = []
        if self.plumbing is not None or self.dp is not None:
            try:
                self.bulkhead_off()
            except Exception as e:  # noqa: BLE001 - the namespaces still go; the error is raised below
                errors.append(f"bulkhead teardown: {e}")
        for ns in self.ns.values():
            if (NETNS_DIR / ns).exists():
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        if self.pin.exists():
            loader.remove_pins(self.pin)
        if errors:
            raise RuntimeError("; ".join(errors))

    # ------------------------------------------------------------------- XDP
    def attach_xdp(self, nskey: str, dev: str, prog: str) -> None:
        from bcc import BPF

        in_netns(self.ns[nskey], lambda: BPF.attach_xdp(dev, self.fn[prog], XDP_FLAGS_DRV_MODE))
        self.attached.append((nskey, dev))

    def detach_xdp(self, nskey: str, dev: str) -> None:
        from bcc import BPF

        in_netns(self.ns[nskey], lambda: BPF.remove_xdp(dev, XDP_FLAGS_DRV_MODE))
        self.attached.remove((nskey, dev))

    # ---------------------------------------------------------------- bulkhead
    def bulkhead_on(self) -> None:
        """Load (once), attach to ga and gb with TC, and install the agent's plumbing."""
        from bulkhead.datapath.plumbing import Plumbing

        def on():
            if self.dp is None:
                defines = tuple(os.environ.get("BH_LIVE_DEFINES", "").split())  # ablations
                self.dp = loader.Datapath(self.pin, defines=defines).load()
                self.generation = 0
            for dev in ("ga", "gb"):
                self.dp.attach_tc(dev)
                self.dp.attach(dev, "native")
            self.plumbing = Plumbing(self.instance)

        in_netns(self.ns["g"], on)

    def bulkhead_policy(self, b: Bundle) -> float:
        """Apply `b` (datapath and plumbing); returns the seconds it took."""
        def apply():
            t0 = time.monotonic()
            self.generation += 1
            idx = {"ga": self.ifindex["ga"], "gb": self.ifindex["gb"]}
            self.dp.apply(b, idx, self.generation)
            self.plumbing.apply(b, idx)
            return time.monotonic() - t0

        return in_netns(self.ns["g"], apply)

    def bulkhead_off(self) -> None:
        def off():
            for dev in ("ga", "gb"):
                loader.Datapath.detach(dev)
                loader.Datapath.detach_tc(dev)
            if self.plumbing is not None:
                self.plumbing.remove()
                self.plumbing = None

        in_netns(self.ns["g"], off)

    def counters(self) -> dict[str, int]:
        return in_netns(self.ns["g"], lambda: {k: v["packets"] for k, v in self.dp.counters().items()})

    def events(self) -> dict[str, int]:
        return in_netns(self.ns["g"], self.dp.events)

    # ------------------------------------------------------------------ nft
    def nft(self, script: str | None) -> float:
        """Load a ruleset into the gateway (None: remove ours); seconds it took."""
        t0 = time.monotonic()
        if script is None:
            script = "table inet lrbench\ndelete table inet lrbench\n"
        p = subprocess.run(["ip", "netns", "exec", self.ns["g"], "nft", "-f", "-"], check=False, input=script, text=True,
                           capture_output=True, timeout=1200)
        if p.returncode:
            raise RuntimeError(f"nft: {p.stderr.strip()[:2000]}")
        return time.monotonic() - t0

    # --------------------------------------------------------------- traffic
    def frame(self, client: str) -> bytes:
        from scapy.all import IP, TCP, Ether, raw

        f = raw(Ether(src=self.mac["s0"], dst=self.mac["ga"]) / IP(src=client, dst=SERVER, ttl=64)
                / TCP(sport=SPORT, dport=DPORT, flags="A", seq=1, ack=1))
        return f + b"\0" * (60 - len(f))  # Ethernet padding: the 60-byte minimum, 64 with the FCS

    def set_traffic(self, vary: bool) -> None:
        cfg = self.bpf["lr_cfg"]
        v = cfg.Leaf()
        f = self.frame(str(CLIENTS.network_address) if vary else CLIENT_ONE)
        C.memmove(C.addressof(v.frame), f, len(f))
        v.vary = int(vary)
        v.sport_be = int.from_bytes(f[34:36], "little")  # the raw wire bytes, as the C reads them
        v.saddr_lo_be = int.from_bytes(f[28:30], "little")
        cfg[C.c_int(0)] = v

    def rx_total(self) -> int:
        return sum(self.bpf["lr_rx"][C.c_int(0)])

    def pin_gateway_cpu(self) -> list[int]:
        """Put ga's NAPI kthread on GW_CPU (it is recreated when XDP comes and goes: call per run)."""
        want = "napi/ga-"  # another lab's "ga" would be pinned too: harmless
        pids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(want):
                try:
                    os.sched_setaffinity(int(pid), {GW_CPU})
                    pids.append(int(pid))
                except OSError:
                    pass
        return pids

    def run(self, frames: int) -> dict:
        """Inject `frames` frames from CPU GEN_CPU; what arrived at r0 and at what rates."""
        self.pin_gateway_cpu()
        before = self.rx_total()
        out = {}

        def gen():
            os.sched_setaffinity(0, {GEN_CPU})
            buf = C.create_string_buffer(60)
            ctx = libbpf.XdpMd(data=0, data_end=60, ingress_ifindex=self.ifindex["s0"])
            opts = libbpf.TestRunOpts()
            opts.sz = C.sizeof(opts)
            opts.data_in = C.cast(buf, C.c_void_p)
            opts.data_size_in = 60
            opts.ctx_in = C.cast(C.pointer(ctx), C.c_void_p)
            opts.ctx_size_in = C.sizeof(ctx)
            opts.repeat = frames
            opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
            opts.batch_size = 64
            t0 = time.perf_counter()
            rc = libbpf.lib().bpf_prog_test_run_opts(self.fn["lr_gen"].fd, C.byref(opts))
            out["secs"] = time.perf_counter() - t0
            if rc < 0:
                raise OSError(-rc, f"BPF_PROG_RUN live frames: {os.strerror(-rc)}")

        in_netns(self.ns["s"], gen)
        time.sleep(0.05)  # let the gateway drain its ring (256 frames: microseconds)
        got = self.rx_total() - before
        return {"sent": frames, "received": got, "secs": out["secs"],
                "gen_mpps": frames / out["secs"] / 1e6, "mpps": got / out["secs"] / 1e6}


def socket_ifindex(dev: str) -> int:
    import socket

    return socket.if_nametoindex(dev)


