"""Routers (issue 15, part 3): one service address, the backend chosen by TLS SNI or HTTP Host.

Real traffic from the client namespaces (agent/lab/topology.py) to the router's service
address, through the XDP program (action L7 for apps with a rule to one of its backends),
TPROXY and the verifier, to two backends in core:
- payments (198.19.0.10) and catalog (198.19.0.20) each serve TLS on :9443 with their own
  self-signed certificate (generated here) and say who they are, then echo; and HTTP on :9080,
  answering their name, the path and the client address they saw;
- prod resolves shop.example through the gateway (198.18.1.1) and reaches the VIP: SNI
  api.shop.example -> payments' certificate, www.shop.example -> catalog's (no decryption: the
  client verifies the backend's own certificate); Host shop.example /api/x -> payments, / ->
  catalog, routed again on the same keep-alive connection;
- a name with no route: a TLS alert (unrecognized_name), an HTTP 421; a malformed ClientHello:
  reset; each counted;
- dev has no rule to the backends: NXDOMAIN, and connecting to the VIP anyway gets nothing;
- a deny rule web -> payments beats the allow: refused although routed (access_denied), while
  catalog's routes still pass;
- a policy apply between two requests on one connection: the next is decided in the new
  policy; a backend that refuses: 502; IPv4 and IPv6; many connections in a row.
"""
from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RCODE, DNSRecord

from bulkhead.lab.topology import (CATALOG_V4, CATALOG_V6, CLIENT_V4, CLIENT_V6, PAYMENTS_V4, PAYMENTS_V6,
                                   recv_exact, recv_line)

pytestmark = [pytest.mark.root, pytest.mark.integration]

GW_DNS = "198.18.1.1"
POOLS = ["198.19.255.0/24", "fd00:ff::/120"]
TLS_PORT, HTTP_PORT = 9443, 9080
CLOSED_PORT = 9081  # the router's, where no backend listens

BACKENDS = textwrap.dedent("""
    # payments and catalog: TLS (their own certificate; name line, then echo) and HTTP
    import json, socket, socketserver, ssl, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def tls_listener(addr, port):
        ls = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(64)
        return ls

    def tls_server(name, ls, cert, key):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

        def one(c):
            try:
                with ctx.wrap_socket(c, server_side=True) as s:
                    s.sendall(name.encode() + b"\\n")
                    while True:
                        data = s.recv(65536)
                        if not data:
                            break
                        s.sendall(data)
            except (OSError, ssl.SSLError):
                pass

        while True:
            c, _ = ls.accept()
            threading.Thread(target=one, args=(c,), daemon=True).start()

    def http_server(name, addr, port):
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = json.dumps({"backend": name, "path": self.path, "host": self.headers.get("Host"),
                                   "client": self.client_address[0]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        class S(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            daemon_threads = True

            def server_bind(self):  # without HTTPServer's getfqdn (no resolver here)
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = addr, port

        return S((addr, port), H)

    d = sys.argv[1]
    for name, addrs in (("payments", sys.argv[2:4]), ("catalog", sys.argv[4:6])):
        for a in addrs:
            threading.Thread(target=tls_server, args=(name, tls_listener(a, %d), f"{d}/{name}.crt", f"{d}/{name}.key"),
                             daemon=True).start()
            threading.Thread(target=http_server(name, a, %d).serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""" % (TLS_PORT, HTTP_PORT))


