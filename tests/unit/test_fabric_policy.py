"""The fabric's policy keys (fabric:, a segment's dns:, an app's publish:), service-address
allocation, and the DNS zone's answers, without a kernel."""
from __future__ import annotations

import ipaddress

import pytest
import yaml
from dnslib import RCODE, DNSRecord

from bulkhead.fabric.dns import Zone
from bulkhead.policy import PolicyError, load_policy
from bulkhead.policy.bundle import APP_GATEWAY, Bundle
from bulkhead.policy.vips import allocate

BASE = {
    "version": 1,
    "fabric": {"service_addresses": ["198.19.255.0/24", "fd00:ff::/120"]},
    "segments": [{"name": "prod", "interfaces": ["bh-prod"], "dns": ["198.18.1.1"]},
                 {"name": "dev", "interfaces": ["bh-dev"], "dns": ["198.18.1.1"]},
                 {"name": "core", "interfaces": ["bh-core"]}],
    "apps": [{"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24"]},
             {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24"]},
             {"name": "payments", "segment": "core", "addresses": ["198.19.0.10/32", "fd00:19::10/128"],
              "hostnames": ["payments.apps.example"], "publish": True},
             {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32"],
              "publish": ["*.catalog.example", "catalog.example"]}],
    "rules": [{"name": "web-pay", "from": "web", "to": "payments"},
              {"name": "lap-cat", "from": "laptops", "to": "catalog"}],
}


def compile_doc(tmp_path, doc, previous=None):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_policy([str(p)], previous_vips=previous)[0]


def errors(tmp_path, doc) -> str:
    with pytest.raises(PolicyError) as e:
        compile_doc(tmp_path, doc)
    return str(e.value)


def edit(**changes):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        node = doc
        *parents, last = path.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return doc


def test_compiles_service_addresses_and_the_dns_entries(tmp_path):
    b = compile_doc(tmp_path, BASE)
    assert set(b.vips) == {"payments", "catalog"}
    v4, v6 = b.vips["payments"]
    assert ipaddress.ip_address(v4) in ipaddress.ip_network("198.19.255.0/24")
    assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:ff::/120")
    assert len(b.vips["catalog"]) == 1  # catalog has no IPv6 address
    assert b.fabric == {"service_addresses": ["198.19.255.0/24", "fd00:ff::/120"], "upstream_dns": [],
                        "dns_ttl": 30}
    # one destination for the shared DNS address; udp/53 and tcp/53 from each app of prod and dev
    gw_dst = [e for e in b.dst_entries if e[2] == APP_GATEWAY]
    assert [(ipaddress.ip_address(e[0]).ipv4_mapped, e[1]) for e in gw_dst] == \
        [(ipaddress.ip_address("198.18.1.1"), 128)]
    gw_pol = sorted((e[1], e[3], e[4]) for e in b.policy_entries if e[2] == APP_GATEWAY)
    assert gw_pol == [(1, 6, 53), (1, 17, 53), (2, 6, 53), (2, 17, 53)]
    # packs, unpacks and keeps it all
    assert Bundle.unpack(b.pack()).vips == b.vips


def test_a_policy_without_fabric_packs_as_before(tmp_path):
    doc = edit(fabric=None)
    for seg in doc["segments"]:
        seg.pop("dns", None)
    for app in doc["apps"]:
        app.pop("publish", None)
    doc["apps"][3]["hostnames"] = ["catalog.example"]
    b = compile_doc(tmp_path, doc)
    assert not b.fabric and not b.vips
    assert "fabric" not in b._content() and "vips" not in b._content()
    assert all("dns" not in s for s in b.segments) and all("dns_names" not in a for a in b.apps)


def test_service_addresses_are_kept_and_do_not_depend_on_file_order(tmp_path):
    first = compile_doc(tmp_path, BASE).vips
    # a new published app before the others, without the previous allocation: nobody moves
    doc = edit()
    doc["apps"].insert(0, {"name": "aaa", "segment": "core", "addresses": ["198.19.0.30/32"],
                           "publish": ["aaa.example"]})
    again = compile_doc(tmp_path, doc).vips
    assert again["payments"] == first["payments"] and again["catalog"] == first["catalog"]
    # the previous allocation wins over the name-derived place, even an odd one
    prev = {"payments": ["198.19.255.7", "fd00:ff::7"]}
    assert compile_doc(tmp_path, BASE, previous=prev).vips["payments"] == prev["payments"]
    # ...but not when it left the pool
    moved = compile_doc(tmp_path, BASE, previous={"payments": ["198.19.254.7"]}).vips["payments"]
    assert ipaddress.ip_address(moved[0]) in ipaddress.ip_network("198.19.255.0/24")


