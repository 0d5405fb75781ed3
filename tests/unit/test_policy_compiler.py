"""Compilation: ids, identity entries, precedence, and the policy trie.

The central check is a property test: for every (protocol, port), a longest
prefix match over the emitted policy entries (done here by a tiny matcher)
must give exactly the verdict a naive reading of the rules gives — the
highest-ranked matching rule, earliest on ties. Both sides are written
independently of the compiler's own helpers.
"""
from __future__ import annotations

import ipaddress
import os
import random

import msgpack
import pytest
import yaml

from bulkhead.datapath.abi import ACTF_AUDIT, Action
from bulkhead.policy import Bundle, PolicyError, load_policy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
EXAMPLE = os.path.join(REPO, "policies", "example.yaml")

TCP, UDP, SCTP, ICMP, ICMP6, GRE = 6, 17, 132, 1, 58, 47
PROTO = {"tcp": TCP, "udp": UDP, "sctp": SCTP}


def compile_doc(tmp_path, doc: dict) -> Bundle:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    bundle, _ = load_policy([str(path)])
    return bundle


def pair_policy(rules: list[dict], dst_ports=None, mode=None, hostnames=None) -> dict:
    """Two apps (src in segment a, dst in segment b) and `rules` from src to dst."""
    dst = {"name": "dst", "segment": "b", "addresses": ["198.19.0.1", "fd00:b::1"]}
    if dst_ports is not None:
        dst["ports"] = dst_ports
    if hostnames:
        dst["hostnames"] = hostnames
    doc = {
        "version": 1,
        "segments": [{"name": "a", "interfaces": ["a0"]}, {"name": "b", "interfaces": ["b0"]}],
        "apps": [{"name": "src", "segment": "a", "addresses": ["198.18.0.0/24"]}, dst],
        "rules": [{"name": f"r{i}", "from": "src", "to": "dst", **r} for i, r in enumerate(rules, 1)],
    }
    if mode:
        doc["settings"] = {"mode": mode}
    return doc


# --- a tiny LPM trie, as the kernel's BPF_MAP_TYPE_LPM_TRIE sees the key ----

KEY_BITS = 96  # src(32) dst(32) proto(8) pad(8) port(16)


def key_of(src: int, dst: int, proto: int, port: int) -> int:
    return (src << 64) | (dst << 32) | (proto << 24) | port


def check_well_formed(entries) -> None:
    """Host bits beyond the prefix are zero and no two entries share a prefix."""
    seen = set()
    for plen, src, dst, proto, dport, *_ in entries:
        assert plen in (64, 72) or 80 <= plen <= 96, plen
        k = key_of(src, dst, proto, dport)
        assert k & ((1 << (KEY_BITS - plen)) - 1) == 0, f"bits set past prefix {plen}: {(proto, dport)}"
        assert (plen, k) not in seen, f"duplicate prefix {(plen, src, dst, proto, dport)}"
        seen.add((plen, k))


def lpm_lookup(entries, src, dst, proto, port):
    """Bit-level longest prefix match; returns (action, flags, rule_id) or None."""
    k = key_of(src, dst, proto, port)
    best = None
    for e in entries:
        plen = e[0]
        shift = KEY_BITS - plen
        if (k >> shift) == (key_of(*e[1:5]) >> shift) and (best is None or plen > best[0]):
            best = e
    return None if best is None else tuple(best[5:8])


def lpm_table(entries, src, dst, proto):
    """The lookup result for all 65536 ports of `proto`: paint shorter prefixes first."""
    table = [None] * 65536
    mine = [e for e in entries if e[1] == src and e[2] == dst and (e[0] == 64 or e[3] == proto)]
    for plen, _, _, _, dport, action, flags, rule_id in sorted(mine, key=lambda e: e[0]):
        size = 65536 if plen <= 80 else 1 << (KEY_BITS - plen)
        start = 0 if plen <= 80 else dport
        table[start:start + size] = [(action, flags, rule_id)] * size
    return table


# --- the naive reading of a rule list -------------------------------------------