def make_cert(d: Path, name: str) -> bytes:
    """A self-signed certificate for `name` (SANs: the router's names); its DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.shop.example"),
                                                        x509.DNSName("shop.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.public_bytes(serialization.Encoding.DER)


def route_policy(gw, extra_rules: list[dict] = ()) -> str:
    rules = [*extra_rules,
             gw.rule("web", "payments", ports=[f"tcp/{TLS_PORT}", f"tcp/{HTTP_PORT}"], name="web-pay"),
             gw.rule("web", "catalog", ports=[f"tcp/{TLS_PORT}", f"tcp/{HTTP_PORT}", f"tcp/{CLOSED_PORT}"],
                     name="web-cat")]
    doc = yaml.safe_load(gw.policy_yaml(*rules))
    doc["fabric"] = {"service_addresses": POOLS}
    for seg in doc["segments"]:
        if seg["name"] in ("prod", "dev"):
            seg["dns"] = [GW_DNS]
    doc["apps"].append({
        "name": "shop", "publish": ["shop.example", "*.shop.example"],
        "ports": [f"tcp/{TLS_PORT}", f"tcp/{HTTP_PORT}", f"tcp/{CLOSED_PORT}"],
        "routes": [{"sni": "api.shop.example", "to": "payments"},
                   {"sni": "*.shop.example", "to": "catalog"},
                   {"host": "shop.example", "path": "/api/", "to": "payments"},
                   {"host": "shop.example", "to": "catalog"},
                   ]})
    return yaml.safe_dump(doc, sort_keys=False)


def apply(gw, text: str) -> None:
    p = gw.agent.apply(gw.write(text))
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def routes(gateway, tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ders = {name: make_cert(d, name) for name in ("payments", "catalog")}
    script = d / "backends.py"
    script.write_text(BACKENDS)
    p = gateway.topo.spawn("core", [sys.executable, str(script), str(d), PAYMENTS_V4, PAYMENTS_V6,
                                    CATALOG_V4, CATALOG_V6], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("ready"), f"backends did not start: {line!r}"
    apply(gateway, route_policy(gateway))
    gateway.ders = ders
    yield gateway


def resolve(topo, ns: str, name: str, qtype: str = "A"):
    q = DNSRecord.question(name, qtype)
    s = topo.socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    try:
        s.sendto(q.pack(), (GW_DNS, 53))
        return DNSRecord.parse(s.recv(4096))
    finally:
        s.close()


def vip(gw, qtype: str = "A") -> str:
    r = resolve(gw.topo, "prod", "shop.example", qtype)
    assert r.header.rcode == RCODE.NOERROR, r
    (a,) = [str(rr.rdata) for rr in r.rr if rr.rtype == getattr(QTYPE, qtype)]
    return a


def tls(gw, ns: str, addr: str, name: str | None, timeout: float = 5.0):
    """Connect with TLS; (certificate DER, the server's first line, the echo of b"ping")."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is compared, byte for byte, below
    raw = gw.topo.socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET)
    raw.settimeout(timeout)
    raw.connect((addr, TLS_PORT))
    with ctx.wrap_socket(raw, server_hostname=name) as s:
        der = s.getpeercert(binary_form=True)
        line = recv_line(s)
        s.sendall(b"ping" * 5000)
        echo = recv_exact(s, 20000)
    return der, line.strip(), echo


def http_get(gw, ns: str, addr: str, paths: list[str], host: str = "shop.example", timeout: float = 5.0,
             port: int = HTTP_PORT):
    """GETs on one keep-alive connection; [(status, body)]."""
    s = gw.topo.socket(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.settimeout(timeout)
    out = []
    try:
        s.connect((addr, port))
        f = s.makefile("rb")
        for path in paths:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status = int(f.readline().split()[1])
            headers = {}
            while True:
                ln = f.readline().strip()
                if not ln:
                    break
                k, _, v = ln.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            body = f.read(int(headers.get("content-length", "0")))
            out.append((status, body))
    finally:
        s.close()
    return out


def records(gw) -> list[dict]:
    p = gw.agent.cli("requests", "--json", "--limit", "0")
    assert p.returncode == 0, p.stderr
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]


def verifier(gw) -> dict:
    return gw.agent.status()["verifier"]


