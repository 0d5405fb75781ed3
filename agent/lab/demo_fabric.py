"""`bulkhead demo --fabric` (`make demo-fabric`): a flow from an app behind one gateway to an app
behind another, carried with its identity.

Builds the fabric lab (lab/fabriclab.py: gateways gwa and gwb joined by an underlay bridge, the
client CIDR behind gwa also the server CIDR behind gwb, a rogue host on the underlay), writes one
policy for both gateways and starts `bulkhead agent run --policy FILE --gateway NAME` in each.
Then, with real traffic and the agents' own output: a-cli (app web, at gwa) resolves
api.apps.example through gwa's DNS to a service address gwa owns, connects to it, and gets the
echo of b-srv (app api, behind gwb), which saw the client's real address; `bulkhead flows` at both
gateways; a VXLAN packet forged by the rogue host with web's identity, dropped at gwb; the
transit counters of `bulkhead status`; and b-cli (app partner, at gwb, no rule to api) getting
NXDOMAIN and nothing when it connects to the service address anyway. Everything is removed
afterwards (agents, pins, nft tables, transit devices, namespaces), also on Ctrl-C, SIGTERM or
an error. Exits 1 if any result differs from what the policy says.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bulkhead.lab.demo import run_demo, verdict
from bulkhead.lab.fabriclab import GATEWAYS, POOLS, TRANSIT_PORT, FabricLab, host_addr, reap_stale
from bulkhead.lab.fabriclab import transit_policy as lab_policy
from bulkhead.lab.runner import START_TIMEOUT, AgentRunner

PORT = 8080
DNS_A = ("198.18.1.1", "fd00:1::1")  # gwa's DNS in segment a-cli (its addresses on bh-cli)
DNS_B = ("198.19.9.1", "fd00:99::1")  # gwb's DNS in segment b-cli
NAME = "api.apps.example"
FORGED = 3  # frames the rogue host sends


def fabric_policy() -> dict:
    """One policy for both gateways: web (a-cli, at gwa) may reach api (b-srv, at gwb) on
    tcp/8080 by its published name; partner (b-cli, at gwb) has no rule to it."""
    return lab_policy(
        segments=[
            {"name": "a-cli", "gateway": "gwa", "interfaces": ["bh-cli"], "dns": list(DNS_A)},
            {"name": "b-srv", "gateway": "gwb", "interfaces": ["bh-srv"]},
            {"name": "b-cli", "gateway": "gwb", "interfaces": ["bh-cli"], "dns": list(DNS_B)},
        ],
        apps=[
            {"name": "web", "segment": "a-cli", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
            {"name": "api", "segment": "b-srv", "addresses": ["198.18.1.20/32", "fd00:1::20/128"],
             "ports": [f"tcp/{PORT}"], "publish": [NAME]},
            {"name": "partner", "segment": "b-cli", "addresses": ["198.19.9.0/24", "fd00:99::/64"]},
        ],
        rules=[{"name": "web-api", "from": "web", "to": "api", "ports": [f"tcp/{PORT}"]}],
    )


class Demo:
    """The lab, its two agents, and the tally of results that differ from the policy."""

    def __init__(self, lab: FabricLab, agents: dict[str, AgentRunner], policy: Path):
        self.lab, self.agents, self.policy = lab, agents, policy
        self.bad = 0

    def check(self, ok: bool, expected: str) -> None:
        if not ok:
            self.bad += 1
            print(f"   MISMATCH: expected {expected}")

    def resolve(self, role: str, server: str, qtype: str):
        from dnslib import DNSRecord

        s = self.lab.socket(role, socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(DNSRecord.question(NAME, qtype).pack(), (server, 53))
            return DNSRecord.parse(s.recv(4096))
        except OSError:
            return None
        finally:
            s.close()

    def status(self, gw: str) -> dict:
        return self.agents[gw].status()

    def flow_events(self, gw: str) -> list[dict]:
        p = self.agents[gw].cli("flows", "--json")
        if p.returncode != 0:
            raise RuntimeError(f"bulkhead flows --json at {gw}: exit {p.returncode}: {p.stderr.strip()}")
        return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]


def indent(text: str, by: str = "   ") -> str:
    return "\n".join(by + ln if ln else ln for ln in text.rstrip().splitlines())


def transit_counts(st: dict) -> dict[str, int]:
    ev, ctr = st.get("events") or {}, st.get("counters") or {}
    out = {k: int(ev.get(k, 0)) for k in ("transit_encap", "transit_decap", "vip_nat")}
    out.update({k: int(c.get("packets", 0)) for k, c in ctr.items() if k.startswith("transit_")})
    return out


def step_dns(d: Demo) -> dict[int, str]:
    """1. a-cli resolves the name through gwa: the service addresses, per family."""
    from dnslib import QTYPE, RCODE

    print(f"\n1. a-cli ({host_addr('a-cli')}, app web, at gwa) asks gwa's DNS ({DNS_A[0]}) for {NAME}:")
    vips: dict[int, str] = {}
    for family, qtype in ((4, "A"), (6, "AAAA")):
        ans = d.resolve("a-cli", DNS_A[0], qtype)
        if ans is None:
            print(f"   {qtype}: no answer")
            d.check(False, f"an {qtype} record")
            continue
        rrs = [rr for rr in ans.rr if rr.rtype == getattr(QTYPE, qtype)]
        print(f"   {qtype}: {RCODE.get(ans.header.rcode)}" + "".join(f"\n   {rr.toZone()}" for rr in rrs))
        if ans.header.rcode == RCODE.NOERROR and rrs:
            vips[family] = str(rrs[0].rdata)
        d.check(family in vips and vips[family].startswith("198.19.255." if family == 4 else "fd00:ff::"),
                f"NOERROR with a service address from {POOLS[0 if family == 4 else 1]}")
    if vips:
        print(f"   a service address gwa owns (pool {', '.join(POOLS)}), not api's real "
              f"{host_addr('b-srv')} / {host_addr('b-srv', 6)}, which is inside a-cli's own subnet")
    return vips


def step_connect(d: Demo, vips: dict[int, str]) -> None:
    """2. a-cli connects to the service address; b-srv answers with what it saw."""
    print("\n2. a-cli connects to the service address; b-srv's echo server answers '<host> <client address "
          "it saw>: <what it read>':")
    for family, vip in sorted(vips.items()):
        where = f"[{vip}]:{PORT}" if family == 6 else f"{vip}:{PORT}"
        payload = f"hello from a-cli over IPv{family}"
        t0 = time.monotonic()
        r = d.lab.tcp_echo("a-cli", vip, PORT, payload.encode(), timeout=3.0)
        ms = (time.monotonic() - t0) * 1000
        shown = f"reply in {ms:.1f} ms: {r.reply!r}" if r.ok else f"{r.result}: {r.detail}"
        print(f"   a-cli -> {where} tcp: {shown}")
        d.check(r.ok and r.reply == f"b-srv {host_addr('a-cli', family)}: {payload}",
                f"b-srv's echo naming the client's real address {host_addr('a-cli', family)}")
    print(f"   gwa judged web -> api (rule web-api), translated the service address to api's real address and "
          f"sent it to gwb in VXLAN (udp/{TRANSIT_PORT}: api's segment in the VNI, web's app id in the GBP "
          "field); gwb judged it again by that identity and delivered it. The replies took the same way back, "
          "and a-cli saw them come from the service address.")


def wait_flows(d: Demo, gw: str, timeout: float = 5.0) -> list[dict]:
    """The flow log's events at `gw` once a web -> api flow is among them (the agent reads the
    kernel's ring buffer as events come: normally at once)."""
    deadline = time.monotonic() + timeout
    while True:
        events = d.flow_events(gw)
        if any(e.get("src_app") == "web" and e.get("dst_app") == "api" for e in events) \
                or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


