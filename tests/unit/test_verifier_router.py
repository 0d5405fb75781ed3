"""Routers in the verifier (agent/verifier/router.py, tlshello.py): the ClientHello parser, route matching
and the pair decision, called directly (tests/integration/test_fabric_routes.py sends real traffic).

ClientHellos come from Python's own TLS stack (ssl.SSLObject over memory BIOs): what a real
client sends, then cut, split and corrupted.
"""
from __future__ import annotations

import ssl
import struct
from pathlib import Path

import pytest

from bulkhead.datapath.abi import ACTF_AUDIT, Action
from bulkhead.policy import sni as snilib
from bulkhead.policy.bundle import Bundle
from bulkhead.policy.compiler import compile_policy
from bulkhead.policy.validate import validate_files
from bulkhead.verifier.router import PairPolicy, RouteTable
from bulkhead.verifier.tlshello import HELLO_MAX, RECORDS_MAX, Malformed, alert, parse_client_hello, valid_name


def client_hello(server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def records(hello: bytes, sizes: list[int]) -> bytes:
    """The handshake message of one-record `hello` re-cut into records of these payload sizes."""
    assert hello[0] == 0x16
    msg = hello[5:]
    out, pos = b"", 0
    for n in sizes + [len(msg)]:
        piece = msg[pos:pos + n]
        if not piece:
            break
        out += bytes((0x16, 3, 1)) + struct.pack("!H", len(piece)) + piece
        pos += len(piece)
    return out


# ------------------------------------------------------------ ClientHello --


def test_the_server_name_of_a_real_client_hello():
    raw = client_hello("API.Shop.Example")
    h = parse_client_hello(raw)
    assert h is not None and h.sni == "api.shop.example" and h.length == len(raw)


def test_no_server_name_is_none_not_an_error():
    h = parse_client_hello(client_hello(None))
    assert h is not None and h.sni is None


def test_every_prefix_asks_for_more_and_the_whole_parses():
    raw = client_hello("www.shop.example")
    for n in range(len(raw)):
        assert parse_client_hello(raw[:n]) is None, n
    assert parse_client_hello(raw).sni == "www.shop.example"


def test_a_hello_split_over_records_and_followed_by_other_bytes():
    raw = client_hello("www.shop.example")
    split = records(raw, [1, 3, 40, 7])
    for n in range(len(split)):
        assert parse_client_hello(split[:n]) is None, n
    h = parse_client_hello(split + b"\x17\x03\x03\x00\x05early")
    assert h.sni == "www.shop.example" and h.length == len(split)


@pytest.mark.parametrize("mutate, why", [
    (lambda b: b"\x17" + b[1:], "record type"),
    (lambda b: b"GET / HTTP/1.1\r\n", "record type"),
    (lambda b: b[:1] + b"\x02" + b[2:], "record version"),
    (lambda b: b[:2] + b"\x07" + b[3:], "record version"),
    (lambda b: b[:3] + b"\x00\x00" + b[5:], "record length"),
    (lambda b: b[:3] + b"\x40\x01" + b[5:], "record length"),
    (lambda b: b[:5] + b"\x02" + b[6:], "not a ClientHello"),
    (lambda b: b[:9] + b"\x07" + b[10:], "ClientHello version"),
], ids=["alert-first", "http", "rec-v2", "rec-v3.7", "empty-record", "record-too-long", "server-hello",
        "hello-version"])
def test_malformed_records_are_refused(mutate, why):
    with pytest.raises(Malformed, match=why):
        parse_client_hello(mutate(client_hello("a.shop.example")))


def _with_extensions(exts: bytes) -> bytes:
    """A minimal ClientHello (one record) with these extension bytes."""
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(msg)) + msg


def _sni_ext(*names: bytes, ntype: int = 0) -> bytes:
    lst = b"".join(bytes((ntype,)) + struct.pack("!H", len(n)) + n for n in names)
    data = struct.pack("!H", len(lst)) + lst
    return struct.pack("!HH", 0, len(data)) + data


def test_a_minimal_hello_parses():
    assert parse_client_hello(_with_extensions(_sni_ext(b"x.shop.example."))).sni == "x.shop.example"


