"""Check policy files and build the validated model (model.Policy).

Validation runs in two passes so that one run reports every problem:

1. shape: each file on its own — known keys, types, names, addresses,
   ports, hostnames. A malformed field is reported and left out; the rest of
   its object is still built, so later checks can use it.
2. meaning: across all files — references between segments, apps and
   rules, address overlaps, port intersections, L7 rules on TLS ports.

L7 `http:` lists are compiled by the verifier's own compiler
(bulkhead.l7.rules.compile_rule), so validation and enforcement can never
disagree; its errors are mapped back to the line of the offending item. Key
files, API-key files and TLS material are loaded at validation time, and
their paths are stored absolute (relative paths are relative to the policy
file's directory), so the bundle is self-contained.

Nothing here raises until the end: `validate_files` raises one PolicyError
carrying every Diag, sorted by file and line.
"""
from __future__ import annotations

import ipaddress
import os
import ssl
from typing import Any, Optional

from bulkhead.policy import ports as portlib
from bulkhead.policy.checks import CrossChecks, suggest
from bulkhead.policy.fabric import FabricChecks
from bulkhead.policy.schema import (
    APP_KEYS,
    GATEWAY_KEYS,
    HOSTNAME_MAX,
    HTTP_SETTINGS_KEYS,
    IFNAME_BAD,
    IFNAME_MAX,
    LABEL_RE,
    MAX_HEADER_BYTES,
    MAX_SEGMENTS,
    NAME_RE,
    NAME_RULE,
    POLICY_VERSION,
    RULE_ACTIONS,
    RULE_KEYS,
    RULE_MODES,
    SEGMENT_KEYS,
    SETTINGS_KEYS,
    SETTING_CHOICES,
    TIMEOUT_MAX,
    TLS_KEYS,
    TOP_KEYS,
)
from bulkhead.policy.loader import YMap, YSeq, load_yaml, type_name
from bulkhead.l7.rules import HTTP_KEYS, RuleErrors, compile_rule
from bulkhead.l7.tokens import resolve as resolve_path
from bulkhead.policy.model import (
    Address,
    App,
    Diags,
    Gateway,
    HttpSettings,
    Loc,
    Policy,
    PolicyError,
    Rule,
    Segment,
    Settings,
    Tls,
)

def validate_files(paths: list[str]) -> Policy:
    """Load and check `paths` as one policy; raise PolicyError listing every problem."""
    diags = Diags(list(paths))
    builder = _Builder(diags)
    for path in paths:
        before = len(diags.errors)
        doc = load_yaml(path, diags)
        if len(diags.errors) > before and doc is None:
            builder.load_failed = True
            continue
        builder.add_document(path, doc)
    policy = builder.finish(list(paths))
    if diags.errors:
        raise PolicyError(diags.errors)
    policy.warnings = diags.warnings
    return policy


