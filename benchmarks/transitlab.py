"""The transit benchmark's live lab (benchmarks/test_transit.py): the fabric lab's two gateways
(bulkhead.lab.fabriclab.FabricLab) with a traffic generator behind gwa and counters behind gwb.

    a-cli --- bh-cli [gwa] bh-under --- under (bridge) --- bh-under [gwb] bh-srv --- b-srv
    198.18.1.10                  198.18.100.1            198.18.100.2          198.18.1.20

Cases (each a way for a-cli's traffic to reach b-srv through both gateways):

  bulkhead          `bulkhead agent run --policy F --gateway gwa|gwb` (one policy): a-cli sends to
                    api's service address; gwa judges, translates, tunnels (VXLAN-GBP, identity
                    carried); gwb decapsulates, judges again by that identity, delivers.
  vxlan             no bulkhead: a plain kernel VXLAN between the gateways' underlay addresses
                    (fixed remote, its own UDP port), a host route to b-srv's real address at a-cli
                    (its /24 holds that address: the CIDRs overlap on purpose) and at gwa over the
                    VXLAN, one back at gwb; the gateways forward.
  vxlan+xdp_pass    the same plus a bare XDP_PASS on the two segment interfaces bulkhead attaches
                    to (gwa bh-cli, gwb bh-srv): native XDP on a veth turns off its peer's TSO and
                    runs its receive in NAPI, so this baseline has the veths in bulkhead's mode.

Traffic:

  udp   60-byte UDP frames of one flow from BPF_PROG_RUN in live-frames mode (lr_gen of
        live_rate.bpf.c) on a-cli's eth0, so each frame arrives on gwa's bh-cli as from a NIC;
        counted by a small XDP program on b-srv's eth0 (tr_count: the benchmark's UDP port only,
        everything else, ARP included, passes). The generator runs on GEN_CPU; the receive NAPI
        of bh-cli and bh-srv is threaded and pinned to GW_CPU, so both gateways' work (and the
        bridge's) runs on that one core, in every case alike.
  paced the same flow in bursts of 200 frames (under the veth's 256-frame ring), ~8 kpps: nothing
        lost; the CPU time of the gateways' threads on GW_CPU (schedstat) per packet delivered.
  tcp   one TCP connection, a Python bulk sender in a-cli (sendall of 256 KiB buffers) to a
        Python sink in b-srv (recv_into 1 MiB), both on GEN_CPU; Gbit/s the sink received.

Everything is removed by close(), also on failure: the agents (`bulkhead down`: programs, pins,
nft tables, the transit device), the baseline's devices, routes and sysctls, bcc's programs, and
the namespaces. Only 198.18.0.0/15 addresses.
"""
from __future__ import annotations

import ctypes as C
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from bulkhead.datapath import libbpf, loader
from bulkhead.lab.fabriclab import FabricLab, host_addr, reap_stale
from bulkhead.lab.fabriclab import transit_policy as lab_policy
from bulkhead.lab.runner import AgentRunner
from bulkhead.lab.topology import NETNS_DIR, in_netns

from .liverate import BPF_F_TEST_XDP_LIVE_FRAMES, BPF_SRC, XDP_FLAGS_DRV_MODE

GEN_CPU, GW_CPU = 0, 1
PORT = 5201
TRANSIT_PORT = 4789
BASE_VXLAN_PORT = 4790  # the baseline's plain VXLAN: never bulkhead's transit port
BASE_VXLAN = "bhbvx"
BASE_NET = {"gwa": "198.18.101.1", "gwb": "198.18.101.2"}  # the baseline VXLAN's own /30
POOLS = ["198.19.255.0/24"]
DNS_A = "198.18.1.1"
CLIENT, SERVER = host_addr("a-cli"), host_addr("b-srv")
# The segment interface of each gateway on the path (bulkhead's XDP, the baseline's XDP_PASS).
SEG_IF = {"gwa": "bh-cli", "gwb": "bh-srv"}

