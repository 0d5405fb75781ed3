"""HTTP response time per hop, between two gateways (issue 16), with known delays on each hop.

The fabric lab (agent/lab/fabriclab.py): a-cli (web) behind gwa reaches api behind gwb by its
service address. Delay lines (FabricLab.create(delay_links=...): frames relayed with a set delay,
as tc netem would hold them; this kernel family may have no sch_netem) add known delays, one
way, on each hop:

    a-cli -> gwa           5 ms   ingress   (client <-> its gateway)
    gwb -> the underlay   20 ms   backbone  (gateway <-> gateway)
    b-srv -> gwb           2 ms   app VPC   (far gateway <-> app)
    the app               30 ms   app       (sleeps before it answers)

Each part `bulkhead requests --json` reports at gwa (the client's gateway) is within 20% or
2 ms of what was added, for plain HTTP and for TLS the gateways don't decrypt (mode
tls_inferred), over keep-alive connections of several requests; raising the backbone delay moves
the backbone part and no other.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest
import yaml

from bulkhead.lab.fabriclab import FabricLab, reap_stale
from bulkhead.lab.fabriclab import transit_policy as lab_policy
from bulkhead.lab.runner import AgentRunner

from test_fabric_routes import make_cert
from test_fabric_transit import DNS_A, Fabric

pytestmark = [pytest.mark.root, pytest.mark.integration]

HTTP_PORT, TLS_PORT = 8080, 8443
APP_SLEEP = 0.030
DELAYS = {"ingress": 5.0, "backbone": 20.0, "app_vpc": 2.0, "app": APP_SLEEP * 1e3}
REQUESTS = 7  # per measurement: the median of each part is compared

SERVER = r"""
import http.server, socketserver, ssl, sys, threading, time
sleep, cert, key = float(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # the answer in one write (headers then body would meet Nagle and a delayed ACK)
    def do_GET(self):
        time.sleep(sleep)
        body = b"ok " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
plain = S(("0.0.0.0", %d), H)
tls = S(("0.0.0.0", %d), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
for s in (plain, tls):
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
""" % (HTTP_PORT, TLS_PORT)


def hop_policy() -> dict:
    return lab_policy(
        segments=[
            {"name": "a-cli", "gateway": "gwa", "interfaces": ["bh-cli"], "dns": list(DNS_A)},
            {"name": "b-srv", "gateway": "gwb", "interfaces": ["bh-srv"]},
        ],
        apps=[
            {"name": "web", "segment": "a-cli", "addresses": ["198.18.1.0/24"]},
            {"name": "api", "segment": "b-srv", "addresses": ["198.18.1.20/32"],
             "ports": [f"tcp/{HTTP_PORT}", f"tcp/{TLS_PORT}"], "publish": ["api.apps.example"]},
        ],
        rules=[{"name": "web-api", "from": "web", "to": "api", "ports": [f"tcp/{HTTP_PORT}", f"tcp/{TLS_PORT}"]}],
    )


class Hops(Fabric):
    def delay(self, link: str, ms: float) -> None:
        self.lab.set_delay(link, ms)
        time.sleep(0.1)  # frames already held keep their old delay

    def requests(self, mode: str, port: int, after: int) -> list[dict]:
        """gwa's fabric requests to api:port in `mode`, newer than `after` (their seq)."""
        p = self.agents["gwa"].cli("requests", "--json", "--limit", "1000")
        assert p.returncode == 0, p.stderr
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        return [r for r in recs if r.get("source") == "fabric" and r["mode"] == mode and r["dport"] == port
                and r["seq"] > after]

    def last_seq(self) -> int:
        p = self.agents["gwa"].cli("requests", "--json", "--limit", "1000")
        seqs = [json.loads(line).get("seq", 0) for line in p.stdout.splitlines()
                if line.strip() and '"source": "fabric"' in line]
        return max(seqs, default=0)

    def client(self, vip: str, port: int, tls: bool, n: int = REQUESTS) -> None:
        """n GETs on one keep-alive connection from a-cli (TLS: not verified; the gateways don't decrypt)."""
        code = (
            "import http.client, ssl, sys\n"
            "host, port, tls, n = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4])\n"
            "if tls:\n"
            "    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE\n"
            "    c = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)\n"
            "else:\n"
            "    c = http.client.HTTPConnection(host, port, timeout=10)\n"
            "for i in range(n):\n"
            "    c.request('GET', f'/r{i}', headers={'Host': 'api.apps.example'})\n"
            "    r = c.getresponse(); assert r.read() == f'ok /r{i}'.encode(), i\n"
            "c.close()\n")
        p = self.lab.run("a-cli", [sys.executable, "-c", code, vip, str(port), "1" if tls else "0", str(n)],
                         check=False, timeout=60)
        assert p.returncode == 0, p.stderr

    def measure(self, mode: str) -> dict[str, float]:
        """The median of each part over REQUESTS requests (HTTP or TLS), as gwa reports them."""
        port, tls = (TLS_PORT, True) if mode == "tls_inferred" else (HTTP_PORT, False)
        after = self.last_seq()
        self.client(self.vip("api.apps.example"), port, tls)
        deadline = time.monotonic() + 10
        while True:
            recs = self.requests(mode, port, after)
            if len(recs) >= REQUESTS or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(recs) == REQUESTS, recs
        for r in recs:
            assert r["inferred"] == (mode == "tls_inferred") and r["via"], r
            assert None not in r["hops_ms"].values(), r
        return {k: statistics.median(r["hops_ms"][k] for r in recs) for k in (*DELAYS, "total")}


def close(got: float, want: float) -> bool:
    return abs(got - want) <= max(0.2 * want, 2.0)


@pytest.fixture(scope="module")
def hops(tmp_path_factory):
    reap_stale()
    lab = FabricLab()
    d = tmp_path_factory.mktemp("hops")
    agents: dict[str, AgentRunner] = {}
    try:
        lab.create(delay_links=("a-cli", "gwb", "b-srv"))
        make_cert(d, "api")
        policy = d / "hops.yaml"
        policy.write_text(yaml.safe_dump(hop_policy(), sort_keys=False))
        srv = lab.spawn("b-srv", [sys.executable, "-c", SERVER, str(APP_SLEEP), str(d / "api.crt"),
                                  str(d / "api.key")], stdout=subprocess.PIPE, text=True)
        assert srv.stdout.readline().strip() == "ready"
        for gw in ("gwa", "gwb"):
            agents[gw] = AgentRunner(lab.gateway(gw), d / f"state-{gw}")
            agents[gw].start(policy, args=("--gateway", gw, "--metrics", "off"))
        h = Hops(lab, agents, policy)
        h.delay("a-cli", DELAYS["ingress"])
        h.delay("gwb", DELAYS["backbone"])
        h.delay("b-srv", DELAYS["app_vpc"])
        # Warm: the first connection's handshake also waits for the gateways' neighbour lookups.
        h.client(h.vip("api.apps.example"), HTTP_PORT, False, 1)
        yield h
    finally:
        for a in agents.values():
            a.cleanup()
        lab.destroy()


@pytest.mark.parametrize("mode", ["http", "tls_inferred"])
def test_each_part_is_the_delay_added_on_its_hop(hops, mode):
    got = hops.measure(mode)
    bad = {k: (got[k], want) for k, want in DELAYS.items() if not close(got[k], want)}
    assert not bad, f"{mode}: (reported, added) ms per hop: {bad}; all: {got}"
    assert close(got["total"], sum(DELAYS.values())), got


def test_changing_one_delay_moves_only_its_part(hops):
    before = hops.measure("http")
    hops.delay("gwb", 40.0)
    try:
        after = hops.measure("http")
    finally:
        hops.delay("gwb", DELAYS["backbone"])
    assert close(after["backbone"], 40.0), after
    for k in ("ingress", "app_vpc", "app"):
        assert abs(after[k] - before[k]) <= max(0.2 * before[k], 2.0), (k, before, after)