class _Builder(CrossChecks, FabricChecks):
    """Accumulates segments, apps and rules from every file, then cross-checks them."""

    def __init__(self, diags: Diags):
        self.diags = diags
        # A file that could not be parsed may hold the segment or app that a
        # reference points to: skip "not defined" errors rather than guess.
        self.load_failed = False
        self.version_loc: Optional[Loc] = None
        self.settings_loc: Optional[Loc] = None
        self.settings = Settings()
        self.gateways: dict[str, Gateway] = {}
        self.gateways_loc: Optional[Loc] = None  # the first `gateways:` key, None = no fleet
        self.segments: dict[str, Segment] = {}
        self.apps: dict[str, App] = {}
        self.rules: dict[str, Rule] = {}
        # (gateway as written, interface) -> (segment, where): every gateway has its own interfaces
        self.iface_owner: dict[tuple[Optional[str], str], tuple[str, Loc]] = {}
        self.tls_broken: set[str] = set()  # apps whose tls was given but invalid (already reported)
        self._app_order: Optional[dict[str, int]] = None

    def error(self, loc: Loc, message: str) -> None:
        self.diags.error(loc, message)

    # ------------------------------------------------------------- shape --

    def add_document(self, path: str, doc: Any) -> None:
        if doc is None or not isinstance(doc, YMap):
            # Nothing usable in this file: its absent definitions must not
            # turn into "version is required" or "not defined" errors too.
            self.load_failed = True
        if doc is None:
            self.error(Loc(path, 1), "the file is empty: a policy is a mapping with version: 1, "
                                     "settings, segments, apps and rules")
            return
        if not isinstance(doc, YMap):
            self.error(Loc(path, 1), f"a policy must be a mapping with keys {', '.join(TOP_KEYS)}, "
                                     f"got {type_name(doc)}")
            return
        self.check_keys(doc, TOP_KEYS, "policy")
        if "version" in doc:
            self.add_version(doc)
        if "settings" in doc:
            self.add_settings(doc)
        if "gateways" in doc:
            self.add_gateways(doc)
        if "fabric" in doc:
            self.add_fabric(doc)
        for i, m in self.entries(doc, "segments", "segment", SEGMENT_KEYS):
            self.add_segment(m, i)
        for i, m in self.entries(doc, "apps", "app", APP_KEYS):
            self.add_app(m, i)
        for i, m in self.entries(doc, "rules", "rule", RULE_KEYS):
            self.add_rule(m, i)

    def check_keys(self, m: YMap, allowed: tuple[str, ...], label: str) -> None:
        for key in m:
            if key not in allowed:
                self.error(m.loc(key), f"{label}: unknown key {key!r}{suggest(key, allowed)}; "
                                       f"allowed keys: {', '.join(allowed)}")

    def add_version(self, doc: YMap) -> None:
        loc = doc.loc("version")
        if self.version_loc is not None:
            self.error(loc, f"version is already set at {self.version_loc}: with several files, "
                            "write version and settings in only one of them")
            return
        self.version_loc = loc
        v = doc["version"]
        # bool is an int subclass: `version: true` must not pass as 1.
        if type(v) is not int or v != POLICY_VERSION:
            self.error(loc, f"unsupported version: got {type_name(v)}; this agent reads `version: {POLICY_VERSION}`")

    def add_settings(self, doc: YMap) -> None:
        loc = doc.loc("settings")
        if self.settings_loc is not None:
            self.error(loc, f"settings are already set at {self.settings_loc}: with several files, "
                            "write version and settings in only one of them")
            return
        self.settings_loc = loc
        s = doc["settings"]
        if s is None:
            return  # `settings:` with nothing under it: all defaults
        if not isinstance(s, YMap):
            self.error(loc, f"settings must be a mapping, got {type_name(s)}")
            return
        self.check_keys(s, SETTINGS_KEYS, "settings")
        for key, choices in SETTING_CHOICES.items():
            value = self.choice(s, key, choices, getattr(self.settings, key), "settings")
            setattr(self.settings, key, value)
        if "http" in s:
            self.add_http_settings(s)

    def add_http_settings(self, s: YMap) -> None:
        h = s["http"]
        out = self.settings.http = HttpSettings()
        if h is None:
            return
        if not isinstance(h, YMap):
            self.error(s.loc("http"), f"settings: http must be a mapping with keys "
                                      f"{', '.join(HTTP_SETTINGS_KEYS)}, got {type_name(h)}")
            return
        self.check_keys(h, HTTP_SETTINGS_KEYS, "settings http")
        for key in ("via", "x_forwarded_for"):
            if key in h:
                if isinstance(h[key], bool):
                    setattr(out, key, h[key])
                else:
                    self.error(h.loc(key), f"settings http: {key} must be true or false, got {type_name(h[key])}")
        if "max_header_bytes" in h:
            v = h["max_header_bytes"]
            lo, hi = MAX_HEADER_BYTES
            if type(v) is int and lo <= v <= hi:
                out.max_header_bytes = v
            else:
                self.error(h.loc("max_header_bytes"), f"settings http: max_header_bytes must be an integer "
                                                      f"from {lo} to {hi}, got {type_name(v)}")
        for key, hi in TIMEOUT_MAX.items():
            if key in h:
                v = h[key]
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= hi:
                    setattr(out, key, v)
                else:
                    self.error(h.loc(key), f"settings http: {key} must be a number of seconds above 0 and "
                                           f"at most {hi}, got {type_name(v)}")

    def choice(self, m: YMap, key: str, choices: tuple[str, ...], default: str, label: str) -> str:
        """An enumerated string value; reports and returns `default` when wrong."""
        if key not in m:
            return default
        v = m[key]
        if not isinstance(v, str) or v not in choices:
            self.error(m.loc(key), f"{label}: {key} must be one of {' | '.join(choices)}, got {type_name(v)}")
            return default
        return v

    def entries(self, doc: YMap, key: str, what: str, keys: tuple[str, ...]):
        """The mappings of a top-level list, with their 1-based position."""
        if key not in doc or doc[key] is None:
            return
        seq = doc[key]
        if not isinstance(seq, YSeq):
            self.error(doc.loc(key), f"{key} must be a list of {what}s, got {type_name(seq)}")
            return
        for i, item in enumerate(seq):
            if not isinstance(item, YMap):
                self.error(seq.loc(i), f"each entry of {key} must be a mapping with keys "
                                       f"{', '.join(keys)}, got {type_name(item)}")
                continue
            yield i + 1, item

    def name(self, m: YMap, kind: str, index: int, registry: dict) -> tuple[Optional[str], str]:
        """Check the `name:` of a segment/app/rule.

        Returns (name to register under, label for messages). An invalid but
        string name is still returned, so references to it do not cascade
        into "not defined" errors; None means do not register.
        """
        fallback = f"{kind} #{index} in {m.file}"
        if "name" not in m:
            self.error(m.loc(), f"{fallback} has no name")
            return None, fallback
        v = m["name"]
        if not isinstance(v, str):
            self.error(m.loc("name"), f"{kind} name must be a string, got {type_name(v)}")
            return None, fallback
        label = f"{kind} {v}"
        if not NAME_RE.fullmatch(v):
            self.error(m.loc("name"), f"{kind} name {v!r} is invalid: use {NAME_RULE}")
            label = f"{kind} {v!r}"
        if v in registry:
            self.error(m.loc("name"), f"duplicate {kind} name {v!r} (first defined at {registry[v].loc})")
            return None, label
        return v, label

    def string(self, m: YMap, key: str, label: str, required: bool = True) -> Optional[str]:
        if key not in m:
            if required:
                self.error(m.loc(), f"{label}: {key} is required")
            return None
        v = m[key]
        if not isinstance(v, str) or not v:
            self.error(m.loc(key), f"{label}: {key} must be a non-empty string, got {type_name(v)}")
            return None
        return v

    def string_list(self, m: YMap, key: str, label: str, what: str,
                    absent: Optional[str] = None) -> Optional[list[tuple[str, Loc]]]:
        """A non-empty list of strings, each with its line; None if absent or not a list.

        An empty list or a bare `key:` is an error rather than "absent":
        for `ports:` absent means *all*, and a list whose items were lost
        must not silently widen a rule. `absent` says what leaving the key
        out means, for the hint; None for required keys.
        """
        if key not in m:
            return None
        seq = m[key]
        if not isinstance(seq, YSeq) or not seq:
            hint = f" (leave {key} out to mean {absent})" if absent else ""
            self.error(m.loc(key), f"{label}: {key} must be a non-empty list of {what}, got "
                                   f"{type_name(seq)}{hint}")
            return None
        out = []
        for i, item in enumerate(seq):
            if not isinstance(item, str):
                hint = ""
                if key == "addresses" and isinstance(item, int):
                    hint = " (quote IPv6 addresses, e.g. \"2001:db8::1\")"
                self.error(seq.loc(i), f"{label}: each {key} entry must be a string, got {type_name(item)}{hint}")
                continue
            out.append((item, seq.loc(i)))
        return out

    def add_gateways(self, doc: YMap) -> None:
        seq = doc["gateways"]
        if seq is None or (isinstance(seq, YSeq) and not seq):
            self.error(doc.loc("gateways"), "gateways must be a non-empty list of {name: NAME} "
                                            "(leave it out for a policy enforced by one gateway)")
            return
        if self.gateways_loc is None:
            self.gateways_loc = doc.loc("gateways")
        for i, m in self.entries(doc, "gateways", "gateway", GATEWAY_KEYS):
            name, label = self.name(m, "gateway", i, self.gateways)
            self.check_keys(m, GATEWAY_KEYS, label)
            transit = None
            if "transit" in m:
                v = m["transit"]
                if isinstance(v, str):
                    transit = self.host_address(v, m.loc("transit"), f"{label}: transit")
                else:
                    self.error(m.loc("transit"), f"{label}: transit must be one IPv4 or IPv6 address (the "
                                                 f"address other gateways reach it at), got {type_name(v)}")
            wg = self.gateway_wireguard(m, label) if "wireguard" in m else None
            if name is not None:
                self.gateways[name] = Gateway(name, m.loc(), transit, m.loc("transit") if "transit" in m else None,
                                              wg, m.loc("wireguard") if "wireguard" in m else None)

    def add_segment(self, m: YMap, index: int) -> None:
        name, label = self.name(m, "segment", index, self.segments)
        self.check_keys(m, SEGMENT_KEYS, label)
        # Checked against `gateways:` in the second pass: another file may declare them.
        gateway = self.string(m, "gateway", label, required=False)
        interfaces: list[str] = []
        if "interfaces" not in m:
            self.error(m.loc(), f"{label}: interfaces is required (the interfaces whose traffic "
                                "belongs to this segment)")
        for ifname, loc in self.string_list(m, "interfaces", label, "interface names") or []:
            if not (1 <= len(ifname) <= IFNAME_MAX) or IFNAME_BAD.search(ifname) or ifname in (".", ".."):
                self.error(loc, f"{label}: interface name {ifname!r} is invalid: Linux interface names "
                                f"are 1-{IFNAME_MAX} characters without '/', ':' or whitespace")
                continue
            owner = self.iface_owner.get((gateway, ifname))
            if owner is not None:
                where = "listed twice in this segment" if owner[0] == name else f"already in segment {owner[0]}"
                on = f" on gateway {gateway}" if gateway is not None else ""
                self.error(loc, f"{label}: interface {ifname!r} is {where} ({owner[1]}); "
                                f"an interface belongs to one segment{on}")
                continue
            self.iface_owner[(gateway, ifname)] = (name or label, loc)
            interfaces.append(ifname)
        if name is None:
            return
        if len(self.segments) == MAX_SEGMENTS:
            self.error(m.loc("name"), f"{label}: too many segments (at most {MAX_SEGMENTS})")
            return
        dns, dns_loc = self.segment_dns(m, label)
        snat, snat_loc = self.segment_transit_snat(m, label)
        self.segments[name] = Segment(name, interfaces, m.loc(), gateway,
                                      m.loc("gateway") if "gateway" in m else None, dns, dns_loc, snat, snat_loc)

    def add_app(self, m: YMap, index: int) -> None:
        name, label = self.name(m, "app", index, self.apps)
        self.check_keys(m, APP_KEYS, label)
        segment = self.string(m, "segment", label, required="routes" not in m)  # a router needs none
        addresses = []
        for text, loc in self.string_list(m, "addresses", label, "addresses or CIDRs", "none") or []:
            net = self.address(text, loc, label)
            if net is not None:
                addresses.append(Address(net, loc))
        app_ports = self.port_specs(m, label)
        hostnames: list[str] = []
        for text, loc in self.string_list(m, "hostnames", label, "DNS names", "none") or []:
            host = self.hostname(text, loc, label)
            if host is not None and host not in hostnames:
                hostnames.append(host)
        tls = self.tls(m, label) if "tls" in m else None
        if "tls" in m and tls is None and name is not None:
            self.tls_broken.add(name)
        routes = self.app_routes(m, label) if "routes" in m else None
        if "addresses" not in m and "hostnames" not in m and "routes" not in m:
            self.error(m.loc(), f"{label} needs addresses or hostnames (or both)")
        publish, dns_names, publish_loc = self.app_publish(m, label)
        if name is None:
            return
        self.apps[name] = App(name, segment, addresses, app_ports, hostnames, tls,
                              m.loc(), m.loc("segment"), m.loc("ports"), publish, publish_loc,
                              (hostnames if dns_names is None else dns_names) if publish else [],
                              routes, m.loc("routes") if "routes" in m else None)

    def address(self, text: str, loc: Loc, label: str):
        """Parse an address or CIDR; host bits set is an error, not a silent mask."""
        if "%" in text:
            self.error(loc, f"{label}: {text!r}: scoped addresses (with %zone) are not supported")
            return None
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.error(loc, f"{label}: {text!r} is not an IPv4 or IPv6 address or CIDR")
            return None
        host = text.split("/", 1)[0]
        self.error(loc, f"{label}: {text!r} has host bits set: write {loose} for the network, "
                        f"or {host}/{loose.max_prefixlen} for the one address")
        return None

    def hostname(self, text: str, loc: Loc, label: str) -> Optional[str]:
        """Normalize a DNS name (lowercase, no trailing dot) or report why it is not one."""
        host = text.lower()
        if host.endswith("."):
            host = host[:-1]
        labels = host.split(".")
        check = labels[1:] if labels[0] == "*" else labels
        try:
            ipaddress.ip_address(host)
            is_address = True
        except ValueError:
            is_address = False
        why = None
        if is_address:
            why = "it is an address: put it in addresses (TLS server names are never addresses)"
        elif not host or len(host) > HOSTNAME_MAX:
            why = f"a DNS name is 1-{HOSTNAME_MAX} characters"
        elif "*" in "".join(check):
            why = "'*' is allowed only as the whole left-most label, as in *.example.com"
        elif not check:
            why = "a wildcard needs a domain after it, as in *.example.com"
        elif not all(LABEL_RE.fullmatch(lab) for lab in check):
            why = "each label is 1-63 letters, digits or '-', not starting or ending with '-'"
        if why:
            self.error(loc, f"{label}: hostname {text!r} is invalid: {why}")
            return None
        return host

    def tls(self, m: YMap, label: str) -> Optional[Tls]:
        """cert + key (+ ca): paths made absolute, and checked to load as the verifier will load them."""
        t = m["tls"]
        if not isinstance(t, YMap):
            self.error(m.loc("tls"), f"{label}: tls must be a mapping with cert and key (file paths) and "
                                     f"optionally ca, got {type_name(t)}")
            return None
        what = f"{label} tls"
        self.check_keys(t, TLS_KEYS, what)
        base = _base_dir(t.file)
        paths = {}
        for key in TLS_KEYS:
            text = self.string(t, key, what, required=key != "ca")
            if text is None:
                continue
            path = resolve_path(text, base)
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                self.error(t.loc(key), f"{what}: cannot read {key} file {path}: {e.strerror or e}")
                continue
            paths[key] = path
        ok = True
        if "cert" in paths and "key" in paths:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                # A password callback that gives none: an encrypted key fails instead of prompting.
                ctx.load_cert_chain(paths["cert"], paths["key"], password=lambda: b"")
            except (ssl.SSLError, OSError, ValueError) as e:
                ok = False
                self.error(t.loc("cert"), f"{what}: cert {paths['cert']} and key {paths['key']} do not load "
                                          f"together ({_ssl_reason(e)}): give a PEM certificate (chain) and "
                                          "its unencrypted PEM private key")
        if "ca" in paths:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                ctx.load_verify_locations(cafile=paths["ca"])
            except (ssl.SSLError, OSError, ValueError) as e:
                ok = False
                self.error(t.loc("ca"), f"{what}: ca {paths['ca']} is not a PEM CA bundle ({_ssl_reason(e)})")
        if not ok or "cert" not in paths or "key" not in paths or ("ca" in t and "ca" not in paths):
            return None
        return Tls(paths["cert"], paths["key"], paths.get("ca"))

    def port_specs(self, m: YMap, label: str) -> Optional[list[portlib.PortSpec]]:
        items = self.string_list(m, "ports", label, "port specs like tcp/443", "all ports")
        if items is None:
            # Absent means all ports. Present but broken was reported; still
            # build the object as "all" — the policy is rejected anyway.
            return None
        specs = []
        for text, loc in items:
            try:
                specs.append(portlib.parse_port_spec(text))
            except portlib.PortSpecError as e:
                self.error(loc, f"{label}: {e}")
        return specs or None

    def add_rule(self, m: YMap, index: int) -> None:
        name, label = self.name(m, "rule", index, self.rules)
        self.check_keys(m, RULE_KEYS, label)
        src = self.string(m, "from", label)
        dst = self.string(m, "to", label)
        action = self.choice(m, "action", RULE_ACTIONS, "allow", label)
        mode = self.choice(m, "mode", RULE_MODES, "enforce", label)
        rule_ports = self.port_specs(m, label)
        http = self.http(m, label, name) if "http" in m else None
        if "http" in m and action in ("deny", "reject"):
            self.error(m.loc("http"), f"{label}: http conditions make an L7 allow rule; they cannot be "
                                      f"combined with action: {action}")
        if name is None:
            return
        self.rules[name] = Rule(name, src, dst, action, mode, rule_ports, http, m.loc(),
                                m.loc("from"), m.loc("to"), m.loc("ports"), m.loc("http"))

    def http(self, m: YMap, label: str, name: Optional[str]) -> Optional[list[dict]]:
        """Compile the L7 match list with the verifier's compiler; report each problem at its line.

        Returns the entries as plain values with token file paths made absolute.
        """
        seq = m["http"]
        if not isinstance(seq, YSeq) or not seq:
            self.error(m.loc("http"), f"{label}: http must be a non-empty list of request matches "
                                      f"(keys {', '.join(HTTP_KEYS)}), got {type_name(seq)}")
            return []
        base = _base_dir(seq.file)
        entries = _plain(seq)
        try:
            compile_rule(name or label, entries, base)
        except RuleErrors as e:
            for err in e.errors:
                self.error(_where_loc(seq, err.where), f"{label}: {err}")
        return [_absolute_paths(entry, base) for entry in entries]


