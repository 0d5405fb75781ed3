"""Two gateways joined by an underlay, for the fabric's tests and demo (issue 15).

    <p>-a-cli  eth0 198.18.1.10/24 fd00:1::10/64 --- bh-cli \\              / bh-srv --- eth0 198.18.1.20/24 <p>-b-srv
                                                            <p>-gwa    <p>-gwb                 fd00:1::20/64
    <p>-a-srv  eth0 198.19.0.10/24 fd00:19::10/64 -- bh-srv /   |          |  \\ bh-cli --- eth0 198.19.9.10/24 <p>-b-cli
                                                           bh-under   bh-under                 fd00:99::10/64
                                                                \\        /
                                                         <p>-under: bridge br0, 198.18.100.0/24, fd00:100::/64
                                                           gwa .1 / ::1, gwb .2 / ::2, rogue .66 / ::66 (<p>-rogue)

The client CIDR behind gateway A (198.18.1.0/24) is the server CIDR behind gateway B on
purpose: the fabric must carry identity, not addresses. Each gateway's segment interfaces have
the .1 / ::1 of their subnet; every end host routes by default via its gateway. The underlay is
one L2 bridge in its own namespace (`rogue` sits on it too: a host that is no gateway, for
forged transit packets). Gateways route nothing between segments and underlay by themselves:
forwarding is left as the namespace inherited it, and the agent's plumbing turns it on.

Nothing here knows bulkhead: the lab is namespaces, veths and a bridge, removed by destroy()
(and reap_stale() after a crash). Only 198.18.0.0/15 and fd00::/8 addresses.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bulkhead.lab.topology import NETNS_DIR, Lab, Probe, failed_probe, in_netns

ROLES = ("gwa", "gwb", "under", "rogue", "a-cli", "a-srv", "b-srv", "b-cli")
GATEWAYS = ("gwa", "gwb")
TRANSIT = {"gwa": ("198.18.100.1", "fd00:100::1"), "gwb": ("198.18.100.2", "fd00:100::2"),
           "rogue": ("198.18.100.66", "fd00:100::66")}
UNDER_IF = "bh-under"
UNDER_MTU = 1600
# end host -> (gateway, gateway interface, gateway addresses, host addresses)
HOSTS = {
    "a-cli": ("gwa", "bh-cli", ["198.18.1.1/24", "fd00:1::1/64"], ["198.18.1.10/24", "fd00:1::10/64"]),
    "a-srv": ("gwa", "bh-srv", ["198.19.0.1/24", "fd00:19::1/64"], ["198.19.0.10/24", "fd00:19::10/64"]),
    # a host address and a default route on-link via the gateway (as clouds give VMs): b-srv never
    # looks for a client of 198.18.1.0/24 on its own link, so it answers a-cli through the fabric
    "b-srv": ("gwb", "bh-srv", ["198.18.1.1/24", "fd00:1::1/64"], ["198.18.1.20/32", "fd00:1::20/128"]),
    "b-cli": ("gwb", "bh-cli", ["198.19.9.1/24", "fd00:99::1/64"], ["198.19.9.10/24", "fd00:99::10/64"]),
}
STALE_RE = re.compile(r"^bhfab(\d+)x\d+-(" + "|".join(ROLES) + r"|dly-[a-z-]+)$")
# Links that can carry a delay line (create(delay_links=...)): an end host's link to its gateway,
# or a gateway's link to the underlay bridge.
DELAY_LINKS = ("a-cli", "a-srv", "b-srv", "b-cli", "gwa", "gwb")

# A delay line: frames between two interfaces of its own namespace, each direction held back by
# its own delay (milliseconds, "D12 D21" lines on stdin). Packet sockets, so it needs no qdisc:
# some kernels are built without sch_netem.
DELAY_LINE = r"""
import heapq, os, select, socket, sys, time
try:
    os.nice(-10)  # its timing is the lab's delay: ahead of the busy processes it serves
except OSError:
    pass
names = sys.argv[1:3]
delay = [0.0, 0.0]
socks = []
for name in names:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((name, 0))
    s.setblocking(False)
    socks.append(s)