def step_flows(d: Demo) -> None:
    """3. `bulkhead flows` at both gateways."""
    print("\n3. the flow log at each gateway:")
    for gw in GATEWAYS:
        events = wait_flows(d, gw)
        p = d.agents[gw].cli("flows")
        print(f"\n   {gw}$ bulkhead flows")
        print(indent(p.stdout if p.returncode == 0 else p.stderr))
        d.check(any(e.get("src_app") == "web" and e.get("dst_app") == "api" and e.get("verdict") == "pass"
                    for e in events), f"a web -> api flow passed at {gw}")


def step_hops(d: Demo, vips: dict[int, str], n: int = 3) -> None:
    """4. HTTP requests across, timed per hop: `bulkhead requests` at gwa."""
    vip = vips.get(4)
    if vip is None:
        return
    print(f"\n4. a-cli sends {n} HTTP requests to {vip}:{PORT}; each is timed per hop, gwa on its clock, gwb on its "
          "own (gwb's part comes back in the VNI of its answers):")
    for i in range(n):
        d.lab.tcp_echo("a-cli", vip, PORT, f"GET /demo/{i} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode(), timeout=3.0)
    deadline = time.monotonic() + 5
    while True:
        p = d.agents["gwa"].cli("requests", "--json")
        recs = [r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.strip())
                if r.get("source") == "fabric"] if p.returncode == 0 else []
        if len(recs) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    p = d.agents["gwa"].cli("requests")
    print("\n   gwa$ bulkhead requests")
    print(indent(p.stdout if p.returncode == 0 else p.stderr))
    print("   total = what a-cli waited; ingress: a-cli <-> gwa; backbone: gwa <-> gwb; app_vpc: gwb <-> b-srv; "
          "app: b-srv's own time (docs/visibility.md). Across a fleet: bulkhead fleet latency.")
    d.check(len(recs) >= n and all(None not in r["hops_ms"].values() for r in recs[-n:]),
            f"{n} requests timed at gwa with every part")