def test_prod_resolves_the_router_and_dev_gets_nxdomain(routes):
    gw = routes
    a = vip(gw)
    assert a.startswith("198.19.255.")
    assert vip(gw, "AAAA").startswith("fd00:ff::")
    assert resolve(gw.topo, "prod", "api.shop.example").header.rcode == RCODE.NOERROR  # the wildcard
    for name in ("shop.example", "api.shop.example"):
        assert resolve(gw.topo, "dev", name).header.rcode == RCODE.NXDOMAIN, name


@pytest.mark.parametrize("family", ["A", "AAAA"])
def test_sni_picks_the_backend_whose_certificate_answers(routes, family):
    gw = routes
    addr = vip(gw, family)
    der, line, echo = tls(gw, "prod", addr, "api.shop.example")
    assert der == gw.ders["payments"] and line == "payments" and echo == b"ping" * 5000
    der, line, _ = tls(gw, "prod", addr, "www.shop.example")
    assert der == gw.ders["catalog"] and line == "catalog"
    recs = [r for r in records(gw) if r.get("router") == "shop" and r.get("method") == "TLS"]
    last = {r["host"]: r for r in recs}
    assert last["api.shop.example"]["backend"] == "payments"
    assert last["api.shop.example"]["route"] == "sni api.shop.example"
    assert last["api.shop.example"]["rule"] == "web-pay" and last["api.shop.example"]["verdict"] == "allow"
    assert last["api.shop.example"]["bytes_out"] >= 20000
    assert last["www.shop.example"]["backend"] == "catalog" and last["www.shop.example"]["route"] == "sni *.shop.example"


def test_host_and_path_pick_the_backend_per_request(routes):
    gw = routes
    addr = vip(gw)
    got = http_get(gw, "prod", addr, ["/api/x", "/", "/api/y", "/apix"])
    bodies = [json.loads(b) for _, b in got]
    assert [s for s, _ in got] == [200] * 4
    assert [b["backend"] for b in bodies] == ["payments", "catalog", "payments", "catalog"]
    assert bodies[0]["path"] == "/api/x" and bodies[0]["host"] == "shop.example"
    assert {b["client"] for b in bodies} == {CLIENT_V4}  # the backend sees the client
    recs = [r for r in records(gw) if r.get("router") == "shop" and r.get("method") == "GET"][-4:]
    assert [(r["path"], r["backend"], r["route"]) for r in recs] == [
        ("/api/x", "payments", "host shop.example /api/"), ("/", "catalog", "host shop.example"),
        ("/api/y", "payments", "host shop.example /api/"), ("/apix", "catalog", "host shop.example")]
    assert {r["dst_app"] for r in recs} == {"payments", "catalog"}
    text = gw.agent.cli("requests", "--limit", "4").stdout
    assert "shop>payments" in text and "shop>catalog" in text
    # and over IPv6: the backend's /128, from the client's own address
    (status, body), = http_get(gw, "prod", vip(gw, "AAAA"), ["/api/v6"])
    assert status == 200 and json.loads(body)["backend"] == "payments"
    assert json.loads(body)["client"] == CLIENT_V6


def test_a_policy_apply_between_requests_on_one_connection(routes):
    """The next request is routed and decided in the policy in force, on a fresh upstream."""
    gw = routes
    s = gw.topo.socket("prod")
    s.settimeout(5)
    s.connect((vip(gw), HTTP_PORT))
    f = s.makefile("rb")

    def get(path: str) -> tuple[int, bytes]:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode())
        status = int(f.readline().split()[1])
        n = 0
        while (ln := f.readline().strip()):
            k, _, v = ln.decode().partition(":")
            n = int(v) if k.strip().lower() == "content-length" else n
        return status, f.read(n)

    try:
        assert json.loads(get("/api/x")[1])["backend"] == "payments"
        apply(gw, route_policy(gw, [gw.rule("web", "catalog", ports=["tcp/1"], name="unrelated")]))
        assert json.loads(get("/api/y")[1])["backend"] == "payments"
        deny = gw.rule("web", "payments", action="deny", ports=[f"tcp/{HTTP_PORT}"], name="no-pay-http")
        apply(gw, route_policy(gw, [deny]))
        assert get("/api/z")[0] == 403
        status, body = get("/")
        assert status == 200 and json.loads(body)["backend"] == "catalog"
    finally:
        s.close()
        apply(gw, route_policy(gw))