def test_allocate_fills_a_small_pool_and_says_when_full():
    pool = [ipaddress.ip_network("198.19.255.0/30")]  # two usable: .1 and .2
    got = allocate([("a", {4}), ("b", {4})], pool)
    assert sorted(v[0] for v in got.values()) == ["198.19.255.1", "198.19.255.2"]
    with pytest.raises(ValueError, match="full"):
        allocate([("a", {4}), ("b", {4}), ("c", {4})], pool)
    # two apps claiming the same previous address: the first keeps it
    got = allocate([("a", {4}), ("b", {4})], pool, {"a": ["198.19.255.2"], "b": ["198.19.255.2"]})
    assert got == {"a": ["198.19.255.2"], "b": ["198.19.255.1"]}


@pytest.mark.parametrize("changes, message", [
    ({"fabric": None}, "dns needs the fabric"),
    ({"fabric__service_addresses": None}, "service_addresses is required"),
    ({"fabric__service_addresses": ["198.19.255.0/31"]}, "too small for a pool"),
    ({"fabric__service_addresses": ["198.19.0.0/24"]}, "overlaps fabric service_addresses"),
    ({"fabric__upstream_dns": ["198.18.0.0/24"]}, "is not an IPv4 or IPv6 address"),
    ({"fabric__dns_ttl": -1}, "dns_ttl must be an integer"),
    ({"fabric__nope": 1}, "fabric: unknown key 'nope'"),
    ({"segments__0__dns": ["not-an-address"]}, "is not an IPv4 or IPv6 address"),
    ({"segments__0__dns": ["198.19.255.9"]}, "is inside fabric service_addresses"),
    ({"apps__2__publish": "yes"}, "publish must be true"),
    ({"apps__2__hostnames": None}, "publish: true needs hostnames"),
    ({"apps__3__publish": ["payments.apps.example"]}, "is also published by app payments"),
    ({"apps__3__publish": ["bad_name!"]}, "hostname 'bad_name!' is invalid"),
    ({"fabric__service_addresses": ["fd00:ff::/120"], "apps__3__addresses": ["198.19.0.20/32"]},
     "has only IPv4 addresses and fabric: service_addresses has no IPv4 pool"),
])
def test_invalid_fabric_keys_are_reported(tmp_path, changes, message):
    assert message in errors(tmp_path, edit(**changes))


def test_publish_without_fabric_is_an_error(tmp_path):
    doc = edit(fabric=None)
    for seg in doc["segments"]:
        seg.pop("dns", None)
    assert "publish needs the fabric" in errors(tmp_path, doc)


def ask(zone, name, qtype="A", segment="prod"):
    return zone.answer(DNSRecord.question(name, qtype), segment)


def test_the_zone_answers_per_segment(tmp_path):
    b = compile_doc(tmp_path, BASE)
    z = Zone(b)
    r = ask(z, "payments.apps.example")
    assert r.header.rcode == RCODE.NOERROR and [str(x.rdata) for x in r.rr] == [b.vips["payments"][0]]
    assert [str(x.rdata) for x in ask(z, "payments.apps.example", "AAAA").rr] == [b.vips["payments"][1]]
    assert ask(z, "payments.apps.example", segment="dev").header.rcode == RCODE.NXDOMAIN
    assert ask(z, "x.catalog.example", segment="dev").header.rcode == RCODE.NOERROR
    assert ask(z, "x.catalog.example", "AAAA", segment="dev").rr == []  # no IPv6 service address
    assert ask(z, "a.b.catalog.example", segment="dev").header.rcode == RCODE.REFUSED
    assert ask(z, "elsewhere.example").header.rcode == RCODE.REFUSED
    # with an upstream, names outside the fabric are handed back for forwarding
    b.fabric["upstream_dns"] = ["127.0.0.2"]
    assert ask(Zone(b), "elsewhere.example") is None
    # default allow: every segment sees every published app
    b.settings["default_action"] = "allow"
    assert ask(Zone(b), "payments.apps.example", segment="dev").header.rcode == RCODE.NOERROR


def test_deny_rules_do_not_make_a_name_visible(tmp_path):
    doc = edit(rules__0__action="deny")
    z = Zone(compile_doc(tmp_path, doc))
    assert ask(z, "payments.apps.example").header.rcode == RCODE.NXDOMAIN


ROUTER = {"name": "shop", "publish": ["shop.example", "*.shop.example"], "ports": ["tcp/8443", "tcp/8080"],
          "routes": [{"sni": "api.shop.example", "to": "payments"},
                     {"sni": "*.shop.example", "to": "catalog"},
                     {"host": "shop.example", "path": "/api/", "to": "payments"},
                     {"host": "shop.example", "to": "catalog"}]}


def with_router(**router_changes):
    doc = edit()
    doc["apps"][2].pop("hostnames")  # payments: a plain backend (not TLS-name gated)
    doc["apps"][2]["publish"] = ["payments.apps.example"]
    r = dict(ROUTER, **router_changes)
    doc["apps"].append({k: v for k, v in r.items() if v is not None})
    return doc


