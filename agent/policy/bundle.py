"""The compiled policy: what the compiler produces and the datapath consumes.

A bundle is self-contained and host-independent (interfaces by name, never
ifindex), serialized with msgpack, versioned, and checksummed. It is what
`bulkhead policy apply` sends over the control socket, and what a fleet of
gateways would receive from a shared store.

Map entries are plain tuples so the bundle packs small and fast:

  src_entries:    (segment_id, addr16: bytes, prefixlen128: int, app_id)
                  prefixlen128 counts bits of the 16-byte address; IPv4
                  networks are IPv4-mapped (::ffff:a.b.c.d), so a /24 is 120.
  dst_entries:    (addr16: bytes, prefixlen128: int, app_id, segment_id)
  policy_entries: (prefixlen, src_app, dst_app, proto, dport, action, flags, rule_id)
                  prefixlen is the LPM prefix over src(32) dst(32) proto(8)
                  pad(8) port(16): 64 = any protocol, 72 = any port of
                  `proto`, 80+n = the first n bits of `dport` fixed.
                  Precedence is already resolved: the longest match is the verdict.
                  dst_app 0xFFFFFFFF (abi.APP_ANY) means "any destination that is
                  no app's address": hostname-only apps.
  sni_entries:    (name_hash64, src_app, dst_app, dport, action, flags, rule_id, app_id)
                  the server-name verdicts of flows whose policy entry says SNI;
                  hashes of the lowercased name or `*.` pattern (bulkhead.policy.sni);
                  dport 0 = any port; dst_app as above.
  fab_entries:    (kind, id, key_addr16: bytes, a, b, val_addr16: bytes)
                  the fab_N map: struct bh_fab_key {kind, id, addr} -> bh_fab_val {a, b, addr},
                  kind an enum bh_fab_kind (datapath.abi.FabKind); an unused address is 16 zero
                  bytes. VIP/REAL: a published app's service address <-> the real address it
                  translates to; with transit, SEG/APP/PEER/GW: which gateway each segment and app
                  is behind and where each gateway is reached. SELF is the agent's (it depends on
                  the gateway it runs as), never the compiler's.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
from bulkhead.core.gcpause import gc_paused
from bulkhead.datapath.abi import FAB_APP

BUNDLE_FORMAT = 1
# dst app id of the gateways' own DNS addresses (segments' `dns:`): not an app of the policy
APP_GATEWAY = 0xFFFFFFFE


def _checksum_covers(data: bytes, checksum: Any) -> bool:
    """Whether `checksum` is the digest of `data` without its checksum entry, read off the bytes.

    pack() writes the content map and then the checksum as its last entry, so the bytes the
    checksum was computed over are these bytes with the map's count one less and that entry cut
    off: hashing them verifies without packing the decoded content again (a quarter of a second
    at 100k rules). Bytes laid out otherwise (another encoder) return False, and unpack checks
    the slow way: the digest of the decoded content re-packed."""
    if not isinstance(checksum, str) or len(checksum) != 64 or not data or not 0x81 <= data[0] <= 0x8F:
        return False
    tail = b"\xa8checksum\xd9\x40" + checksum.encode()
    if not data.endswith(tail):
        return False
    h = hashlib.sha256(bytes([data[0] - 1]))
    h.update(memoryview(data)[1:len(data) - len(tail)])
    return h.hexdigest() == checksum


@dataclasses.dataclass
class Bundle:
    settings: dict[str, str]  # default_action, mode, unknown_sni
    # {"id", "name", "interfaces": [str], "gateway": str|None}; a None gateway is left out when
    # packed, so a policy without `gateways:` packs (and checksums) exactly as before fleets
    segments: list[dict[str, Any]]
    apps: list[dict[str, Any]]  # {"id", "name", "segment", "addresses", "ports", "hostnames", "tls": {cert, key, ca}|None}
    # {"id", "name", "from", "to", "action", "mode", "ports", "l7": bool, "http": [entries]|None}
    # (http entries as written, file paths made absolute: the verifier compiles them)
    rules: list[dict[str, Any]]
    src_entries: list[tuple]
    dst_entries: list[tuple]
    policy_entries: list[tuple]
    sni_entries: list[tuple] = dataclasses.field(default_factory=list)
    source: list[str] = dataclasses.field(default_factory=list)  # policy file paths
    warnings: list[str] = dataclasses.field(default_factory=list)
    format: int = BUNDLE_FORMAT
    # The policy's `gateways:` names; empty = one gateway, no fleet (then not packed at all).
    gateways: list[str] = dataclasses.field(default_factory=list)
    # `fabric:` settings (service_addresses, upstream_dns, dns_ttl) and the service addresses of
    # published apps (app name -> [addresses]); empty = no fabric (then not packed at all)
    fabric: dict[str, Any] = dataclasses.field(default_factory=dict)
    vips: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # Transit between gateways: {"port": UDP port, "gateways": {name: transit address}} (only the
    # gateways with `transit:`); empty = no transit (then not packed at all)
    transit: dict[str, Any] = dataclasses.field(default_factory=dict)
    fab_entries: list[tuple] = dataclasses.field(default_factory=list)  # empty: not packed

    def _content(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict deep-copies every entry (slow at 100k rules).
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # Fleet fields only when used: a bundle from before gateways keeps its bytes and checksum.
        for key in ("gateways", "fabric", "vips", "transit", "fab_entries"):
            if not d[key]:
                del d[key]
        d["segments"] = [s if s.get("gateway") is not None else {k: v for k, v in s.items() if k != "gateway"}
                         for s in self.segments]
        # Entries stay tuples: msgpack packs a tuple exactly as the list it unpacks to, so the
        # bytes and the checksum are those of lists, without copying 100k entries first.
        return d

    @staticmethod
    def _digest(content: dict[str, Any]) -> str:
        return hashlib.sha256(msgpack.packb(content, use_bin_type=True)).hexdigest()

    # unpack() keeps the bytes it read and the checksum it verified: the agent hands the same
    # bundle on (to the verifier) and records its checksum, and re-packing 100k rules costs
    # a quarter of a second each time. Nobody changes an unpacked bundle in place
    # (for_gateway and dataclasses.replace make new ones, which pack afresh).
    _wire = None  # (bytes, checksum); not a dataclass field: replace() and == ignore it

    @property
    def checksum(self) -> str:
        if self._wire is not None:
            return self._wire[1]
        with gc_paused():
            return self._digest(self._content())

    def pack(self) -> bytes:
        if self._wire is not None:
            return self._wire[0]
        with gc_paused():
            d = self._content()
            d["checksum"] = self._digest(d)
            return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> Bundle:
        with gc_paused():
            return cls._unpack(data)

    @classmethod
    def _unpack(cls, data: bytes) -> Bundle:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"unsupported bundle format {d.get('format') if isinstance(d, dict) else '?'}")
        checksum = d.pop("checksum", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown bundle fields: {sorted(unknown)}")
        b = cls(**d)
        b.src_entries = [tuple(e) for e in b.src_entries]
        b.dst_entries = [tuple(e) for e in b.dst_entries]
        b.policy_entries = [tuple(e) for e in b.policy_entries]
        b.sni_entries = [tuple(e) for e in b.sni_entries]
        b.fab_entries = [tuple(e) for e in b.fab_entries]
        if not _checksum_covers(data, checksum) and checksum != cls._digest(d):
            raise ValueError("bundle checksum mismatch")
        b.segments = [dict(s, gateway=s.get("gateway")) for s in b.segments]
        b._wire = (bytes(data), checksum)
        return b

    def for_gateway(self, name: str) -> Bundle:
        """What gateway `name` enforces: its segments and their source entries.

        Ids are unchanged, so rule and app ids in counters and flow logs mean the
        same on every gateway. Apps, rules, destination and policy entries are kept
        whole: a destination's address is looked up the same from any gateway, and
        entries for another gateway's source apps are never matched here. `transit` and
        `fab_entries` are kept whole too: they describe every gateway (where each segment
        and app is, where each gateway is reached).
        """
        if name not in self.gateways:
            known = ", ".join(self.gateways) or "none: it declares no gateways"
            raise ValueError(f"gateway {name!r} is not in this policy (gateways: {known})")
        segments = [s for s in self.segments if s.get("gateway") == name]
        ids = {s["id"] for s in segments}
        return dataclasses.replace(self, segments=segments,
                                   src_entries=[e for e in self.src_entries if e[0] in ids])

    def app_names(self) -> dict[int, str]:
        names = {a["id"]: a["name"] for a in self.apps}
        if self.fabric:
            names[APP_GATEWAY] = "(gateway dns)"
        return names

    def rule_names(self) -> dict[int, str]:
        return {r["id"]: r["name"] for r in self.rules}

    def segment_names(self) -> dict[int, str]:
        """Segment id -> name: this bundle's segments and, in a bundle cut to one gateway
        (for_gateway), the other gateways' segments that have apps, named from the apps and
        their FAB_APP entries (both kept whole): flows through the transit name them."""
        names = {s["id"]: s["name"] for s in self.segments}
        if self.fab_entries:
            seg_of = {a["id"]: a.get("segment") for a in self.apps}
            for kind, app_id, _key, seg_id, _gw, _val in self.fab_entries:
                if kind == FAB_APP and seg_id not in names and seg_of.get(app_id):
                    names[seg_id] = seg_of[app_id]
        return names