def coverage(specs, proto) -> bytearray:
    """1 for every port of `proto` the spec list matches (None = everything)."""
    if specs is None:
        return bytearray([1]) * 65536
    cov = bytearray(65536)
    for s in specs:
        if s == "icmp":
            if proto in (ICMP, ICMP6):
                return bytearray([1]) * 65536
            continue
        name, ports = s.split("/")
        lo, _, hi = ports.partition("-")
        if PROTO[name] == proto:
            for p in range(int(lo), int(hi or lo) + 1):
                cov[p] = 1
    return cov


def naive_table(rules, dst_ports, mode, hostnames, proto):
    dst_cov = coverage(dst_ports, proto)
    ranked = []
    for rule_id, r in enumerate(rules, 1):
        action = r.get("action", "allow")
        if hostnames and "http" not in r:
            # Any rule to a hostname app is decided by the ClientHello: an SNI
            # gate at the trie level; its own action lives in sni_entries.
            ranked.append((1, rule_id, (int(Action.SNI), 0, rule_id), coverage(r.get("ports"), proto)))
            continue
        if action in ("deny", "reject"):
            audit = r.get("mode") == "audit" or mode == "audit"
            rank, act, flags = (3 if audit else 4), (Action.DENY if action == "deny" else Action.REJECT), \
                (ACTF_AUDIT if audit else 0)
        elif "http" in r:
            rank, act, flags = 2, Action.L7, 0
        else:
            rank, act, flags = 1, (Action.SNI if hostnames else Action.ALLOW), 0
        ranked.append((rank, rule_id, (int(act), flags, rule_id), coverage(r.get("ports"), proto)))
    out = []
    for port in range(65536):
        best = None
        for rank, _, verdict, cov in ranked:  # file order: only a strictly higher rank overtakes
            if cov[port] and dst_cov[port] and (best is None or rank > best[0]):
                best = (rank, verdict)
        out.append(None if best is None else best[1])
    return out


def assert_trie_matches_rules(tmp_path, rules, dst_ports=None, mode=None, hostnames=None):
    bundle = compile_doc(tmp_path, pair_policy(rules, dst_ports, mode, hostnames))
    entries = bundle.policy_entries
    check_well_formed(entries)
    rng = random.Random(1)
    for proto in (TCP, UDP, SCTP, ICMP, ICMP6, GRE):
        want = naive_table(rules, dst_ports, mode, hostnames, proto)
        got = lpm_table(entries, 1, 2, proto)
        # Port 0 included: no port spec names it, so only any-protocol rules
        # match it, on both sides.
        if proto in (TCP, UDP, SCTP):
            bad = [p for p in range(65536) if got[p] != want[p]]
            assert not bad, f"proto {proto}: first mismatch at port {bad[0]}: trie {got[bad[0]]} naive {want[bad[0]]}"
        else:
            assert len(set(want)) == 1 and got[0] == want[0] and len(set(got)) == 1, proto
        # The painter agrees with bit-level matching (spot checks).
        for port in [0, 1, 65535] + rng.sample(range(65536), 40):
            assert lpm_lookup(entries, 1, 2, proto, port) == got[port]
    return bundle