def step_forge(d: Demo, ids: dict[str, int], segs: dict[str, int]) -> bool:
    """4. The rogue host forges transit with web's identity: dropped at gwb. False: not run."""
    print(f"\n5. rogue ({host_addr('rogue')}), a host on the underlay that is no gateway, sends gwb {FORGED} "
          f"VXLAN packets carrying web's app id ({ids['web']}) into api's segment b-srv (VNI {segs['b-srv']}): "
          f"a SYN from {host_addr('a-cli')} to api {host_addr('b-srv')}:{PORT}")
    if importlib.util.find_spec("scapy") is None:
        print("   skipped: scapy (the test extra, which `make setup` installs) is not installed")
        d.check(False, "scapy to craft the packets")
        return False
    d.lab.forge_transit("rogue", host_addr("rogue"), "gwb", vni=segs["b-srv"], gbp=ids["web"], dport=PORT,
                        transit_port=TRANSIT_PORT, count=FORGED)
    return True


def wait_counter(d: Demo, gw: str, name: str, at_least: int, timeout: float = 5.0) -> dict:
    """gw's status once its counter `name` reached `at_least` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        st = d.status(gw)
        if transit_counts(st).get(name, 0) >= at_least or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def step_counters(d: Demo, before: dict[str, dict[str, int]], forged: bool) -> None:
    """5. The transit counters of both gateways' status, before and after."""
    sts = {gw: d.status(gw) for gw in GATEWAYS}
    if forged:
        sts["gwb"] = wait_counter(d, "gwb", "transit_unknown_peer", before["gwb"].get("transit_unknown_peer", 0) + FORGED)
    after = {gw: transit_counts(st) for gw, st in sts.items()}
    print("\n6. transit counters since the agents started (`bulkhead status --json`: events transit_encap/"
          "decap and vip_nat, drops by reason transit_*):")
    names = ["transit_encap", "transit_decap", "vip_nat"]
    names += sorted({k for c in after.values() for k in c if k.startswith("transit_") and k not in names
                     and (c.get(k) or k == "transit_unknown_peer")})
    widths = [len(n) for n in names]
    print("   " + "GATEWAY  " + "  ".join(n.rjust(w) for n, w in zip(names, widths)))
    for gw in GATEWAYS:
        print("   " + f"{gw:<7}  " + "  ".join(str(after[gw].get(n, 0)).rjust(w) for n, w in zip(names, widths)))
    print("   gwa encapsulates what a-cli sends and decapsulates b-srv's replies; gwb the other way round; "
          "vip_nat: gwa's translations of the service address")
    grew = {gw: {n: after[gw].get(n, 0) - before[gw].get(n, 0) for n in after[gw]} for gw in GATEWAYS}
    for gw, what in (("gwa", "transit_encap"), ("gwa", "transit_decap"), ("gwb", "transit_decap"),
                     ("gwb", "transit_encap"), ("gwa", "vip_nat")):
        d.check(grew[gw].get(what, 0) > 0, f"{what} to grow at {gw}")
    if forged:
        d.check(grew["gwb"].get("transit_unknown_peer", 0) >= FORGED,
                f"gwb to drop the {FORGED} forged packets as transit_unknown_peer")
    p = d.agents["gwb"].cli("status")
    lines = p.stdout.splitlines()
    keep = [ln for ln in lines if ln.startswith("transit:")]
    if "packets by reason:" in lines:
        i = lines.index("packets by reason:")
        keep.append(lines[i])
        for ln in lines[i + 1:]:
            if not ln.startswith("  "):
                break
            keep.append(ln)
    print("\n   gwb$ bulkhead status   (its transit line and packets by reason)")
    print(indent("\n".join(keep) if keep else (p.stdout or p.stderr)))


def step_nxdomain(d: Demo, vips: dict[int, str]) -> None:
    """6. b-cli (no rule to api) gets NXDOMAIN, and nothing from the service address."""
    from dnslib import RCODE

    print(f"\n7. b-cli ({host_addr('b-cli')}, app partner, at gwb: no rule to api) asks gwb's DNS ({DNS_B[0]}) "
          f"for {NAME}:")
    ans = d.resolve("b-cli", DNS_B[0], "A")
    rcode = RCODE.get(ans.header.rcode) if ans is not None else "no answer"
    print(f"   A: {rcode}" + (f" ({len(ans.rr)} records)" if ans is not None and ans.rr else "")
          + "   (DNS does not reveal an app a segment can't reach)")
    d.check(ans is not None and ans.header.rcode == RCODE.NXDOMAIN and not ans.rr, "NXDOMAIN")
    if 4 in vips:
        r = d.lab.tcp_echo("b-cli", vips[4], PORT, b"sneak", timeout=1.0)
        shown = f"connected: {r.reply!r}" if r.ok else ("timed out after 1.0 s: dropped at gwb" if r.result == "timeout"
                                                        else f"{r.result}: {r.detail}")
        print(f"   connecting to {vips[4]}:{PORT} anyway (gwb owns the same service addresses): {shown}")
        d.check(not r.ok, "no connection")