def test_a_router_gets_service_addresses_and_steers_its_backends_clients(tmp_path):
    from bulkhead.datapath.abi import Action

    b = compile_doc(tmp_path, with_router())
    shop = next(a for a in b.apps if a["name"] == "shop")
    assert [r["to"] for r in shop["routes"]] == ["payments", "catalog", "payments", "catalog"]
    # its backends have IPv4 and IPv6 host addresses: one of each
    assert [ipaddress.ip_address(v).version for v in b.vips["shop"]] == [4, 6]
    assert {e[2] for e in b.dst_entries if e[0] in {ipaddress.ip_address(v).packed if ":" in v else
            b"\0" * 10 + b"\xff\xff" + ipaddress.ip_address(v).packed for v in b.vips["shop"]}} == {shop["id"]}
    # web (rule to payments) and laptops (rule to catalog) are steered to the verifier on 8443 and 8080
    steer = sorted((e[1], e[4]) for e in b.policy_entries if e[2] == shop["id"])
    assert steer == [(1, 8080), (1, 8443), (2, 8080), (2, 8443)]
    assert {e[5] for e in b.policy_entries if e[2] == shop["id"]} == {int(Action.L7)}
    z = Zone(b)
    assert ask(z, "www.shop.example").rr and ask(z, "shop.example", segment="dev").rr


@pytest.mark.parametrize("changes, message", [
    ({"routes": [{"sni": "a.example", "host": "a.example", "to": "payments"}]}, "exactly one of sni"),
    ({"routes": [{"sni": "a.example", "path": "/x", "to": "payments"}]}, "path needs host"),
    ({"routes": [{"host": "a.example", "path": "x", "to": "payments"}]}, "path must be a prefix"),
    ({"routes": [{"sni": "a.example", "to": "nobody"}]}, "app 'nobody' is not defined"),
    ({"routes": [{"sni": "a.example", "to": "web"}]}, "needs a host address"),
    ({"routes": [{"sni": "a.example", "to": "payments"}, {"sni": "A.example", "to": "catalog"}]},
     "is already routed"),
    ({"routes": []}, "routes must be a non-empty list"),
    ({"ports": ["udp/53"]}, "a router needs ports, TCP only"),
    ({"ports": None}, "a router needs ports, TCP only"),
    ({"publish": None}, "a router needs publish"),
    ({"addresses": ["198.19.0.99/32"]}, "a router (an app with routes) has no addresses"),
])
def test_invalid_routers_are_reported(tmp_path, changes, message):
    assert message in errors(tmp_path, with_router(**changes))


def test_rules_name_the_backends_not_the_router(tmp_path):
    doc = with_router()
    doc["rules"].append({"name": "to-router", "from": "web", "to": "shop"})
    assert "is a router: write rules to its backends" in errors(tmp_path, doc)


def test_fabric_names_lists_names_addresses_routes_and_who_resolves_them(tmp_path):
    import json

    from click.testing import CliRunner

    from bulkhead.cli.main import main

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(with_router(), sort_keys=False))
    r = CliRunner().invoke(main, ["fabric", "names", str(p), "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.output)["names"]}
    assert rows["payments.apps.example"]["segments"] == ["prod"]
    assert rows["*.shop.example"]["segments"] == ["prod", "dev"]
    assert [x["to"] for x in rows["shop.example"]["routes"]] == ["payments", "catalog", "payments", "catalog"]
    text = CliRunner().invoke(main, ["fabric", "names", str(p), "--segment", "dev"])
    assert text.exit_code == 0 and "payments.apps.example" not in text.output and "shop.example" in text.output
    bad = CliRunner().invoke(main, ["fabric", "names", str(p), "--segment", "nope"])
    assert bad.exit_code == 2


def test_malformed_queries_get_formerr_or_nothing_and_are_counted(tmp_path):
    from bulkhead.fabric.dns import DnsServer

    srv = DnsServer()
    try:
        srv.zone = Zone(compile_doc(tmp_path, BASE))
        assert srv._handle("prod", b"\x12\x34", tcp=False) is None  # no header: nothing to answer
        out = srv._handle("prod", b"\x12\x34" + b"\x01\x00" + b"\x00\x05" + b"\xff" * 10, tcp=False)
        r = DNSRecord.parse(out)  # a header that reads, a body that doesn't: FORMERR, same id
        assert r.header.id == 0x1234 and r.header.rcode == RCODE.FORMERR and r.header.qr == 1
        response = DNSRecord.question("payments.apps.example").reply().pack()
        assert srv._handle("prod", response, tcp=False) is None  # a response, not a query: ignored
        two = DNSRecord.question("payments.apps.example")
        two.add_question(*DNSRecord.question("catalog.example").questions)
        assert DNSRecord.parse(srv._handle("prod", two.pack(), tcp=False)).header.rcode == RCODE.FORMERR
        # the short one is counted too, though it gets no answer
        assert srv.by_segment[("prod", "formerr")] == 3 and srv.by_segment[("prod", "ignored")] == 1
    finally:
        srv.stop()
