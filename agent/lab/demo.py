"""`bulkhead demo`: real traffic through a real gateway, in network namespaces.

Builds the topology of agent/lab/topology.py (two client segments that use the
SAME address, 198.18.1.10, and a core segment with payments and catalog),
starts the servers and the agent with policies/demo.yaml, then connects from
both client segments to both servers (TCP over IPv4 and IPv6, and ping) and
prints what happened next to what the policy says should happen, followed by
the agent's counters by reason. Everything is removed afterwards - also on
Ctrl-C, SIGTERM or an error. Exits 1 if any result differs from expected.
"""
from __future__ import annotations

import dataclasses
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable

from bulkhead.core.paths import POLICIES_DIR
from bulkhead.lab.runner import AgentRunner
from bulkhead.lab.topology import (
    CATALOG_V4,
    CATALOG_V6,
    CLIENT_V4,
    PAYMENTS_V4,
    PAYMENTS_V6,
    Probe,
    Topology,
    failed_probe,
    reap_stale,
)

POLICY = POLICIES_DIR / "demo.yaml"
TIMEOUT_S = 2.0  # a dropped SYN is reported as "timed out" after this


@dataclasses.dataclass
class Check:
    segment: str  # client namespace role: prod | dev
    app: str  # the client app the policy sees there
    to: str  # destination app
    addr: str
    port: int | None  # None: ping
    expect: str  # connected | refused | timeout
    why: str

    @property
    def target(self) -> str:
        where = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{self.to} {where}:{self.port} tcp" if self.port else f"{self.to} {self.addr} ping"


CHECKS = [
    Check("prod", "web", "payments", PAYMENTS_V4, 8443, "connected", "rule web-to-payments: allow"),
    Check("prod", "web", "payments", PAYMENTS_V6, 8443, "connected", "rule web-to-payments: allow"),
    Check("prod", "web", "catalog", CATALOG_V4, 8080, "connected", "rule web-to-catalog: allow"),
    Check("prod", "web", "catalog", CATALOG_V4, None, "connected", "rule web-to-catalog: allow (icmp)"),
    Check("prod", "web", "payments", PAYMENTS_V4, 8080, "timeout", "payments offers tcp/8443 only: default deny"),
    Check("dev", "laptops", "catalog", CATALOG_V4, 8080, "refused", "rule laptops-to-catalog: reject (TCP RST)"),
    Check("dev", "laptops", "catalog", CATALOG_V6, 8080, "refused", "rule laptops-to-catalog: reject (TCP RST)"),
    Check("dev", "laptops", "catalog", CATALOG_V4, None, "refused", "rule laptops-to-catalog: reject (ICMP)"),
    Check("dev", "laptops", "payments", PAYMENTS_V4, 8443, "timeout", "rule laptops-to-payments: deny (drop)"),
]


@dataclasses.dataclass
class HttpCheck:
    segment: str
    app: str
    method: str
    path: str
    expect: str  # "200", "403", or a probe result (refused / timeout)
    why: str


HTTP_PORT = 8081
HTTP_CHECKS = [
    HttpCheck("prod", "web", "GET", "/items/42", "200", "rule web-reads-catalog-api: GET /items/* allowed"),
    HttpCheck("prod", "web", "DELETE", "/items/42", "403", "rule web-reads-catalog-api: only GET/HEAD"),
    HttpCheck("prod", "web", "GET", "/admin/../items/7", "200", "normalized to /items/7 before matching"),
    HttpCheck("prod", "web", "GET", "/%61dmin", "403", "normalized to /admin: not under /items"),
    HttpCheck("dev", "laptops", "GET", "/items/42", "refused", "rule laptops-to-catalog: reject (TCP RST)"),
]