TRIE_CASES = {
    "deny-any-beats-allow-443": dict(rules=[{"ports": ["tcp/443"]}, {"action": "deny"}]),
    "allow-any-deny-22": dict(rules=[{}, {"action": "deny", "ports": ["tcp/22"]}]),
    "overlapping-ranges": dict(rules=[
        {"ports": ["tcp/1000-2000"]},
        {"action": "deny", "mode": "audit", "ports": ["tcp/1500-2500"]},
        {"ports": ["tcp/1800-1900", "tcp/3000-3999"], "http": [{"methods": ["GET"]}]},
        {"ports": ["udp/53", "sctp/5-10"]},
        {"action": "reject", "mode": "audit", "ports": ["tcp/1-65535"]},
        {"action": "deny", "ports": ["icmp", "udp/40-60"]},
    ]),
    "app-ports-intersection": dict(dst_ports=["tcp/8000-8100", "udp/53", "icmp"], rules=[
        {},
        {"action": "deny", "ports": ["tcp/8050-9000"]},
        {"action": "reject", "mode": "audit", "ports": ["icmp"]},
        {"ports": ["udp/1-100", "tcp/7000-8010"]},
    ]),
    "ties-go-to-the-earlier-rule": dict(rules=[
        {"action": "deny", "ports": ["tcp/100-200"]},
        {"action": "reject", "ports": ["tcp/150-250"]},
        {"ports": ["tcp/1-65535"]},
        {"action": "deny", "mode": "audit"},
        {"action": "reject", "mode": "audit"},
        {},
    ]),
    "settings-audit": dict(mode="audit", rules=[
        {}, {"action": "deny", "ports": ["tcp/22"]}, {"action": "reject", "ports": ["udp/1-1024"]},
    ]),
    "sni-and-l7": dict(hostnames=["pay.example"], rules=[
        {"ports": ["tcp/443", "tcp/1-1000"]},
        {"ports": ["tcp/80"], "http": [{"paths": ["/"]}]},
        {"action": "deny", "ports": ["tcp/440-450"]},
    ]),
    "icmp-only-under-any-deny": dict(rules=[{"ports": ["icmp"]}, {"action": "deny", "mode": "audit"}]),
}


@pytest.mark.parametrize("name", sorted(TRIE_CASES))
def test_trie_matches_naive_precedence(tmp_path, name):
    assert_trie_matches_rules(tmp_path, **TRIE_CASES[name])


def _random_rules(rng: random.Random):
    def spec():
        kind = rng.choice(["tcp", "tcp", "udp", "sctp", "icmp"])
        if kind == "icmp":
            return "icmp"
        lo = rng.choice([1, 22, 80, 443, 1000, 1024, 8000, 32768, rng.randint(1, 65535)])
        hi = min(65535, lo + rng.choice([0, 0, 1, 7, 100, 1000, 40000]))
        return f"{kind}/{lo}" if lo == hi else f"{kind}/{lo}-{hi}"

    rules = []
    for _ in range(rng.randint(1, 6)):
        r = {}
        if rng.random() < 0.8:
            r["ports"] = [spec() for _ in range(rng.randint(1, 3))]
        r["action"] = rng.choice(["allow", "allow", "deny", "reject"])
        if r["action"] == "allow" and rng.random() < 0.3:
            r["http"] = [{"methods": ["GET"]}]
        if rng.random() < 0.3:
            r["mode"] = "audit"
        rules.append(r)
    dst_ports = None
    if rng.random() < 0.4:
        dst_ports = ["tcp/1-10000", "udp/53", "icmp"]
    return rules, dst_ports


@pytest.mark.parametrize("seed", range(6))
def test_trie_matches_naive_precedence_random(tmp_path, seed):
    rng = random.Random(seed)
    while True:
        rules, dst_ports = _random_rules(rng)
        try:
            assert_trie_matches_rules(tmp_path, rules, dst_ports, mode=rng.choice([None, "audit"]))
            return
        except PolicyError as e:
            # A random rule whose ports miss the app's ports is invalid: draw again.
            # ... or an L7 rule covering tcp/443 of an app without tls: invalid too.
            assert "nothing in common" in str(e) or "terminate TLS" in str(e)


# --- concrete expectations --------------------------------------------------------