@pytest.mark.parametrize("exts, why", [
    (_sni_ext(b"a.example", b"b.example"), "more than one host_name"),
    (_sni_ext(b"a.example", ntype=1), "server_name type"),
    (_sni_ext(b"a..example"), "label"),
    (_sni_ext(b"a.ex ample"), "not a DNS name"),
    (_sni_ext(b"caf\xc3\xa9.example"), "not a DNS name"),
    (_sni_ext(b"a.example") + _sni_ext(b"b.example"), "repeated"),
    (struct.pack("!HH", 0, 2) + b"\x00\x00", "list length"),
    (struct.pack("!HH", 0, 8) + b"\x00\x06\x00\x00\x09abc", "host_name length"),
    (struct.pack("!HH", 10, 40) + b"\x00" * 4, "cut short"),
], ids=["two-names", "type", "empty-label", "space", "utf8", "repeated", "empty-list", "name-overrun",
        "ext-overrun"])
def test_malformed_server_names_are_refused(exts, why):
    with pytest.raises(Malformed, match=why):
        parse_client_hello(_with_extensions(exts))


def test_trailing_handshake_bytes_and_length_mismatch_are_refused():
    good = _with_extensions(_sni_ext(b"a.example"))
    extra = good[:3] + struct.pack("!H", len(good) - 5 + 2) + good[5:] + b"\x00\x00"
    with pytest.raises(Malformed, match="after the ClientHello"):
        parse_client_hello(extra)
    # the extensions length says less than the message holds
    body_end = bytearray(good)
    i = 5 + 4 + 2 + 32 + 1 + 4 + 2
    body_end[i:i + 2] = struct.pack("!H", len(good) - i - 2 - 1)
    with pytest.raises(Malformed, match="extensions length"):
        parse_client_hello(bytes(body_end))


def test_the_bound_holds_for_records_and_for_the_message():
    # a handshake message announcing more than HELLO_MAX
    msg = b"\x01" + (HELLO_MAX).to_bytes(3, "big") + b"\x03\x03"
    with pytest.raises(Malformed, match="longer than"):
        parse_client_hello(b"\x16\x03\x01" + struct.pack("!H", len(msg)) + msg)
    # records: at most HELLO_MAX bytes of them, at most RECORDS_MAX
    big = b"\x16\x03\x01\x3f\xfb\x01\x00\x3f\xf8"  # a record ending at HELLO_MAX, the message needs more
    assert parse_client_hello(big) is None
    full = big + b"\x00" * (HELLO_MAX - len(big))
    assert parse_client_hello(full[:-1]) is None
    with pytest.raises(Malformed, match="longer than"):  # no room left for the next record
        parse_client_hello(full)
    with pytest.raises(Malformed, match="longer than"):
        parse_client_hello(b"\x16\x03\x01\x40\x00\x01")
    head = b"".join(b"\x16\x03\x01\x00\x01" + bytes((c,)) for c in (1, 0, 0x3F, 0))  # 16128 bytes announced
    stream = head + b"\x16\x03\x01\x00\x01\x00" * (RECORDS_MAX - 4)
    assert parse_client_hello(stream) is None
    with pytest.raises(Malformed, match="more than 32 records"):
        parse_client_hello(stream + b"\x16\x03\x01\x00\x01\x00")


def test_valid_names_and_alert_bytes():
    assert valid_name(b"A-b_c.Example.") == "a-b_c.example"
    for bad in (b"", b".", b"a." * 130 + b"a", b"x" * 64 + b".example"):
        with pytest.raises(Malformed):
            valid_name(bad)
    assert alert(112) == b"\x15\x03\x01\x00\x02\x02\x70"


# ---------------------------------------------------------------- routes --

ROUTES = [
    {"kind": "sni", "name": "api.shop.example", "path": None, "to": "payments"},
    {"kind": "sni", "name": "*.shop.example", "path": None, "to": "catalog"},
    {"kind": "host", "name": "shop.example", "path": "/api/", "to": "payments"},
    {"kind": "host", "name": "shop.example", "path": "/api/v2/", "to": "ledger"},
    {"kind": "host", "name": "shop.example", "path": None, "to": "catalog"},
    {"kind": "host", "name": "*.shop.example", "path": "/static/", "to": "cdn"},
]