def start_agents(agents: dict[str, AgentRunner], policy: Path, starting: list[threading.Thread]) -> dict[str, int]:
    """`agent run --policy POLICY --gateway NAME` at every gateway, side by side (each compiles the
    XDP program: most of the start); their generations. The threads go into `starting` for the
    cleanup; the first failure is raised here."""
    out: dict[str, int | Exception] = {}

    def start(gw: str) -> None:
        try:
            out[gw] = agents[gw].start(policy, args=("--gateway", gw, "--metrics", "off"))
        except Exception as e:  # raised below, in the demo's thread
            out[gw] = e

    starting += [threading.Thread(target=start, args=(gw,), name=f"start-{gw}", daemon=True) for gw in agents]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    for gw in agents:
        if isinstance(out.get(gw), Exception):
            raise RuntimeError(f"{gw}: {out[gw]}")
    return {gw: int(out[gw]) for gw in agents}


def main() -> int:
    reap_stale()
    lab = FabricLab()
    state = Path(tempfile.mkdtemp(prefix="bulkhead-demo-fabric-"))
    agents = {gw: AgentRunner(lab.gateway(gw), state / gw) for gw in GATEWAYS}
    starting: list[threading.Thread] = []

    def body() -> int:
        from bulkhead.policy import load_policy

        t0 = time.monotonic()
        print(f"building two gateways ({', '.join(GATEWAYS)}) joined by an underlay bridge, with a client and a "
              f"server segment each, in namespaces {lab.prefix}-* ...", flush=True)
        lab.create()
        policy = state / "fabric.yaml"
        policy.write_text(yaml.safe_dump(fabric_policy(), sort_keys=False))
        bundle, _ = load_policy([str(policy)])
        ids = {a["name"]: a["id"] for a in bundle.apps}
        segs = {s["name"]: s["id"] for s in bundle.segments}
        print(f"  gwa (transit {host_addr('gwa')}): a-cli {host_addr('a-cli')}/24 (app web)\n"
              f"  gwb (transit {host_addr('gwb')}): b-srv {host_addr('b-srv')} (app api, tcp/{PORT}, "
              f"published as {NAME}), b-cli {host_addr('b-cli')}/24 (app partner)\n"
              f"  a-cli's subnet 198.18.1.0/24 holds b-srv's address too: the fabric carries identity, "
              "not addresses")
        print(f"policy {policy.name}: rule web-api (web -> api tcp/{PORT}); partner has no rule; "
              f"transit udp/{TRANSIT_PORT} between the gateways")
        lab.serve_echo("b-srv", PORT)
        print(f"starting an agent per gateway: bulkhead agent run --policy {policy.name} --gateway NAME "
              "(compiles the XDP program) ...", flush=True)
        gens = start_agents(agents, policy, starting)
        print("both gateways enforcing (" + ", ".join(f"{gw} generation {g}" for gw, g in gens.items())
              + f") after {time.monotonic() - t0:.1f} s")
        d = Demo(lab, agents, policy)
        before = {gw: transit_counts(d.status(gw)) for gw in GATEWAYS}
        vips = step_dns(d)
        step_connect(d, vips)
        step_flows(d)
        step_hops(d, vips)
        forged = step_forge(d, ids, segs)
        step_counters(d, before, forged)
        step_nxdomain(d, vips)
        return verdict(d.bad, "the policy", "the flow crossed from gwa to gwb with its identity, as the policy says")

    def logs() -> list[tuple[str, str]]:
        return [(f"{gw} agent", a.log()) for gw, a in agents.items()]

    def cleanup() -> None:
        # An agent still starting (interrupted during the compile): kill what was spawned, and let
        # its start() return before the cleanup, so no agent is spawned behind it.
        if any(t.is_alive() for t in starting):
            for p in list(lab.procs):
                if p.poll() is None:
                    p.kill()
            for t in starting:
                t.join(timeout=START_TIMEOUT)
        for a in agents.values():
            a.cleanup()
        lab.destroy()
        shutil.rmtree(state, ignore_errors=True)

    return run_demo("fabric demo", body, logs, cleanup,
                    "cleaning up: bulkhead down at both gateways (programs, pins, nft tables, transit devices), "
                    "namespaces ...")


if __name__ == "__main__":
    sys.exit(main())