def test_example_compiles_to_expected_entries():
    bundle, warnings = load_policy([EXAMPLE])
    assert warnings == []
    assert bundle.settings == {"default_action": "deny", "mode": "enforce", "unknown_sni": "deny",
                               "http": {"via": False, "x_forwarded_for": False, "max_header_bytes": 16384,
                                        "header_timeout": 10, "idle_timeout": 60}}
    assert [(s["id"], s["name"], s["interfaces"]) for s in bundle.segments] == [
        (1, "prod", ["bh-prod"]), (2, "dev", ["bh-dev"]), (3, "core", ["bh-core"])]
    assert [(a["id"], a["name"], a["segment"]) for a in bundle.apps] == [
        (1, "web", "prod"), (2, "laptops", "dev"), (3, "payments", "core"), (4, "catalog", "core")]
    payments = bundle.apps[2]
    assert payments["addresses"] == ["198.19.0.10/32"] and payments["ports"] == ["tcp/443"]
    assert payments["hostnames"] == ["pay.example.internal"]
    assert bundle.rules[1] == {"id": 2, "name": "web-reads-catalog", "from": "web", "to": "catalog",
                               "action": "allow", "mode": "enforce", "ports": [], "l7": True,
                               "http": [{"methods": ["GET", "HEAD"], "paths": ["/items", "/items/*"]}]}
    assert bundle.rules[2]["mode"] == "audit" and bundle.rules[2]["action"] == "deny"

    v4 = lambda a: b"\0" * 10 + b"\xff\xff" + ipaddress.IPv4Address(a).packed  # noqa: E731
    # web and laptops share 198.18.1.0/24 but live in different segments.
    assert bundle.src_entries == [
        (1, v4("198.18.1.0"), 120, 1), (2, v4("198.18.1.0"), 120, 2),
        (3, v4("198.19.0.10"), 128, 3), (3, v4("198.19.0.20"), 128, 4)]
    # Only apps that are some rule's `to:` are destinations.
    assert bundle.dst_entries == [(v4("198.19.0.10"), 128, 3, 3), (v4("198.19.0.20"), 128, 4, 3)]
    assert bundle.policy_entries == [
        (96, 1, 3, TCP, 443, int(Action.SNI), 0, 1),  # allow to a hostname app: decided on SNI
        (96, 1, 4, TCP, 80, int(Action.L7), 0, 2),
        (96, 2, 4, TCP, 80, int(Action.DENY), ACTF_AUDIT, 3),
    ]
    assert bundle.source == [EXAMPLE]


def test_ipv6_identity_entries(tmp_path):
    doc = pair_policy([{}])
    doc["apps"][0]["addresses"] = ["fd00:a::/64", "198.18.0.0/24", "2001:db8::7"]
    bundle = compile_doc(tmp_path, doc)
    assert bundle.src_entries[0] == (1, ipaddress.IPv6Address("fd00:a::").packed, 64, 1)
    assert bundle.src_entries[1][2] == 96 + 24
    assert bundle.src_entries[2] == (1, ipaddress.IPv6Address("2001:db8::7").packed, 128, 1)
    assert bundle.dst_entries[1] == (ipaddress.IPv6Address("fd00:b::1").packed, 128, 2, 2)
    assert bundle.apps[0]["addresses"] == ["fd00:a::/64", "198.18.0.0/24", "2001:db8::7/128"]


@pytest.mark.parametrize("order", ["allow-first", "deny-first"])
def test_deny_beats_allow_in_either_order(tmp_path, order):
    rules = [{"ports": ["tcp/443"]}, {"action": "deny", "ports": ["tcp/443"]}]
    if order == "deny-first":
        rules.reverse()
    bundle = compile_doc(tmp_path, pair_policy(rules))
    deny_id = 2 if order == "allow-first" else 1
    assert bundle.policy_entries == [(96, 1, 2, TCP, 443, int(Action.DENY), 0, deny_id)]


def test_audit_flags(tmp_path):
    rules = [{"action": "deny", "mode": "audit", "ports": ["tcp/22"]}, {"action": "reject", "ports": ["tcp/23"]},
             {"ports": ["tcp/24"], "mode": "audit"}]
    b = compile_doc(tmp_path, pair_policy(rules))
    assert [(e[4], e[5], e[6]) for e in b.policy_entries] == [
        (22, int(Action.DENY), ACTF_AUDIT), (23, int(Action.REJECT), 0), (24, int(Action.ALLOW), 0)]
    b = compile_doc(tmp_path, pair_policy(rules, mode="audit"))
    assert [(e[4], e[6]) for e in b.policy_entries] == [(22, ACTF_AUDIT), (23, ACTF_AUDIT), (24, 0)]
    assert b.settings["mode"] == "audit"