@pytest.mark.parametrize("name, to", [
    ("api.shop.example", "payments"),   # exact beats wildcard
    ("API.shop.example.", "payments"),
    ("www.shop.example", "catalog"),    # one label
    ("a.b.shop.example", None),         # not two
    ("shop.example", None),             # a wildcard is not its own domain
    ("other.example", None),
    (None, None),
])
def test_sni_routes(name, to):
    r = RouteTable(ROUTES).by_sni(name)
    assert (r.to if r else None) == to


@pytest.mark.parametrize("host, path, to", [
    ("shop.example", "/api/x", "payments"),
    ("shop.example", "/api/v2/pay", "ledger"),   # the longest prefix
    ("shop.example", "/api", "catalog"),         # a prefix is a string prefix: /api/ is not /api
    ("shop.example", "/", "catalog"),            # no path: any
    ("www.shop.example", "/static/a.css", "cdn"),
    ("www.shop.example", "/", None),             # the wildcard's routes all need a path
    ("x.y.shop.example", "/static/a", None),
    ("api.shop.example", "/static/a", "cdn"),    # sni routes don't count for Host
    (None, "/", None),
])
def test_host_routes(host, path, to):
    r = RouteTable(ROUTES).by_host(host, path)
    assert (r.to if r else None) == to


def test_an_exact_host_does_not_fall_back_to_a_wildcard():
    t = RouteTable([{"kind": "host", "name": "a.example", "path": "/x/", "to": "one"},
                    {"kind": "host", "name": "*.example", "path": None, "to": "two"}])
    assert t.by_host("a.example", "/y") is None
    assert t.by_host("b.example", "/y").to == "two"


# --------------------------------------------------------- pair decision --

