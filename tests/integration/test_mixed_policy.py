"""No packet is judged by a mix of two policies, while packets flow and policies swap.

Two policies that differ in every verdict, every rule id, every app id and the default action:

    flow   A (odd generations)                B (even generations)
    X      allow, rule 1, apps 1 -> 2         deny, rule 13, apps 21 -> 22
    Y      deny,  rule 2, apps 1 -> 3         allow, rule 14, apps 21 -> 23
    other  default deny                       default allow

The main thread swaps A and B back and forth (Datapath.apply: fill the standby slot, flip) while
two threads run the gateway's own XDP program on crafted frames with BPF_PROG_TEST_RUN, as fast
as they can, on the other CPU(s) meanwhile:
- the new-flow thread sends a SYN of a new 5-tuple each time, alternately of flow X and Y;
- the established thread sends ACKs of one 5-tuple of flow X, whose cached entry must be
  re-judged whenever the generation changes.
BPF_PROG_TEST_RUN runs the very program that sits on the interface, on a real CPU, concurrently
with the map writes and the flip from userspace, and it gives what live traffic can't: the
verdict of each packet and the flow entry it wrote. Every packet's verdict (XDP code) and its
flow entry (generation, rule id, source and destination app, action) must be one policy's
answer, that of the generation the entry records. A mix (identities from one slot, policy
from the other; a half-written slot; a flip that isn't one update) gives a combination
neither policy has: an unknown rule id (0: no entry matched), apps of one with rule of the
other, or a verdict that contradicts the entry's generation.

The fillers (a few thousand more entries per policy) make each fill take long enough that
packets are judged while the standby slot is being written, not only around the flip.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import struct
import threading

import pytest
from pyroute2 import IPRoute, netns
from scapy.all import IP, TCP, Ether, raw

from bulkhead.datapath import abi, libbpf, loader
from bulkhead.datapath.flowtable import FlowTable
from bulkhead.policy.bundle import Bundle

SEG_C, SEG_S = 1, 2
CLIENT, SERVER_X, SERVER_Y = "198.18.9.10", "198.19.9.10", "198.19.9.20"
PORT_X, PORT_Y = 443, 80
SWAPS = 60
FILLER = 4000
PASS, DROP = 2, 1
ALLOW, DENY = int(abi.Action.ALLOW), int(abi.Action.DENY)


@dataclasses.dataclass(frozen=True)
class Answer:
    retval: int
    rule_id: int
    src_app: int
    dst_app: int
    action: int


# policy -> flow -> its whole answer
ANSWERS = {
    "A": {"X": Answer(PASS, 1, 1, 2, ALLOW), "Y": Answer(DROP, 2, 1, 3, DENY)},
    "B": {"X": Answer(DROP, 13, 21, 22, DENY), "Y": Answer(PASS, 14, 21, 23, ALLOW)},
}


def v4m(addr: str) -> bytes:
    return loader.v4mapped(ipaddress.ip_address(addr))


def policy(which: str) -> Bundle:
    a = which == "A"
    c, sx, sy = (1, 2, 3) if a else (21, 22, 23)
    rx, ry = (1, 2) if a else (13, 14)
    x_act, y_act = (ALLOW, DENY) if a else (DENY, ALLOW)
    net = ipaddress.ip_network("198.18.9.0/24")
    src = [(SEG_C, v4m(str(net.network_address)), 96 + net.prefixlen, c)]  # a trie entry
    dst = [(v4m(SERVER_X), 128, sx, SEG_S), (v4m(SERVER_Y), 128, sy, SEG_S)]
    pol = [(abi.POLICY_PLEN_EXACT, c, sx, 6, PORT_X, x_act, 0, rx),
           (abi.POLICY_PLEN_EXACT, c, sy, 6, PORT_Y, y_act, 0, ry)]
    base = 1000 if a else 50000
    for i in range(FILLER):  # other apps, other addresses: never matched by the test's frames
        app = base + i
        addr = int(ipaddress.IPv4Address("198.19.128.0")) + i
        src.append((SEG_C, v4m(str(ipaddress.IPv4Address(addr))), 128, app))
        dst.append((v4m(str(ipaddress.IPv4Address(addr))), 128, app, SEG_S))
        pol.append((abi.POLICY_PLEN_EXACT, app, app, 17, 1000 + i, ALLOW, 0, base + i))
    return Bundle(
        settings={"default_action": "deny" if a else "allow", "mode": "enforce", "unknown_sni": "deny"},
        segments=[{"id": SEG_C, "name": "clients", "interfaces": ["mpc"]},
                  {"id": SEG_S, "name": "servers", "interfaces": ["mps"]}],
        apps=[], rules=[], src_entries=src, dst_entries=dst, policy_entries=pol)


@pytest.fixture(scope="module")
def gateway():
    """The production program loaded (not attached) in a private namespace with its two segments."""
    pid = os.getpid()
    ns = f"bhmix-{pid}"
    pin = loader.PIN_ROOT / f"test-mixed-{pid}"
    orig = os.open("/proc/self/ns/net", os.O_RDONLY)
    netns.create(ns)
    try:
        netns.setns(ns)
        with IPRoute() as ipr:
            for name in ("mpc", "mps"):
                ipr.link("add", ifname=name, kind="veth", peer=f"{name}-p")
            idx = {n: ipr.link_lookup(ifname=n)[0] for n in ("mpc", "mps")}
            for n in ("mpc", "mpc-p", "mps", "mps-p"):
                ipr.link("set", index=ipr.link_lookup(ifname=n)[0], state="up")
        loader.remove_pins(pin)
        dp = loader.Datapath(pin).load()
        yield ns, dp, idx
    finally:
        netns.setns(orig)
        os.close(orig)
        loader.remove_pins(pin)
        netns.remove(ns)


def syn(dst: str, dport: int, sport: int, flags: str = "S") -> bytearray:
    return bytearray(raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=CLIENT, dst=dst)
                         / TCP(sport=sport, dport=dport, flags=flags)))


SPORT_OFF = 14 + 20  # Ethernet + IPv4 without options: the TCP source port


class Traffic(threading.Thread):
    """Runs frames through the program until told to stop; checks each packet's whole answer."""

    def __init__(self, ns: str, dp: loader.Datapath, ifindex: int, gen_policy: dict[int, str], established: bool):
        super().__init__(daemon=True)
        self.ns, self.dp, self.ifindex, self.gen_policy = ns, dp, ifindex, gen_policy
        self.established = established
        self.stop = threading.Event()
        self.judged: dict[str, int] = {"A": 0, "B": 0}
        self.generations: set[int] = set()
        self.bad: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            netns.setns(self.ns)  # this thread only: BPF_PROG_TEST_RUN resolves the ifindex here
            self._run()
        except BaseException as e:  # noqa: BLE001 -- handed to the test, which fails with it
            self.error = e

    def _run(self) -> None:
        ft = FlowTable(fds=self.dp.map_fds)
        fd = self.dp.prog_fd()
        frames = {"X": syn(SERVER_X, PORT_X, 1), "Y": syn(SERVER_Y, PORT_Y, 1)}
        sport, n = 1024, 0
        est_sport = 50000
        if self.established:
            frames = {"X": syn(SERVER_X, PORT_X, est_sport, flags="A")}
        while not self.stop.is_set():
            flow = "X" if self.established or n % 2 == 0 else "Y"
            n += 1
            frame = frames[flow]
            if not self.established:
                sport = sport + 1 if sport < 65535 else 1024
                struct.pack_into("!H", frame, SPORT_OFF, sport)
            port = est_sport if self.established else sport
            dst, dport = (SERVER_X, PORT_X) if flow == "X" else (SERVER_Y, PORT_Y)
            r = libbpf.prog_test_run_xdp(fd, bytes(frame), self.ifindex)
            entry = ft.lookup(CLIENT, dst, port, dport, 6, SEG_C)
            if entry is None:
                self.bad.append(f"flow {flow} sport {port}: XDP {r.retval}, no flow entry")
                continue
            which = self.gen_policy.get(entry.generation)
            got = Answer(r.retval, entry.rule_id, entry.src_app, entry.dst_app, entry.action)
            if which is None or got != ANSWERS[which][flow]:
                self.bad.append(f"flow {flow} sport {port}: {got} under generation {entry.generation} "
                                f"(policy {which}: {ANSWERS[which][flow] if which else 'none'})")
            else:
                self.judged[which] += 1
                self.generations.add(entry.generation)
            if not self.established:  # keep the table small: this 5-tuple is never sent again
                ft.delete(CLIENT, dst, port, dport, 6, SEG_C)
                ft.delete(dst, CLIENT, dport, port, 6, SEG_S)