COUNTER_SRC = r"""
#include <uapi/linux/bpf.h>
/* tr_rx[0]: the benchmark's UDP frames seen (dropped here), per CPU; anything else passes. */
BPF_PERCPU_ARRAY(tr_rx, u64, 1);
int tr_count(struct xdp_md *ctx)
{
	__u8 *d = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	if ((void *)(d + 38) > end)
		return XDP_PASS;
	/* IPv4 without options, UDP, destination port PORT */
	if (d[12] != 0x08 || d[13] != 0x00 || d[14] != 0x45 || d[23] != 17 || d[36] != (PORT >> 8) || d[37] != (PORT & 0xff))
		return XDP_PASS;
	__u64 *c = tr_rx.lookup(&zero);
	if (c)
		(*c)++;
	return XDP_DROP;
}
"""

SINK = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    n, t0, t1 = 0, None, None
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        t1 = time.perf_counter()
        if t0 is None:
            t0 = t1
        n += k
    c.close()
    print(f"{n} {(t1 or 0) - (t0 or 0):.6f}", flush=True)
"""

SENDER = r"""
import socket, sys, time
dst, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((dst, port), timeout=5)
buf = b"x" * (256 << 10)
end = time.monotonic() + secs
while time.monotonic() < end:
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"""


def policy() -> dict:
    """One policy for both gateways: web (a-cli, at gwa) -> api (b-srv's address, at gwb, published),
    tcp and udp on PORT; transit between the gateways' underlay addresses."""
    return lab_policy(
        segments=[
            {"name": "a-cli", "gateway": "gwa", "interfaces": ["bh-cli"], "dns": [DNS_A]},
            {"name": "b-srv", "gateway": "gwb", "interfaces": ["bh-srv"]},
        ],
        apps=[
            {"name": "web", "segment": "a-cli", "addresses": ["198.18.1.0/24"]},
            {"name": "api", "segment": "b-srv", "addresses": [f"{SERVER}/32"],
             "ports": [f"tcp/{PORT}", f"udp/{PORT}"], "publish": ["api.apps.example"]},
        ],
        rules=[{"name": "web-api", "from": "web", "to": "api", "ports": [f"tcp/{PORT}", f"udp/{PORT}"]}],
        pools=POOLS, transit_port=TRANSIT_PORT)


def sh(argv: list[str], check: bool = True, timeout: float = 60) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


class ProgStats(C.Structure):
    """struct bpf_prog_info up to run_cnt (linux/bpf.h): what BPF_ENABLE_STATS accumulates."""

    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("tag", C.c_uint8 * 8),
                ("jited_prog_len", C.c_uint32), ("xlated_prog_len", C.c_uint32),
                ("jited_prog_insns", C.c_uint64), ("xlated_prog_insns", C.c_uint64), ("load_time", C.c_uint64),
                ("created_by_uid", C.c_uint32), ("nr_map_ids", C.c_uint32), ("map_ids", C.c_uint64),
                ("name", C.c_char * 16), ("ifindex", C.c_uint32), ("gpl_compatible", C.c_uint32),
                ("netns_dev", C.c_uint64), ("netns_ino", C.c_uint64), ("nr_jited_ksyms", C.c_uint32),
                ("nr_jited_func_lens", C.c_uint32), ("jited_ksyms", C.c_uint64), ("jited_func_lens", C.c_uint64),
                ("btf_id", C.c_uint32), ("func_info_rec_size", C.c_uint32), ("func_info", C.c_uint64),
                ("nr_func_info", C.c_uint32), ("nr_line_info", C.c_uint32), ("line_info", C.c_uint64),
                ("jited_line_info", C.c_uint64), ("nr_jited_line_info", C.c_uint32),
                ("line_info_rec_size", C.c_uint32), ("jited_line_info_rec_size", C.c_uint32),
                ("nr_prog_tags", C.c_uint32), ("prog_tags", C.c_uint64), ("run_time_ns", C.c_uint64),
                ("run_cnt", C.c_uint64)]


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program: what it accumulated while BPF stats were on."""
    info = ProgStats()
    n = C.c_uint32(C.sizeof(info))
    libbpf._check(libbpf.lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "prog info")
    return info.run_time_ns, info.run_cnt


class BpfStats:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) for the length of a with-block: the kernel times every
    BPF program run (two sched_clock reads each, system-wide) while the returned fd is open; closing
    it (also when the process dies) turns the accounting off again."""

    def __enter__(self):
        self.fd = libbpf._check(libbpf.lib().bpf_enable_stats(0), "BPF_ENABLE_STATS")
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class TransitLab:
    """The fabric lab, the cases and the traffic (module docstring). A context manager: close()
    leaves nothing behind, also on failure; `leftovers()` says what it would have left."""

    def __init__(self):
        self.lab = FabricLab()
        self.state = Path(tempfile.mkdtemp(prefix="bulkhead-bench-transit-"))
        self.agents: dict[str, AgentRunner] = {}
        self.starting: list[threading.Thread] = []
        self.gen_bpf = self.cnt_bpf = None
        self.baseline: str | None = None
        self.xdp_pass_on: list[tuple[str, str]] = []
        self.sink: subprocess.Popen | None = None
        self.vip: str | None = None
        self.forwarding: dict[str, str] = {}

    # ------------------------------------------------------------------ set up, tear down
    def __enter__(self) -> TransitLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ns(self, role: str) -> str:
        return self.lab.ns[role]

    def nsx(self, role: str, *argv: str, check: bool = True) -> str:
        return sh(["ip", "netns", "exec", self.ns(role), *argv], check=check)

    def _build(self) -> None:
        from bcc import BPF

        reap_stale()
        self.lab.create()
        self.policy = self.state / "transit.yaml"
        self.policy.write_text(yaml.safe_dump(policy(), sort_keys=False))
        mac = lambda role, dev: self.nsx(role, "cat", f"/sys/class/net/{dev}/address").strip()
        self.mac = {"a-cli": mac("a-cli", "eth0"), "gwa": mac("gwa", "bh-cli")}
        for gw, dev in SEG_IF.items():
            # GRO: a NAPI context without XDP (a veth takes XDP_TX frames only into a NAPI ring);
            # threaded NAPI so that pin_gateway_cpu() can put every gateway's receive on GW_CPU.
            self.nsx(gw, "ethtool", "-K", dev, "gro", "on")
            self.nsx(gw, "sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded")
            self.forwarding[gw] = self.nsx(gw, "sysctl", "-n", "net.ipv4.ip_forward").strip()
        self.ifindex_eth0 = in_netns(self.ns("a-cli"), lambda: socket.if_nametoindex("eth0"))
        self.gen_bpf = BPF(src_file=str(BPF_SRC))
        self.fn = {n: self.gen_bpf.load_func(n, BPF.XDP) for n in ("lr_gen", "lr_pass")}
        self.cnt_bpf = BPF(text=COUNTER_SRC, cflags=[f"-DPORT={PORT}"])
        count = self.cnt_bpf.load_func("tr_count", BPF.XDP)
        in_netns(self.ns("b-srv"), lambda: BPF.attach_xdp("eth0", count, XDP_FLAGS_DRV_MODE))
        self.sink = self.lab.spawn("b-srv", ["taskset", "-c", str(GEN_CPU), sys.executable, "-c", SINK, str(PORT)],
                                   stdout=subprocess.PIPE, text=True)
        if self.sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the TCP sink in b-srv did not start")

    def close(self) -> None:
        errors = []
        for step in (self.bulkhead_off, self.baseline_off):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - the rest still goes; reported below
                errors.append(f"{step.__name__}: {e}")
        if any(t.is_alive() for t in self.starting):  # interrupted during an agent's compile
            for p in list(self.lab.procs):
                if p.poll() is None:
                    p.kill()
            for t in self.starting:
                t.join(timeout=60)
        for a in self.agents.values():
            a.cleanup()
        self.lab.destroy()  # the sink, the namespaces (veths, bridge, devices, XDP of ours)
        for b in (self.gen_bpf, self.cnt_bpf):
            if b is not None:
                b.cleanup()
        self.gen_bpf = self.cnt_bpf = None
        shutil.rmtree(self.state, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    # ------------------------------------------------------------------ bulkhead
    def bulkhead_on(self) -> float:
        """Both agents, started side by side (each compiles); seconds until both were ready."""
        assert self.baseline is None
        t0 = time.monotonic()
        out: dict[str, object] = {}
        self.agents = {gw: AgentRunner(self.lab.gateway(gw), self.state / f"state-{gw}") for gw in SEG_IF}

        def start(gw: str) -> None:
            try:
                out[gw] = self.agents[gw].start(self.policy, args=("--gateway", gw, "--metrics", "off"))
            except Exception as e:  # noqa: BLE001 - raised below
                out[gw] = e

        self.starting = [threading.Thread(target=start, args=(gw,), daemon=True) for gw in self.agents]
        for t in self.starting:
            t.start()
        for t in self.starting:
            t.join()
        for gw, r in out.items():
            if isinstance(r, Exception):
                raise RuntimeError(f"agent at {gw}: {r}")
        if self.vip is None:
            self.vip = self.resolve("api.apps.example")
        return time.monotonic() - t0

    def bulkhead_off(self) -> None:
        """`bulkhead down` at both gateways (and the runner's own checks); then nothing of it is left."""
        for a in self.agents.values():
            a.cleanup()
        self.agents = {}

    def pins(self, gw: str) -> Path:
        return loader.pin_dir_for(self.state / f"state-{gw}")

    def leftovers(self) -> list[str]:
        """What bulkhead left in the lab after bulkhead_off: pins, nft tables, transit devices, XDP/TC."""
        out = [str(self.pins(gw)) for gw in SEG_IF if self.pins(gw).exists()]
        for gw, dev in SEG_IF.items():
            tables = self.nsx(gw, "nft", "list", "tables", check=False)  # plumbing.TABLE_PREFIX
            out += [f"{gw}: nft {t.strip()}" for t in tables.splitlines() if " bulkhead_" in t]
            links = self.nsx(gw, "ip", "-o", "link", "show")
            out += [f"{gw}: device {ln.split(':')[1].strip()}" for ln in links.splitlines()
                    if ln.split(":")[1].strip().startswith("bhvx")]
            if "xdp" in self.nsx(gw, "ip", "-o", "link", "show", "dev", dev):
                out.append(f"{gw}: XDP still on {dev}")
            if self.nsx(gw, "tc", "filter", "show", "dev", dev, "ingress", check=False).strip():
                out.append(f"{gw}: a TC filter still on {dev}")
        return out

    def resolve(self, name: str) -> str:
        from dnslib import DNSRecord

        def ask() -> str:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            try:
                s.sendto(DNSRecord.question(name, "A").pack(), (DNS_A, 53))
                ans = DNSRecord.parse(s.recv(4096))
            finally:
                s.close()
            if not ans.rr:
                raise RuntimeError(f"{name}: no address from gwa's DNS ({ans.header.rcode})")
            return str(ans.rr[0].rdata)

        return in_netns(self.ns("a-cli"), ask)

    def agent_prog(self, gw: str, name: str) -> int:
        """An fd of one of the agent's programs at `gw` (its pin); the caller closes it."""
        return libbpf.obj_get(str(self.pins(gw) / name))

    # ------------------------------------------------------------------ the baseline
    def baseline_on(self, xdp_pass: bool) -> None:
        """Plain routing through a kernel VXLAN between the gateways, no bulkhead (module docstring)."""
        from bcc import BPF

        assert not self.agents
        self.baseline = "vxlan+xdp_pass" if xdp_pass else "vxlan"
        peer = {"gwa": "gwb", "gwb": "gwa"}
        for gw in SEG_IF:
            self.nsx(gw, "ip", "link", "add", BASE_VXLAN, "type", "vxlan", "id", "42", "local", host_addr(gw),
                     "remote", host_addr(peer[gw]), "dstport", str(BASE_VXLAN_PORT), "dev", "bh-under")
            self.nsx(gw, "ip", "addr", "add", f"{BASE_NET[gw]}/30", "dev", BASE_VXLAN)
            self.nsx(gw, "ip", "link", "set", BASE_VXLAN, "up")
            self.nsx(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.nsx("gwa", "ip", "route", "add", f"{SERVER}/32", "via", BASE_NET["gwb"], "dev", BASE_VXLAN)
        self.nsx("gwb", "ip", "route", "add", f"{CLIENT}/32", "via", BASE_NET["gwa"], "dev", BASE_VXLAN)
        self.nsx("a-cli", "ip", "route", "add", f"{SERVER}/32", "via", DNS_A, "dev", "eth0", "onlink")
        if xdp_pass:
            for gw, dev in SEG_IF.items():
                in_netns(self.ns(gw), lambda d=dev: BPF.attach_xdp(d, self.fn["lr_pass"], XDP_FLAGS_DRV_MODE))
                self.xdp_pass_on.append((gw, dev))
        p = self.lab.run("a-cli", ["ping", "-c", "2", "-i", "0.2", "-W", "2", "-n", SERVER], check=False)
        if p.returncode != 0:
            raise RuntimeError(f"baseline {self.baseline}: a-cli can't reach {SERVER}: {p.stdout}")

    def baseline_off(self) -> None:
        from bcc import BPF

        if self.baseline is None:
            return
        for gw, dev in list(self.xdp_pass_on):
            in_netns(self.ns(gw), lambda d=dev: BPF.remove_xdp(d, XDP_FLAGS_DRV_MODE))
            self.xdp_pass_on.remove((gw, dev))
        self.nsx("a-cli", "ip", "route", "del", f"{SERVER}/32", check=False)
        for gw in SEG_IF:
            self.nsx(gw, "ip", "link", "del", BASE_VXLAN, check=False)  # its routes go with it
            self.nsx(gw, "sysctl", "-qw", f"net.ipv4.ip_forward={self.forwarding[gw]}")
        self.baseline = None

    # ------------------------------------------------------------------ traffic
    def dst(self) -> str:
        """Where a-cli sends: api's service address with bulkhead, b-srv's own address without."""
        return self.vip if self.agents else SERVER

    def pin_gateway_cpu(self) -> None:
        """The gateways' receive NAPI threads on GW_CPU (they are recreated when XDP comes and goes)."""
        want = tuple(f"napi/{dev}-" for dev in SEG_IF.values())  # other labs' of that name too: harmless
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith(want):
                    os.sched_setaffinity(int(pid), {GW_CPU})
            except OSError:
                pass

    def rx_total(self) -> int:
        return sum(self.cnt_bpf["tr_rx"][C.c_int(0)])

    def udp_frame(self, dst: str) -> bytes:
        from scapy.all import IP, UDP, Ether, raw

        f = raw(Ether(src=self.mac["a-cli"], dst=self.mac["gwa"]) / IP(src=CLIENT, dst=dst, ttl=64)
                / UDP(sport=40000, dport=PORT) / (b"\0" * 18))
        assert len(f) == 60
        return f

    def udp(self, frames: int) -> dict:
        """`frames` 60-byte UDP frames of one flow from a-cli towards dst(); what b-srv counted."""
        cfg = self.gen_bpf["lr_cfg"]
        v = cfg.Leaf()
        f = self.udp_frame(self.dst())
        C.memmove(C.addressof(v.frame), f, len(f))
        v.vary = 0
        cfg[C.c_int(0)] = v
        self.pin_gateway_cpu()
        before = self.rx_total()
        out = {}

        def gen():
            os.sched_setaffinity(0, {GEN_CPU})
            buf = C.create_string_buffer(60)
            ctx = libbpf.XdpMd(data=0, data_end=60, ingress_ifindex=self.ifindex_eth0)
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

        in_netns(self.ns("a-cli"), gen)
        time.sleep(0.05)  # the rings drain in microseconds
        got = self.rx_total() - before
        return {"sent": frames, "received": got, "secs": out["secs"], "gen_mpps": frames / out["secs"] / 1e6,
                "mpps": got / out["secs"] / 1e6}

    def gw_threads(self) -> list[int]:
        """The threads that do the gateways' receive work on GW_CPU: the NAPI threads of the segment
        interfaces (and what they raise: the bridge, the other gateway, the counter) and ksoftirqd
        of GW_CPU (softirq work deferred out of them)."""
        want = tuple(f"napi/{dev}-" for dev in SEG_IF.values())
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(want) or comm == f"ksoftirqd/{GW_CPU}":
                out.append(int(pid))
        return out

    @staticmethod
    def cpu_ns(pids: list[int]) -> int:
        """ns these threads have run (schedstat's first field), summed."""
        total = 0
        for pid in pids:
            try:
                total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def udp_paced(self, secs: float, burst: int = 200, period: float = 0.005) -> dict:
        """One UDP flow in bursts of `burst` frames (under the veth's 256-frame ring), at most one per
        `period` (a live-frames call itself takes ~20 ms here: its setup), for `secs`: far below
        what the path forwards, so nothing queues past the first ring and nothing is dropped. What
        b-srv counted, and the CPU time the gateways' threads on GW_CPU spent: ns of the whole
        two-gateway path per packet, however the scheduler shares that core."""
        cfg = self.gen_bpf["lr_cfg"]
        v = cfg.Leaf()
        f = self.udp_frame(self.dst())
        C.memmove(C.addressof(v.frame), f, len(f))
        v.vary = 0
        cfg[C.c_int(0)] = v
        self.pin_gateway_cpu()
        out = {}

        def gen():
            os.sched_setaffinity(0, {GEN_CPU})
            buf = C.create_string_buffer(60)
            ctx = libbpf.XdpMd(data=0, data_end=60, ingress_ifindex=self.ifindex_eth0)
            opts = libbpf.TestRunOpts()
            opts.sz = C.sizeof(opts)
            opts.data_in = C.cast(buf, C.c_void_p)
            opts.data_size_in = 60
            opts.ctx_in = C.cast(C.pointer(ctx), C.c_void_p)
            opts.ctx_size_in = C.sizeof(ctx)
            opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
            opts.batch_size = 64
            opts.repeat = burst
            sent, t0 = 0, time.monotonic()
            nxt = t0
            while nxt - t0 < secs:
                rc = libbpf.lib().bpf_prog_test_run_opts(self.fn["lr_gen"].fd, C.byref(opts))
                if rc < 0:
                    raise OSError(-rc, f"BPF_PROG_RUN live frames: {os.strerror(-rc)}")
                sent += burst
                nxt += period
                time.sleep(max(0.0, nxt - time.monotonic()))
                nxt = max(nxt, time.monotonic())
            out["sent"], out["secs"] = sent, time.monotonic() - t0

        threads = self.gw_threads()
        before, c0 = self.rx_total(), self.cpu_ns(threads)
        in_netns(self.ns("a-cli"), gen)
        time.sleep(0.05)
        got, cpu = self.rx_total() - before, self.cpu_ns(threads) - c0
        return {"sent": out["sent"], "received": got, "secs": out["secs"], "kpps": got / out["secs"] / 1e3,
                "cpu_ns": cpu, "ns_per_pkt": cpu / got if got else 0.0, "threads": len(threads)}

    def tcp(self, secs: float) -> dict:
        """One TCP connection a-cli -> dst():PORT for `secs`; Gbit/s the sink in b-srv received."""
        self.pin_gateway_cpu()
        p = self.lab.run("a-cli", ["taskset", "-c", str(GEN_CPU), sys.executable, "-c", SENDER, self.dst(), str(PORT),
                                   str(secs)], check=False, timeout=secs + 30)
        if p.returncode != 0:
            raise RuntimeError(f"TCP sender to {self.dst()}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
        n, dur = self.sink.stdout.readline().split()
        n, dur = int(n), float(dur)
        return {"bytes": n, "secs": dur, "gbps": n * 8 / dur / 1e9 if dur > 0 else 0.0}


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()