queue, n = [], 0
print("ready", flush=True)
while True:
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, out, frame = heapq.heappop(queue)
        try:
            socks[out].send(frame)
        except OSError:
            pass
    wait = max(0.0, queue[0][0] - now) if queue else None
    ready, _, _ = select.select(socks + [sys.stdin], [], [], wait)
    for r in ready:
        if r is sys.stdin:
            line = sys.stdin.readline()
            if not line:
                sys.exit(0)
            delay = [float(x) / 1e3 for x in line.split()]
            continue
        i = socks.index(r)
        while True:
            try:
                frame, addr = r.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            n += 1
            heapq.heappush(queue, (time.monotonic() + delay[i], n, 1 - i, frame))
"""

_counter = itertools.count()


def reap_stale() -> list[str]:
    """Delete namespaces of fabric labs whose process is gone (a crashed run)."""
    removed = []
    if NETNS_DIR.exists():
        for p in sorted(NETNS_DIR.iterdir()):
            m = STALE_RE.match(p.name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                subprocess.run(["ip", "netns", "del", p.name], capture_output=True)
                removed.append(p.name)
    return removed


def host_addr(role: str, family: int = 4) -> str:
    """The first address of an end host (or a transit address), without its prefix length."""
    if role in TRANSIT:
        return TRANSIT[role][0 if family == 4 else 1]
    return next(a.split("/")[0] for a in HOSTS[role][3] if (":" in a) == (family == 6))


TRANSIT_PORT = 4789  # the lab's VXLAN port (the policy's default)
POOLS = ["198.19.255.0/24", "fd00:ff::/120"]  # the lab's service-address pools


def transit_policy(segments: list[dict], apps: list[dict], rules: list[dict], pools: list[str] = POOLS,
                   transit_port: int = TRANSIT_PORT) -> dict:
    """A policy document for both gateways of the lab: gwa and gwb with their underlay addresses
    as transit addresses, the fabric's pools and port, default deny, and what the caller adds."""
    return {
        "version": 1,
        "settings": {"default_action": "deny"},
        "gateways": [{"name": gw, "transit": host_addr(gw)} for gw in GATEWAYS],
        "fabric": {"service_addresses": list(pools), "transit_port": transit_port},
        "segments": segments,
        "apps": apps,
        "rules": rules,
    }