def http_probe(topo: Topology, c: HttpCheck) -> tuple[str, str]:
    """(result, detail): the HTTP status, or refused/timeout/error."""
    s = topo.socket(c.segment)
    s.settimeout(TIMEOUT_S)
    try:
        s.connect((CATALOG_V4, HTTP_PORT))
        s.sendall(f"{c.method} {c.path} HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "?"
        return status, body.decode(errors="replace").strip().splitlines()[0] if body.strip() else ""
    except OSError as e:
        p = failed_probe(e)
        return p.result, p.detail
    finally:
        s.close()


def print_rows(rows: list[tuple]) -> None:
    """Columns padded to the widest cell; a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(col.ljust(w) for col, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_http(topo: Topology) -> int:
    print(f"\nHTTP to catalog {CATALOG_V4}:{HTTP_PORT}, decided per request by the L7 verifier:")
    rows = [("FROM", "REQUEST", "RESULT", "EXPECTED", "MATCH", "WHY")]
    bad = 0
    for c in HTTP_CHECKS:
        result, detail = http_probe(topo, c)
        ok = result == c.expect
        bad += not ok
        rows.append((f"{c.segment}/{c.app}", f"{c.method} {c.path}", f"{result} {detail}".strip()[:60],
                     c.expect, "ok" if ok else "MISMATCH", c.why))
    print_rows(rows)
    return bad


def describe(p: Probe, is_ping: bool) -> str:
    ms = p.seconds * 1000
    if p.result == "connected":
        text = " / ".join(line for line in p.reply.splitlines() if line) or "ok"
        return f"connected: {text}"
    if p.result == "refused":
        how = "ICMP prohibited" if is_ping else "TCP RST"
        return f"refused by {how} in {ms:.1f} ms"
    if p.result == "timeout":
        return f"timed out after {p.seconds:.1f} s"
    return f"error: {p.detail}"


def run_checks(topo: Topology) -> list[tuple[Check, Probe]]:
    out = []
    for c in CHECKS:
        if c.port is None:
            p = topo.ping(c.segment, c.addr, timeout=TIMEOUT_S)
        else:
            p = topo.tcp(c.segment, c.addr, c.port, timeout=TIMEOUT_S, send=b"hi\n")
        out.append((c, p))
    return out


def print_table(results: list[tuple[Check, Probe]]) -> int:
    rows = [("FROM (segment/app)", "TO", "RESULT", "EXPECTED", "MATCH", "WHY")]
    bad = 0
    for c, p in results:
        ok = p.result == c.expect
        bad += not ok
        rows.append((f"{c.segment}/{c.app} {CLIENT_V4}" if ":" not in c.addr else f"{c.segment}/{c.app} fd00:1::10",
                     c.target, describe(p, c.port is None), c.expect, "ok" if ok else "MISMATCH", c.why))
    print_rows(rows)
    return bad


def print_counters(agent: AgentRunner) -> None:
    st = agent.status()
    print(f"\nagent: generation {st['generation']}, interfaces "
          + ", ".join(f"{i['name']} ({i.get('segment')}, xdp {i['mode']}, reject via {i.get('reject_path', '?')})"
                      for i in st["interfaces"]))
    print("packets by reason (status --json counters):")
    for name, c in sorted(st["counters"].items(), key=lambda kv: -kv[1]["packets"]):
        if c["packets"]:
            print(f"  {name:<20} {c['verdict']:<7} {c['packets']:>6} packets")


def print_plumbing(topo: Topology) -> None:
    rules = [ln for ln in topo.run("gw", ["ip", "rule"]).stdout.splitlines() if "proto 176" in ln]
    print("\ngateway plumbing (replies go back to the segment their flow came from):")
    for ln in rules:
        print("  ip rule " + ln.split(":", 1)[1].strip())


class Interrupted(Exception):
    """A signal during a demo: clean up and exit 130."""


def run_demo(what: str, body: Callable[[], int], logs: Callable[[], list[tuple[str, str]]],
             cleanup: Callable[[], None], cleaning: str) -> int:
    """The frame both demos run in: SIGINT/SIGTERM/SIGHUP end the demo cleanly (130), a failure
    is reported with the agents' log tails (1), and cleanup runs whatever happened, without a
    second Ctrl-C cutting it short."""
    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    rc = 1
    try:
        rc = body()
    except Interrupted as e:
        print(f"\ninterrupted ({e}); cleaning up", file=sys.stderr)
        rc = 130
    except Exception as e:
        print(f"\n{what} failed: {type(e).__name__}: {e}", file=sys.stderr)
        for name, log in logs():
            if log:
                print(f"--- {name} log (tail) ---\n{log}", file=sys.stderr)
        rc = 1
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        print(cleaning, flush=True)
        cleanup()
        for s, h in old.items():
            signal.signal(s, h)
    return rc


def verdict(bad: int, against: str, ok: str) -> int:
    """The demo's last line and exit code: every result as the policy says, or how many differ."""
    print(f"\n{bad} result(s) differ from {against}: FAILED" if bad else f"\n{ok}")
    return 1 if bad else 0


def main() -> int:
    reap_stale(("bhdemo",))
    topo = Topology("bhdemo")
    state_dir = tempfile.mkdtemp(prefix="bulkhead-demo-")
    agent = AgentRunner(topo, state_dir)

    def body() -> int:
        t0 = time.monotonic()
        print(f"building namespaces {topo.prefix}-{{gw,prod,dev,core}} ...", flush=True)
        topo.create()
        topo.start_core_servers(payments_ports=(8443,), catalog_ports=(8080,), catalog_http_ports=(HTTP_PORT,))
        print(f"starting the agent with {POLICY.relative_to(POLICY.parents[1])} (compiles the XDP program) ...",
              flush=True)
        gen = agent.start(POLICY)
        print(f"agent enforcing generation {gen} after {time.monotonic() - t0:.1f} s\n")
        print(f"prod and dev clients both have address {CLIENT_V4} (and fd00:1::10): "
              "segments tell them apart.\n")
        bad = print_table(run_checks(topo))
        bad += print_http(topo)
        print_counters(agent)
        print_plumbing(topo)
        return verdict(bad, "the policy", "every result matches policies/demo.yaml")

    def cleanup() -> None:
        agent.cleanup()
        topo.destroy()
        shutil.rmtree(state_dir, ignore_errors=True)

    rc = run_demo("demo", body, lambda: [("agent", agent.log())], cleanup,
                  "cleaning up: bulkhead down, namespaces ...")
    if rc != 130:
        print("\nmore: sudo make demo-fleet (two gateways following one policy through etcd), "
              "sudo make demo-fabric (an app reaching an app behind another gateway, by DNS, with its identity)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