POLICY = """
version: 1
settings: {default_action: deny}
fabric: {service_addresses: [198.19.255.0/24]}
segments:
  - {name: prod, interfaces: [bh-prod], dns: [198.18.1.1]}
  - {name: core, interfaces: [bh-core]}
apps:
  - {name: web, segment: prod, addresses: [198.18.1.0/24]}
  - {name: ops, segment: prod, addresses: [198.18.2.0/24]}
  - {name: payments, segment: core, addresses: [198.19.0.10/32]}
  - {name: catalog, segment: core, addresses: [198.19.0.20/32]}
  - {name: ledger, segment: core, addresses: [198.19.0.30/32], hostnames: [ledger.shop.example]}
  - name: shop
    publish: [shop.example, "*.shop.example"]
    ports: [tcp/8443, tcp/8080, tcp/9000-9100]
    routes:
      - {sni: api.shop.example, to: payments}
      - {sni: "*.shop.example", to: catalog}
      - {host: shop.example, to: catalog}
rules:
  - {name: web-pay, from: web, to: payments, ports: [tcp/8443, tcp/9000-9100]}
  - {name: web-pay-8443-deny, from: web, to: payments, action: deny, ports: [tcp/8443]}
  - {name: web-cat, from: web, to: catalog, ports: [tcp/8080],
     http: [{methods: [GET], paths: ["/*"]}]}
  - {name: web-cat-tls, from: web, to: catalog, ports: [tcp/8443]}
  - {name: web-ledger, from: web, to: ledger, ports: [tcp/8443]}
  - {name: ops-any, from: ops, to: catalog, mode: audit, action: deny}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Bundle, dict]:
    d = tmp_path_factory.mktemp("p")
    p = Path(d) / "p.yaml"
    p.write_text(POLICY)
    b = compile_policy(validate_files([str(p)]))
    ids = {a["name"]: a["id"] for a in b.apps}
    return b, ids


def test_the_bundle_marks_the_router_l7_for_clients_of_its_backends(compiled):
    b, ids = compiled
    shop = next(a for a in b.apps if a["name"] == "shop")
    assert [r["to"] for r in shop["routes"]] == ["payments", "catalog", "catalog"]
    assert b.vips["shop"] and len(b.vips["shop"]) == 1
    srcs = {e[1] for e in b.policy_entries if e[2] == ids["shop"]}
    assert srcs == {ids["web"]}  # ops has no allow rule to a backend
    assert {e[5] for e in b.policy_entries if e[2] == ids["shop"]} == {int(Action.L7)}


def test_the_pair_is_decided_as_the_kernel_would(compiled):
    b, ids = compiled
    pp = PairPolicy(b, {ids["payments"], ids["catalog"], ids["ledger"]})
    web, pay, cat, led = ids["web"], ids["payments"], ids["catalog"], ids["ledger"]
    rules = {r["id"]: r["name"] for r in b.rules}
    # the deny on one port beats the allow on the same port; a range block allows
    v = pp.decide(web, pay, 8443, True, "api.shop.example")
    assert v.action == "refuse" and rules[v.rule_id] == "web-pay-8443-deny"
    for port in (9000, 9050, 9100):
        v = pp.decide(web, pay, port, True, "api.shop.example")
        assert v.action == "allow" and rules[v.rule_id] == "web-pay", port
    assert pp.decide(web, pay, 9101, True, "x").action == "refuse"  # no rule: default deny
    # L7 rule: HTTP is decided by its http entries, TLS can't be
    assert pp.decide(web, cat, 8080, False, None).action == "l7"
    v = pp.decide(web, cat, 8080, True, "www.shop.example")
    assert v.action == "refuse" and "can't be inspected" in v.reason
    assert pp.decide(web, cat, 8443, True, "www.shop.example").action == "allow"
    # SNI-gated (the backend has hostnames): the ClientHello's name decides, as in the kernel
    assert pp.lookup(web, led, 8443)[0] == Action.SNI
    assert pp.decide(web, led, 8443, True, "ledger.shop.example").action == "allow"
    v = pp.decide(web, led, 8443, True, "www.shop.example")
    assert v.action == "refuse" and "default_action deny" in v.reason
    assert pp.decide(web, led, 8443, False, None).action == "refuse"  # plain HTTP: no name (unknown_sni)
    # an audit deny passes, marked
    v = pp.decide(ids["ops"], cat, 8080, False, None)
    assert v.action == "allow" and v.audit and v.reason.startswith("audit: would deny")


def test_sni_lookup_order_exact_then_wildcard_port_then_any():
    class B:
        settings = {"default_action": "deny"}
        policy_entries = [(64, 1, 2, 0, 0, int(Action.SNI), 0, 5)]
        sni_entries = [(snilib.name_hash("*.ex.example"), 1, 2, 0, int(Action.ALLOW), 0, 6, 2),
                       (snilib.name_hash("a.ex.example"), 1, 2, 443, int(Action.DENY), 0, 7, 2),
                       (snilib.name_hash("b.ex.example"), 1, 2, 0, int(Action.DENY), ACTF_AUDIT, 8, 2)]
    pp = PairPolicy(B, {2})
    assert pp.decide(1, 2, 443, True, "a.ex.example")[:2] == ("refuse", 7)
    assert pp.decide(1, 2, 444, True, "a.ex.example")[:2] == ("allow", 6)  # port 443 only: the wildcard
    v = pp.decide(1, 2, 443, True, "b.ex.example")
    assert v.action == "allow" and v.audit and v.rule_id == 8
    assert pp.decide(1, 2, 443, True, "c.ex.example")[:2] == ("allow", 6)
    assert pp.decide(1, 2, 443, True, "c.other.example").action == "refuse"


def test_with_default_allow_every_app_may_reach_the_router(tmp_path):
    text = POLICY.replace("settings: {default_action: deny}", "settings: {default_action: allow}")
    p = tmp_path / "p.yaml"
    p.write_text(text)
    b = compile_policy(validate_files([str(p)]))
    ids = {a["name"]: a["id"] for a in b.apps}
    steered = {e[1] for e in b.policy_entries if e[2] == ids["shop"] and e[5] == int(Action.L7)}
    assert steered == {ids[n] for n in ("web", "ops", "payments", "catalog", "ledger")}
    pp = PairPolicy(b, {ids["payments"], ids["catalog"]})
    v = pp.decide(ids["ops"], ids["payments"], 8443, True, "api.shop.example")
    assert v.action == "allow" and v.rule_id == 0 and "default_action allow" in v.reason