def test_enforced_deny_beats_audited_deny_beats_l7_beats_allow(tmp_path):
    rules = [{"ports": ["tcp/1-4"]},
             {"ports": ["tcp/2-4"], "http": [{"methods": ["GET"]}]},
             {"action": "deny", "mode": "audit", "ports": ["tcp/3-4"]},
             {"action": "reject", "ports": ["tcp/4"]}]
    b = compile_doc(tmp_path, pair_policy(rules))
    assert [(e[0], e[4], e[7]) for e in b.policy_entries] == [(96, 1, 1), (96, 2, 2), (96, 3, 3), (96, 4, 4)]


def test_entry_counts_stay_small(tmp_path):
    b = compile_doc(tmp_path, pair_policy([{"ports": ["tcp/1-65535"]}]))
    assert len(b.policy_entries) == 16  # 1, 2-3, 4-7, ..., 32768-65535
    # deny-everything + allow 443: the deny wins everywhere, one entry is enough.
    b = compile_doc(tmp_path, pair_policy([{"ports": ["tcp/443"]}, {"action": "deny"}]))
    assert b.policy_entries == [(64, 1, 2, 0, 0, int(Action.DENY), 0, 2)]
    # allow-everything + deny 22: the any-protocol entry plus one exception.
    b = compile_doc(tmp_path, pair_policy([{}, {"action": "deny", "ports": ["tcp/22"]}]))
    assert b.policy_entries == [(64, 1, 2, 0, 0, 1, 0, 1), (96, 1, 2, TCP, 22, 2, 0, 2)]
    # Many overlapping wide ranges: bounded by ~30 blocks per distinct run.
    rules = [{"ports": [f"tcp/{lo}-65535"], "action": a} for lo, a in
             [(1, "allow"), (1024, "deny"), (2048, "allow"), (30000, "reject")]]
    b = compile_doc(tmp_path, pair_policy(rules))
    assert len(b.policy_entries) <= 4 * 30


def test_icmp_is_both_families_at_prefix_72(tmp_path):
    b = compile_doc(tmp_path, pair_policy([{"ports": ["icmp"]}]))
    assert b.policy_entries == [(72, 1, 2, ICMP, 0, 1, 0, 1), (72, 1, 2, ICMP6, 0, 1, 0, 1)]


def test_from_equals_to_and_unused_apps(tmp_path):
    doc = pair_policy([])
    doc["rules"] = [{"name": "self", "from": "src", "to": "src", "ports": ["udp/5353"]}]
    b = compile_doc(tmp_path, doc)
    assert b.policy_entries == [(96, 1, 1, UDP, 5353, 1, 0, 1)]
    assert [e[2] for e in b.dst_entries] == [1]  # dst app is no destination: no entry


# --- the bundle ---------------------------------------------------------------------

def test_bundle_round_trip():
    bundle, _ = load_policy([EXAMPLE])
    data = bundle.pack()
    back = Bundle.unpack(data)
    assert back == bundle
    assert back.checksum == bundle.checksum
    assert isinstance(back.policy_entries[0], tuple) and isinstance(back.src_entries[0][1], bytes)


def test_bundle_checksum_detects_tampering():
    bundle, _ = load_policy([EXAMPLE])
    d = msgpack.unpackb(bundle.pack(), raw=False)
    d["policy_entries"][0][5] = int(Action.ALLOW)  # turn a verdict around, keep the checksum
    with pytest.raises(ValueError, match="checksum mismatch"):
        Bundle.unpack(msgpack.packb(d, use_bin_type=True))


def test_bundle_checksum_is_deterministic(tmp_path):
    a, _ = load_policy([EXAMPLE])
    b, _ = load_policy([EXAMPLE])
    assert a.checksum == b.checksum


# --- gateways (a fleet) -------------------------------------------------------------

FLEET = os.path.join(os.path.dirname(EXAMPLE), "fleet.yaml")
DEMO = os.path.join(os.path.dirname(EXAMPLE), "demo.yaml")