def _base_dir(file: str) -> str:
    """Relative paths in a policy are relative to the directory of the file that holds them."""
    return os.path.dirname(os.path.abspath(file))


def _where_loc(seq: YSeq, where: tuple) -> Loc:
    """The deepest YAML location a RuleError's `where` (a path into the http list) reaches."""
    node: Any = seq
    loc = seq.loc()
    for w in where:
        if isinstance(node, YSeq) and isinstance(w, int) and 0 <= w < len(node):
            loc, node = node.loc(w), node[w]
        elif isinstance(node, YMap) and not isinstance(w, int) and w in node:
            loc, node = node.loc(w), node[w]
        else:
            break
    return loc


def _absolute_paths(entry: Any, base: str) -> Any:
    """An http entry with its tokens' key-file paths resolved against `base`."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tokens"), list):
        return entry
    items = []
    for item in entry["tokens"]:
        if isinstance(item, dict):
            item = dict(item)
            for key in ("jwt", "api_key"):
                if isinstance(item.get(key), str) and item[key]:
                    item[key] = resolve_path(item[key], base)
        items.append(item)
    return dict(entry, tokens=items)


def _ssl_reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    return getattr(e, "strerror", None) or str(e)


def _plain(value: Any) -> Any:
    """YMap/YSeq -> dict/list, so the model holds only msgpack-able values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