def test_a_name_with_no_route_is_refused_and_counted(routes):
    gw = routes
    addr = vip(gw)
    before = verifier(gw)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls(gw, "prod", addr, "a.b.shop.example")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls(gw, "prod", addr, None)  # no server name
    assert http_get(gw, "prod", addr, ["/"], host="other.example")[0][0] == 421
    # a ClientHello that doesn't parse: reset
    s = gw.topo.socket("prod")
    s.settimeout(5)
    s.connect((addr, TLS_PORT))
    s.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a ServerHello from the client
    with pytest.raises(ConnectionResetError):
        s.recv(100)
    s.close()
    gw.wait_for(lambda: verifier(gw)["route_malformed"] > before["route_malformed"])
    after = verifier(gw)
    assert after["no_route"] - before["no_route"] == 3
    assert after["route_malformed"] - before["route_malformed"] == 1
    conns = after["requests"]["connections"]
    assert conns.get("no_route", 0) >= 3 and conns.get("route_malformed", 0) >= 1
    recs = [r for r in records(gw) if r.get("router") == "shop"]
    assert any(r.get("status") == 421 and r.get("backend") is None and r["host"] == "other.example" for r in recs)


def test_a_backend_that_refuses_gets_a_502(routes):
    gw = routes
    (status, body), = http_get(gw, "prod", vip(gw), ["/"], port=CLOSED_PORT)
    assert status == 502, body
    rec = [r for r in records(gw) if r.get("router") == "shop" and r.get("method") == "GET"][-1]
    assert (rec["backend"], rec["route"], rec["status"]) == ("catalog", "host shop.example", 502)


def test_dev_may_not_reach_the_router_even_by_its_address(routes):
    gw = routes
    addr = vip(gw)
    for port in (TLS_PORT, HTTP_PORT):
        s = gw.topo.socket("dev")
        s.settimeout(gw.DENY_TIMEOUT)
        with pytest.raises(OSError):
            s.connect((addr, port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            if not s.recv(100):
                raise ConnectionError("closed")
        s.close()


def test_a_deny_rule_to_the_backend_beats_the_route(routes):
    gw = routes
    deny = gw.rule("web", "payments", action="deny", ports=[f"tcp/{TLS_PORT}", f"tcp/{HTTP_PORT}"],
                   name="no-pay")
    apply(gw, route_policy(gw, [deny]))
    try:
        addr = vip(gw)  # still published: web may reach catalog
        before = verifier(gw)
        with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
            tls(gw, "prod", addr, "api.shop.example")
        der, line, _ = tls(gw, "prod", addr, "www.shop.example")
        assert der == gw.ders["catalog"]
        got = http_get(gw, "prod", addr, ["/", "/api/x"])
        assert got[0][0] == 200 and json.loads(got[0][1])["backend"] == "catalog"
        assert got[1][0] == 403
        after = verifier(gw)
        assert after["route_denied"] - before["route_denied"] == 2
        recs = [r for r in records(gw) if r.get("router") == "shop" and r.get("backend") == "payments"][-2:]
        assert [(r["verdict"], r["rule"]) for r in recs] == [("deny", "no-pay"), ("deny", "no-pay")]
    finally:
        apply(gw, route_policy(gw))




def test_connections_in_a_row_each_reach_their_backend(routes):
    # (a backend's first bytes may arrive before the client side of the splice is set up:
    # they are held, not lost)
    gw = routes
    addr = vip(gw)
    for i in range(30):
        name, backend = ("www.shop.example", "catalog") if i % 2 else ("api.shop.example", "payments")
        der, line, echo = tls(gw, "prod", addr, name)
        assert (der, line, len(echo)) == (gw.ders[backend], backend, 20000), i