def test_every_packet_is_judged_wholly_by_one_generation_while_policies_swap(gateway):
    ns, dp, idx = gateway
    bundles = {"A": policy("A"), "B": policy("B")}
    gen_policy: dict[int, str] = {}  # written before each apply, read by the threads
    gen = first = dp.active_generation() + 1
    gen_policy[gen] = "A"
    dp.apply(bundles["A"], idx, gen)
    threads = [Traffic(ns, dp, idx["mpc"], gen_policy, established=e) for e in (False, True)]
    for t in threads:
        t.start()
    try:
        for i in range(SWAPS):
            gen += 1
            which = "B" if i % 2 == 0 else "A"
            gen_policy[gen] = which
            dp.apply(bundles[which], idx, gen)
            # Let each thread judge packets under this generation before the next swap (a wait,
            # not a timing claim: the loop ends when they did, or a thread died).
            seen = threading.Event()
            while not seen.wait(0.005):
                if all(gen in t.generations or t.error or t.bad or not t.is_alive() for t in threads):
                    seen.set()
    finally:
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join(30)
    for t in threads:
        assert t.error is None, f"traffic thread failed: {t.error!r}"
        assert not t.bad, f"{len(t.bad)} packet(s) judged by no single policy, e.g.:\n" + "\n".join(t.bad[:10])
    new, est = threads
    # Both policies judged many packets, and every generation saw packets of both threads.
    assert min(new.judged.values()) > SWAPS and min(est.judged.values()) > SWAPS // 2, (new.judged, est.judged)
    swapped_in = set(range(first + 1, gen + 1))
    assert swapped_in <= new.generations and swapped_in <= est.generations
