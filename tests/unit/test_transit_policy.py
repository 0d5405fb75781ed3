"""Transit between gateways (issue 15, part 1), the policy side: gateways' `transit:`,
`fabric: transit_port`, rules across gateways, and the compiled fab_N entries (struct
bh_fab_key / bh_fab_val), decoded through the datapath's ABI mirror. Errors with their
FILE:LINE are in test_policy_validate.py (the `transit-*` and `gateway-transit` cases)."""
from __future__ import annotations

import ctypes as C
import dataclasses
import hashlib
import ipaddress

import msgpack
import pytest
import yaml

from bulkhead.datapath import abi
from bulkhead.policy import PolicyError, load_policy
from bulkhead.policy.bundle import Bundle

ZERO = b"\0" * 16

DOC = {
    "version": 1,
    "settings": {"default_action": "deny"},
    "gateways": [{"name": "gwa", "transit": "198.18.100.1"},
                 {"name": "gwb", "transit": "198.18.100.2"},
                 {"name": "gwc"}],  # no transit: its segments stay among themselves
    "fabric": {"service_addresses": ["198.19.255.0/24", "fd00:ff::/120"]},
    "segments": [{"name": "prod", "gateway": "gwa", "interfaces": ["bh-prod"]},
                 {"name": "core", "gateway": "gwb", "interfaces": ["bh-core"]},
                 {"name": "dev", "gateway": "gwc", "interfaces": ["bh-dev"]},
                 {"name": "dev-core", "gateway": "gwc", "interfaces": ["bh-core"]}],
    "apps": [{"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
             # a prefix first: the service address translates to the first *host* address
             {"name": "payments", "segment": "core",
              "addresses": ["198.19.0.0/28", "198.19.0.10/32", "198.19.0.11/32", "fd00:19::10/128"],
              "publish": ["payments.apps.example"]},
             {"name": "catalog", "segment": "core", "addresses": ["198.19.0.20/32"],
              "publish": ["catalog.apps.example"]},  # published, no rule to it
             {"name": "laptops", "segment": "dev", "addresses": ["198.18.2.0/24"]},
             {"name": "inventory", "segment": "dev-core", "addresses": ["198.19.1.30/32"]},
             {"name": "saas", "segment": "core", "hostnames": ["api.saas.example"]}],
    "rules": [{"name": "web-pay", "from": "web", "to": "payments", "ports": ["tcp/8443"]},
              {"name": "lap-inv", "from": "laptops", "to": "inventory"},
              {"name": "web-saas", "from": "web", "to": "saas"}],
}


def doc(**top) -> dict:
    d = yaml.safe_load(yaml.safe_dump(DOC))
    d.update(top)
    return d


def compile_doc(tmp_path, d, previous=None) -> Bundle:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return load_policy([str(p)], previous_vips=previous)[0]


def errors(tmp_path, d) -> str:
    with pytest.raises(PolicyError) as e:
        compile_doc(tmp_path, d)
    return str(e.value)


def decode(entry: tuple) -> tuple[abi.FabKey, abi.FabVal]:
    """One fab entry as the loader writes it: the tuple must fit struct bh_fab_key / bh_fab_val."""
    kind, ident, key_addr, a, b, val_addr = entry
    assert all(type(x) is int and 0 <= x < 1 << 32 for x in (kind, ident, a, b)), entry
    assert type(key_addr) is bytes and type(val_addr) is bytes and len(key_addr) == len(val_addr) == 16, entry
    key = abi.FabKey(kind, ident, (C.c_uint8 * 16)(*key_addr))
    val = abi.FabVal(a, b, (C.c_uint8 * 16)(*val_addr))
    assert C.sizeof(key) == C.sizeof(val) == 24
    return key, val


def ip(addr16) -> ipaddress._BaseAddress:
    a = ipaddress.IPv6Address(bytes(addr16))
    return a.ipv4_mapped or a


def by_kind(b: Bundle) -> dict[int, list[tuple[abi.FabKey, abi.FabVal]]]:
    out: dict[int, list] = {}
    for e in b.fab_entries:
        key, val = decode(e)
        out.setdefault(key.kind, []).append((key, val))
    return out


def ids(b: Bundle):
    return ({a["name"]: a["id"] for a in b.apps}, {s["name"]: s["id"] for s in b.segments})


# ---------------------------------------------------------------------------------- compiling


def test_transit_and_the_gateway_entries(tmp_path):
    b = compile_doc(tmp_path, doc())
    assert b.transit == {"port": 4789, "gateways": {"gwa": "198.18.100.1", "gwb": "198.18.100.2"}}
    apps, segs = ids(b)
    kinds = by_kind(b)
    assert abi.FAB_SELF not in kinds  # the agent's: it depends on the gateway it runs as
    assert set(kinds) == {abi.FAB_VIP, abi.FAB_REAL, abi.FAB_SEG, abi.FAB_APP, abi.FAB_PEER, abi.FAB_GW}
    gw = {"gwa": 1, "gwb": 2, "gwc": 3}  # 1-based in `gateways:` order
    seg_gw = {"prod": "gwa", "core": "gwb", "dev": "gwc", "dev-core": "gwc"}
    # every segment of the policy, behind its gateway
    assert sorted((k.id, v.a, v.b, bytes(k.addr), bytes(v.addr)) for k, v in kinds[abi.FAB_SEG]) == \
        sorted((segs[s], gw[g], 0, ZERO, ZERO) for s, g in seg_gw.items())
    # every app with a segment (hostname-only saas too: it has one), its segment and gateway
    app_seg = {a["name"]: a["segment"] for a in DOC["apps"]}
    assert sorted((k.id, v.a, v.b) for k, v in kinds[abi.FAB_APP]) == \
        sorted((apps[n], segs[s], gw[seg_gw[s]]) for n, s in app_seg.items())
    assert all(bytes(k.addr) == ZERO and bytes(v.addr) == ZERO for k, v in kinds[abi.FAB_APP])
    # the transit gateways' addresses, both ways; gwc has none
    assert sorted((str(ip(k.addr)), k.id, v.a, v.b, bytes(v.addr)) for k, v in kinds[abi.FAB_PEER]) == \
        [("198.18.100.1", 0, 1, 0, ZERO), ("198.18.100.2", 0, 2, 0, ZERO)]
    assert sorted((k.id, bytes(k.addr), str(ip(v.addr)), v.a, v.b) for k, v in kinds[abi.FAB_GW]) == \
        [(1, ZERO, "198.18.100.1", 4, 0), (2, ZERO, "198.18.100.2", 4, 0)]
    # keys are unique (one hash map)
    keys = [e[:3] for e in b.fab_entries]
    assert len(keys) == len(set(keys))


def test_service_addresses_translate_to_the_first_host_address(tmp_path):
    b = compile_doc(tmp_path, doc())
    apps, segs = ids(b)
    kinds = by_kind(b)
    pay4, pay6 = b.vips["payments"]
    (cat4,) = b.vips["catalog"]  # catalog has only an IPv4 host address
    want_vip = {(pay4, apps["payments"], segs["core"], "198.19.0.10"),
                (pay6, apps["payments"], segs["core"], "fd00:19::10"),
                (cat4, apps["catalog"], segs["core"], "198.19.0.20")}
    assert {(str(ip(k.addr)), v.a, v.b, str(ip(v.addr))) for k, v in kinds[abi.FAB_VIP]} == want_vip
    assert all(k.id == 0 for k, _ in kinds[abi.FAB_VIP] + kinds[abi.FAB_REAL])
    # REAL: the same pairs reversed, b = 0
    assert {(str(ip(k.addr)), v.a, v.b, str(ip(v.addr))) for k, v in kinds[abi.FAB_REAL]} == \
        {(real, app, 0, vip) for vip, app, _, real in want_vip}
    # the service address is a destination of the app in its segment, /128 of the 16-byte space
    dst = {(str(ip(e[0])), e[1]): (e[2], e[3]) for e in b.dst_entries}
    for vip, app, seg, _ in want_vip:
        assert dst[(vip, 128)] == (app, seg)
    # catalog is reached by no rule, yet its real address is a destination (default allow may reach it)
    assert dst[("198.19.0.20", 128)] == (apps["catalog"], segs["core"])
    assert dst[("198.19.0.0", 124)] == (apps["payments"], segs["core"])


def test_a_published_app_only_reached_by_default_allow_is_a_destination(tmp_path):
    d = doc(rules=[], settings={"default_action": "allow"})
    b = compile_doc(tmp_path, d)
    apps, segs = ids(b)
    dst = {(str(ip(e[0])), e[1]): (e[2], e[3]) for e in b.dst_entries}
    assert dst[("198.19.0.10", 128)] == (apps["payments"], segs["core"])
    assert dst[("fd00:19::10", 128)] == (apps["payments"], segs["core"])
    assert dst[(b.vips["payments"][0], 128)] == (apps["payments"], segs["core"])
    # not published, no rule: not a destination
    assert ("198.19.1.30", 128) not in dst


def test_service_addresses_only_in_families_with_a_host_address(tmp_path):
    d = doc()
    d["apps"][1]["addresses"] = ["198.19.0.10/32", "fd00:19::/64"]  # IPv6 only as a prefix
    b = compile_doc(tmp_path, d)
    assert [ipaddress.ip_address(v).version for v in b.vips["payments"]] == [4]
    vips = [decode(e) for e in b.fab_entries if e[0] == abi.FAB_VIP]
    assert sorted(str(ip(v.addr)) for _, v in vips) == ["198.19.0.10", "198.19.0.20"]


def test_routers_keep_their_dst_entries_and_get_no_fab_entries(tmp_path):
    d = doc()
    d["apps"].append({"name": "shop", "publish": ["shop.example"], "ports": ["tcp/8443"],
                      "routes": [{"sni": "inv.shop.example", "to": "inventory"}]})  # both behind gwc
    b = compile_doc(tmp_path, d)
    apps, _ = ids(b)
    fab_apps = {decode(e)[1].a for e in b.fab_entries if e[0] in (abi.FAB_VIP, abi.FAB_REAL)}
    assert apps["shop"] not in fab_apps and apps["payments"] in fab_apps
    router_dst = [e for e in b.dst_entries if e[2] == apps["shop"]]
    assert router_dst and all(e[1] == 128 and e[3] == 0 for e in router_dst)
    # no FAB_APP for a router: it has no segment
    assert apps["shop"] not in {e[1] for e in b.fab_entries if e[0] == abi.FAB_APP}


def test_service_addresses_stay_stable(tmp_path):
    first = compile_doc(tmp_path, doc())
    d = doc()
    d["apps"].insert(0, {"name": "aaa", "segment": "core", "addresses": ["198.19.0.30/32"], "publish": ["aaa.example"]})
    again = compile_doc(tmp_path, d)
    assert again.vips["payments"] == first.vips["payments"] and again.vips["catalog"] == first.vips["catalog"]
    kept = compile_doc(tmp_path, doc(), previous={"payments": ["198.19.255.7", "fd00:ff::7"]})
    assert kept.vips["payments"] == ["198.19.255.7", "fd00:ff::7"]
    vip_keys = {str(ip(decode(e)[0].addr)) for e in kept.fab_entries if e[0] == abi.FAB_VIP}
    assert {"198.19.255.7", "fd00:ff::7"} <= vip_keys


def test_transit_port_ipv6_and_a_transit_only_fabric(tmp_path):
    d = doc(fabric={"transit_port": 8472})
    d["gateways"] = [{"name": "gwa", "transit": "fd00:100::1"}, {"name": "gwb", "transit": "fd00:100::2"},
                     {"name": "gwc"}]
    for a in d["apps"]:
        a.pop("publish", None)
    b = compile_doc(tmp_path, d)
    assert b.transit == {"port": 8472, "gateways": {"gwa": "fd00:100::1", "gwb": "fd00:100::2"}}
    assert not b.fabric and not b.vips  # no pools: no DNS, no service addresses
    gws = sorted((k.id, str(ip(v.addr)), v.a) for k, v in by_kind(b)[abi.FAB_GW])
    assert gws == [(1, "fd00:100::1", 6), (2, "fd00:100::2", 6)]
    assert abi.FAB_VIP not in by_kind(b)


def test_a_rule_across_transit_gateways_compiles_to_a_policy_entry(tmp_path):
    b = compile_doc(tmp_path, doc())
    apps, _ = ids(b)
    assert any(e[1] == apps["web"] and e[2] == apps["payments"] and e[4] == 8443 for e in b.policy_entries)


def test_without_transit_there_are_no_gateway_entries(tmp_path):
    d = doc()
    d["gateways"] = [{"name": g["name"]} for g in d["gateways"]]
    d["rules"] = [r for r in d["rules"] if r["name"] != "web-pay"]
    b = compile_doc(tmp_path, d)
    assert b.transit == {}
    assert {e[0] for e in b.fab_entries} == {abi.FAB_VIP, abi.FAB_REAL}  # service addresses still translate
    assert "transit" not in b._content()


# ---------------------------------------------------------------------------------- the bundle


def test_pack_unpack_and_for_gateway_keep_transit_and_fab_entries(tmp_path):
    b = compile_doc(tmp_path, doc())
    u = Bundle.unpack(b.pack())
    assert u.transit == b.transit and u.fab_entries == b.fab_entries
    assert all(type(e) is tuple and type(e[2]) is bytes and type(e[5]) is bytes for e in u.fab_entries)
    assert u.checksum == b.checksum and Bundle.unpack(u.pack()) == u
    for name in ("gwa", "gwb", "gwc"):
        g = u.for_gateway(name)
        assert g.transit == b.transit and g.fab_entries == b.fab_entries
        assert {s["gateway"] for s in g.segments} == {name}


# The fields a bundle had before transit: a bundle without it packs exactly these.
OLD_FIELDS = {"settings", "segments", "apps", "rules", "src_entries", "dst_entries", "policy_entries",
              "sni_entries", "source", "warnings", "format", "gateways", "fabric", "vips"}


def test_a_bundle_without_transit_or_fab_entries_packs_as_before(tmp_path):
    d = doc(fabric=None)
    d.pop("fabric")
    d["gateways"] = [{"name": g["name"]} for g in d["gateways"]]
    d["rules"] = [r for r in d["rules"] if r["name"] != "web-pay"]
    for a in d["apps"]:
        a.pop("publish", None)
    b = compile_doc(tmp_path, d)
    assert b.transit == {} and b.fab_entries == []
    content = b._content()
    assert set(content) <= OLD_FIELDS
    # the checksum is that of the old fields only, and the packed bytes name no new key
    assert b.checksum == hashlib.sha256(msgpack.packb(content, use_bin_type=True)).hexdigest()
    assert b"\xa7transit" not in b.pack() and b"\xabfab_entries" not in b.pack()  # msgpack keys
    # a bundle packed before transit existed (no such keys) unpacks with them empty, same checksum
    old = {k: v for k, v in content.items()}
    old["checksum"] = hashlib.sha256(msgpack.packb(old, use_bin_type=True)).hexdigest()
    raw = msgpack.packb(old, use_bin_type=True)
    u = Bundle.unpack(raw)
    assert u.transit == {} and u.fab_entries == [] and u.checksum == old["checksum"]
    fresh = dataclasses.replace(u)  # a new object: packs afresh, not the bytes it was read from
    assert fresh._wire is None and fresh.pack() == raw and fresh.checksum == old["checksum"]


# ---------------------------------------------------------------------------------- errors


def test_rules_across_gateways_need_transit_on_both(tmp_path):
    d = doc()
    d["gateways"][1].pop("transit")
    msg = errors(tmp_path, d)
    assert "rule web-pay: app web is behind gateway gwa and app payments behind gwb: rules across gateways " \
           "need the fabric's transit: give gateway gwb `transit: ADDRESS`" in msg


def test_more_apps_than_the_transit_carries(tmp_path, monkeypatch):
    """With transit an app id travels as the 16-bit VXLAN group id: at most 65535 apps (checked here
    with the limit lowered: 65536 apps take seconds to write and read)."""
    from bulkhead.policy import fabric, schema

    assert schema.MAX_TRANSIT_APPS == fabric.MAX_TRANSIT_APPS == (1 << 16) - 1
    monkeypatch.setattr(fabric, "MAX_TRANSIT_APPS", 8)
    d = doc(rules=[])
    d["apps"] += [{"name": f"a{i}", "segment": "dev", "addresses": [f"fd00:aa::{i + 1}/128"]} for i in range(2)]
    compile_doc(tmp_path, d)  # 8: fits
    d["apps"].append({"name": "a2", "segment": "dev", "addresses": ["fd00:aa::3/128"]})
    msg = errors(tmp_path, d)
    assert msg.count("too many apps for the transit") == 1
    assert "app a2: too many apps for the transit (at most 8: an app id travels between gateways as the " \
           "16-bit VXLAN group id)" in msg
    line = yaml.safe_dump(d, sort_keys=False).splitlines().index("- name: a2") + 1
    assert msg.startswith(f"{tmp_path / 'p.yaml'}:{line}:")
    # the same without transit is fine
    d["gateways"] = [{"name": g["name"]} for g in d["gateways"]]
    compile_doc(tmp_path, d)


# ------------------------------------------------------------------------ transit_snat


def with_snat(value, segment: str = "core") -> dict:
    d = doc()
    for s in d["segments"]:
        if s["name"] == segment:
            s["transit_snat"] = value
    return d


def test_transit_snat_compiles_to_one_entry_per_family_of_its_segment(tmp_path):
    b = compile_doc(tmp_path, with_snat(["198.19.0.1", "fd00:19::1"]))
    _, segs = ids(b)
    kinds = by_kind(b)
    assert [(k.id, bytes(k.addr), v.a, v.b, str(ip(v.addr))) for k, v in kinds[abi.FAB_SNAT4]] == \
        [(segs["core"], ZERO, 0, 0, "198.19.0.1")]
    assert [(k.id, str(ip(v.addr))) for k, v in kinds[abi.FAB_SNAT6]] == [(segs["core"], "fd00:19::1")]
    assert [s.get("transit_snat") for s in b.segments if s["name"] == "core"] == [["198.19.0.1", "fd00:19::1"]]
    # one address as a scalar is the same; the cut bundle keeps the entries (they are every gateway's)
    one = compile_doc(tmp_path, with_snat("198.19.0.1"))
    assert [str(ip(v.addr)) for _, v in by_kind(one)[abi.FAB_SNAT4]] == ["198.19.0.1"]
    assert abi.FAB_SNAT6 not in by_kind(one)
    snat4 = [e for e in one.fab_entries if e[0] == abi.FAB_SNAT4]
    assert [e for e in one.for_gateway("gwa").fab_entries if e[0] == abi.FAB_SNAT4] == snat4
    # without it: no entry, and the segment's dict has no key (the bundle's bytes stay as they were)
    plain = compile_doc(tmp_path, doc())
    assert abi.FAB_SNAT4 not in by_kind(plain) and all("transit_snat" not in s for s in plain.segments)


@pytest.mark.parametrize("value, message", [
    (["198.19.0.1", "198.19.0.2"], "transit_snat has two IPv4 addresses"),
    ("198.19.0.0/24", "is not an IPv4 or IPv6 address"),
    ("198.19.255.7", "is inside fabric service_addresses"),
    (7, "transit_snat"),
])
def test_transit_snat_errors(tmp_path, value, message):
    assert message in errors(tmp_path, with_snat(value))


def test_transit_snat_needs_a_gateway_with_transit(tmp_path):
    assert "transit_snat needs the segment's gateway to have transit" in \
        errors(tmp_path, with_snat("198.19.1.1", segment="dev-core"))