class FabricLab(Lab):
    def __init__(self):
        self.prefix = f"bhfab{os.getpid()}x{next(_counter)}"
        self.ns = {role: f"{self.prefix}-{role}" for role in ROLES}
        self.procs: list[subprocess.Popen] = []

    def name(self, role: str) -> str:
        return self.ns.get(role, role)

    def create(self, delay_links: tuple[str, ...] = ()) -> "FabricLab":
        """The lab; each link named in `delay_links` (DELAY_LINKS) runs through a delay line in a
        namespace of its own (set_delay), with no delay until one is set."""
        bad = set(delay_links) - set(DELAY_LINKS)
        if bad:
            raise ValueError(f"no such link for a delay line: {', '.join(sorted(bad))}")
        for role in ROLES:
            self._fresh_netns(self.ns[role])
        self.delays: dict[str, subprocess.Popen] = {}
        under = self.ns["under"]
        self._ip("-n", under, "link", "add", "br0", "type", "bridge")
        self._ip("-n", under, "link", "set", "br0", "up")
        for i, role in enumerate(("gwa", "gwb", "rogue")):
            port = f"p{i}"
            # The transit adds 50 bytes (VXLAN over IPv4; 70 over IPv6): the underlay has room for them.
            if role in delay_links:
                self._delay_link(role, (self.ns[role], UNDER_IF), (under, port), UNDER_MTU)
            else:
                self._ip("-n", under, "link", "add", port, "mtu", str(UNDER_MTU), "type", "veth", "peer", "name",
                         UNDER_IF, "mtu", str(UNDER_MTU), "netns", self.ns[role])
            self._ip("-n", under, "link", "set", port, "master", "br0")
            self._ip("-n", under, "link", "set", port, "up")
            v4, v6 = TRANSIT[role]
            self._ip("-n", self.ns[role], "addr", "add", f"{v4}/24", "dev", UNDER_IF)
            self._ip("-n", self.ns[role], "addr", "add", f"{v6}/64", "dev", UNDER_IF, "nodad")
            self._ip("-n", self.ns[role], "link", "set", UNDER_IF, "up")
        for role, (gw, gw_if, gw_addrs, addrs) in HOSTS.items():
            gns, hns = self.ns[gw], self.ns[role]
            if role in delay_links:
                self._delay_link(role, (hns, "eth0"), (gns, gw_if), 1500)
            else:
                self._ip("-n", gns, "link", "add", gw_if, "type", "veth", "peer", "name", "eth0", "netns", hns)
            for a in gw_addrs:
                self._ip("-n", gns, "addr", "add", a, "dev", gw_if, *(["nodad"] if ":" in a else []))
            for a in addrs:
                self._ip("-n", hns, "addr", "add", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
            self._ip("-n", gns, "link", "set", gw_if, "up")
            self._ip("-n", hns, "link", "set", "eth0", "up")
            self._ip("-n", hns, "route", "add", "default", "via", gw_addrs[0].split("/")[0], "dev", "eth0", "onlink")
            self._ip("-n", hns, "-6", "route", "add", "default", "via", gw_addrs[1].split("/")[0], "dev", "eth0",
                     "onlink")
        for role in delay_links:
            p = self.spawn(f"dly-{role}", [sys.executable, "-c", DELAY_LINE, "near", "far"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the delay line of {role} did not start")
            self.delays[role] = p
        return self

    def _delay_link(self, role: str, near: tuple[str, str], far: tuple[str, str], mtu: int) -> None:
        """(namespace, interface) `near` (the host's, or the gateway's to the underlay) and `far`
        joined through namespace dly-<role>, where the delay line relays frames between its ends
        "near" and "far". Offloads off on every end: a packet socket relays frames as they are, so
        no checksum may be left to offload and no frame may be bigger than the link."""
        d = self.ns[f"dly-{role}"] = f"{self.prefix}-dly-{role}"
        self._fresh_netns(d)
        for k in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", d, "sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1"],
                           capture_output=True)
        for (ns, ifname), end in ((near, "near"), (far, "far")):
            self._ip("-n", d, "link", "add", end, "mtu", str(mtu), "type", "veth", "peer", "name", ifname,
                     "mtu", str(mtu), "netns", ns)
            self._ip("-n", d, "link", "set", end, "up")
            for n, i in ((d, end), (ns, ifname)):
                subprocess.run(["ip", "netns", "exec", n, "ethtool", "-K", i, "tx", "off", "tso", "off", "gso", "off",
                                "gro", "off"], capture_output=True)

    def set_delay(self, role: str, out_ms: float, in_ms: float = 0.0) -> None:
        """The delay line of `role`'s link (create(delay_links=...)): frames leaving the near end
        (the host, or the gateway to the underlay) held `out_ms`, frames toward it `in_ms`."""
        p = self.delays[role]
        p.stdin.write(f"{out_ms} {in_ms}\n")
        p.stdin.flush()

    def destroy(self) -> None:
        """Stop what we spawned, delete every namespace (veths and the bridge go with them)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []
        for ns in self.ns.values():
            if (NETNS_DIR / ns).exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def gateway(self, role: str) -> "GatewayView":
        """Gateway `role` as lab.runner.AgentRunner sees a Topology's gateway."""
        return GatewayView(self, role)

    # ------------------------------------------------------------ commands
    def cmd(self, role: str, argv: list[str]) -> list[str]:
        if role in GATEWAYS:  # nsenter keeps /sys (and /sys/fs/bpf), as Topology.gw_cmd
            return ["nsenter", f"--net={NETNS_DIR / self.ns[role]}", *argv]
        return ["ip", "netns", "exec", self.ns[role], *argv]

    def run(self, role: str, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(self.cmd(role, argv), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {role}: exit {p.returncode}: {p.stderr.strip()}")
        return p

    def spawn(self, role: str, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.cmd(role, argv), **kw)
        self.procs.append(p)
        return p

    def socket(self, role: str, family, type_):
        import socket

        return in_netns(self.ns[role], lambda: socket.socket(family, type_))

    def ping(self, role: str, addr: str, timeout: float = 1.0) -> Probe:
        p = self.run(role, ["ping", "-c1", "-W", str(max(1, int(timeout))), "-n", addr], check=False)
        return Probe("connected" if p.returncode == 0 else "timeout", p.stdout.strip())

    def tcp_echo(self, role: str, addr: str, port: int, payload: bytes = b"hello", timeout: float = 2.0,
                 src: tuple[str, int] | None = None) -> Probe:
        """One connection from `role` (from `src`, an address and port of it, if given: a flow the
        flow log can tell from the others), `payload` sent, the first answer read."""
        import socket

        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = self.socket(role, fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            if src is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(src)
            s.connect((addr, port))
            s.sendall(payload)
            return Probe("connected", s.recv(4096).decode(errors="replace"))
        except OSError as e:
            return failed_probe(e)
        finally:
            s.close()

    def forge_transit(self, role: str, outer_src: str, to_gw: str, vni: int, gbp: int, dport: int,
                      transit_port: int, sport: int = 41001, count: int = 3,
                      inner: tuple[str, str] = ("198.18.1.10", "198.18.1.20")) -> None:
        """`count` VXLAN-GBP frames sent on `role`'s underlay interface to gateway `to_gw`'s transit
        address (IPv4) with outer source `outer_src`: each a TCP SYN inner[0]:sport -> inner[1]:dport
        carrying app id `gbp` into segment `vni`, as if a gateway had sent it. Needs scapy (the test
        extra), run in `role`'s namespace."""
        code = (
            "import sys\n"
            "from scapy.all import Ether, IP, TCP, UDP, sendp\n"
            "from scapy.layers.vxlan import VXLAN\n"
            "src, dst, mac, isrc, idst = sys.argv[1:6]\n"
            "vni, gbp, sport, dport, tport, n = map(int, sys.argv[6:12])\n"
            "inner = Ether(src='02:00:00:00:00:66', dst='02:00:00:00:00:01')/IP(src=isrc, dst=idst)"
            "/TCP(sport=sport, dport=dport, flags='S')\n"
            "p = Ether(dst=mac)/IP(src=src, dst=dst)/UDP(sport=40000, dport=tport)"
            "/VXLAN(flags='G+Instance', gpid=gbp, vni=vni)/inner\n"
            f"sendp(p, iface='{UNDER_IF}', count=n, verbose=False)\n")
        link = subprocess.run(["ip", "-n", self.ns[to_gw], "-j", "link", "show", UNDER_IF], check=True,
                              capture_output=True, text=True).stdout
        mac = json.loads(link)[0]["address"]
        argv = [sys.executable, "-c", code, outer_src, host_addr(to_gw), mac, *inner,
                *map(str, (vni, gbp, sport, dport, transit_port, count))]
        p = subprocess.run(self.cmd(role, argv), capture_output=True, text=True, timeout=60, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"forging transit from {role}: exit {p.returncode}: {p.stderr.strip()[-500:]}")

    def serve_echo(self, role: str, port: int) -> subprocess.Popen:
        """A TCP server on every address of `role` that answers each connection with
        '<role> <client address>: <what it read>' (the client address is what the server saw)."""
        code = (
            "import socket,sys,threading\n"
            "s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',int(sys.argv[2])));s.listen(64)\n"
            "print('ready',flush=True)\n"
            "def h(c,a):\n"
            "  d=c.recv(4096);ip=a[0].removeprefix('::ffff:');c.sendall(f'{sys.argv[1]} {ip}: '.encode()+d);c.close()\n"
            "while True:\n"
            "  c,a=s.accept();threading.Thread(target=h,args=(c,a),daemon=True).start()\n")
        p = self.spawn(role, [sys.executable, "-c", code, role, str(port)], stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"echo server in {role} did not start")
        return p


class GatewayView:
    """One gateway of a FabricLab, with the attributes lab.runner.AgentRunner uses of a Topology:
    commands and processes in that gateway's namespace (nsenter: /sys/fs/bpf stays the host's)."""

    def __init__(self, lab: FabricLab, role: str):
        self.lab, self.role = lab, role
        self.created = True

    @property
    def gw(self) -> str:
        return self.lab.ns[self.role]

    @property
    def procs(self) -> list[subprocess.Popen]:
        return self.lab.procs

    def spawn(self, _role: str, argv: list[str], **kw) -> subprocess.Popen:
        return self.lab.spawn(self.role, argv, **kw)

    def gw_cmd(self, argv: list[str]) -> list[str]:
        return self.lab.cmd(self.role, argv)