def test_policy_without_gateways_packs_as_before_fleets(monkeypatch):
    """Bundles from before gateways existed must keep their bytes: agents compare checksums."""
    monkeypatch.chdir(REPO)  # the bundle records the path as given
    bundle, _ = load_policy(["policies/demo.yaml"])
    # The checksum policies/demo.yaml had before `gateways:` was added (commit 4b132ad); an edit
    # of demo.yaml itself changes it: recompute it with that commit's agent/policy.
    assert bundle.checksum == "3ec2787534849bbdefb9edf3870643ddee0b7c7fd8d0b274e7c1d2137c5308bc"
    assert bundle.gateways == [] and all(s["gateway"] is None for s in bundle.segments)
    d = msgpack.unpackb(bundle.pack(), raw=False)
    assert "gateways" not in d and all("gateway" not in s for s in d["segments"])
    back = Bundle.unpack(bundle.pack())
    assert back == bundle and back.segments[0]["gateway"] is None


def test_bundle_packed_before_gateways_still_loads():
    """A bundle written by an agent without fleet support: no gateways, no segment gateway."""
    bundle, _ = load_policy([DEMO])
    d = {f: v for f, v in msgpack.unpackb(bundle.pack(), raw=False).items() if f != "checksum"}
    d["segments"] = [{"id": s["id"], "name": s["name"], "interfaces": s["interfaces"]} for s in d["segments"]]
    d["checksum"] = Bundle._digest(d)
    back = Bundle.unpack(msgpack.packb(d, use_bin_type=True))
    assert back.gateways == [] and [s["gateway"] for s in back.segments] == [None, None, None]
    assert back.checksum == bundle.checksum


def test_fleet_bundle_round_trip_and_checksum_covers_gateways():
    bundle, _ = load_policy([FLEET])
    assert bundle.gateways == ["gw-east", "gw-west"]
    assert [(s["id"], s["name"], s["interfaces"], s["gateway"]) for s in bundle.segments] == [
        (1, "prod", ["bh-prod"], "gw-east"), (2, "core", ["bh-core"], "gw-east"),
        (3, "dev", ["bh-dev"], "gw-west"), (4, "core2", ["bh-core"], "gw-west")]
    back = Bundle.unpack(bundle.pack())
    assert back == bundle and back.checksum == bundle.checksum
    d = msgpack.unpackb(bundle.pack(), raw=False)
    d["segments"][3]["gateway"] = "gw-east"  # move a segment to another gateway, keep the checksum
    with pytest.raises(ValueError, match="checksum mismatch"):
        Bundle.unpack(msgpack.packb(d, use_bin_type=True))


def test_for_gateway_keeps_its_segments_and_their_sources_only():
    bundle, _ = load_policy([FLEET])
    apps = {a["name"]: a["id"] for a in bundle.apps}
    east, west = bundle.for_gateway("gw-east"), bundle.for_gateway("gw-west")
    assert [(s["id"], s["name"]) for s in east.segments] == [(1, "prod"), (2, "core")]
    assert [(s["id"], s["name"]) for s in west.segments] == [(3, "dev"), (4, "core2")]
    assert {(e[0], e[3]) for e in east.src_entries} == {(1, apps["web"]), (2, apps["payments"])}
    assert {(e[0], e[3]) for e in west.src_entries} == {(3, apps["laptops"]), (4, apps["inventory"])}
    assert sorted(east.src_entries + west.src_entries) == sorted(bundle.src_entries)
    for part in (east, west):
        assert part.apps == bundle.apps and part.rules == bundle.rules
        assert part.dst_entries == bundle.dst_entries and part.policy_entries == bundle.policy_entries
        assert part.settings == bundle.settings and part.gateways == bundle.gateways
        assert Bundle.unpack(part.pack()) == part
    assert bundle.segments[0]["gateway"] == "gw-east" and len(bundle.src_entries) == 8  # the whole is untouched
    with pytest.raises(ValueError, match="gateway 'gw-north' is not in this policy"):
        bundle.for_gateway("gw-north")
    demo, _ = load_policy([DEMO])
    with pytest.raises(ValueError, match="declares no gateways"):
        demo.for_gateway("gw-east")
