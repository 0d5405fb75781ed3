"""The policy file's schema: known keys, choices and limits (validate.py checks against them).

A new key goes here first; docs/policy.md is the reference users read.
"""
from __future__ import annotations

import re

POLICY_VERSION = 1

TOP_KEYS = ("version", "settings", "gateways", "fabric", "segments", "apps", "rules")
SETTINGS_KEYS = ("default_action", "mode", "unknown_sni", "http")
HTTP_SETTINGS_KEYS = ("via", "x_forwarded_for", "max_header_bytes", "header_timeout", "idle_timeout")
MAX_HEADER_BYTES = (1024, 1048576)
TIMEOUT_MAX = {"header_timeout": 3600, "idle_timeout": 86400}
# `transit:` (docs/fabric.md): the address other gateways reach this one at (VXLAN underlay)
GATEWAY_KEYS = ("name", "transit", "wireguard")
# `wireguard:` (docs/fabric.md "Encryption between gateways"): the transit address lives on the
# gateway's WireGuard interface, reached at `endpoint` (underlay ADDR:PORT)
WIREGUARD_KEYS = ("public_key", "endpoint")
SEGMENT_KEYS = ("name", "interfaces", "gateway", "dns", "transit_snat")
APP_KEYS = ("name", "segment", "addresses", "ports", "hostnames", "tls", "publish", "routes")
TLS_KEYS = ("cert", "key", "ca")
# `fabric:` (docs/fabric.md): service addresses (VIPs), the gateways' DNS, the transit's UDP port
FABRIC_KEYS = ("service_addresses", "upstream_dns", "dns_ttl", "transit_port")
ROUTE_KEYS = ("sni", "host", "path", "to")
DNS_TTL_DEFAULT = 30
DNS_TTL_MAX = 86400
TRANSIT_PORT_DEFAULT = 4789  # VXLAN's IANA port
# With transit, an app id travels as the VXLAN GBP group id and a segment id as the VNI's
# segment field: both 16 bits.
MAX_TRANSIT_APPS = 65535
RULE_KEYS = ("name", "from", "to", "action", "ports", "mode", "http")

SETTING_CHOICES = {
    "default_action": ("deny", "allow"),
    "mode": ("enforce", "audit"),
    "unknown_sni": ("deny", "allow"),
}
RULE_ACTIONS = ("allow", "deny", "reject")
RULE_MODES = ("enforce", "audit")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NAME_RULE = "1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"

# Linux dev_valid_name(): shorter than IFNAMSIZ (16), not "." or "..",
# no '/', ':' or whitespace.
IFNAME_MAX = 15
IFNAME_BAD = re.compile(r"[/:\s]")

# The segment id is 16 bits in the flow key (bh_flow4_key.segment_id).
MAX_SEGMENTS = 65535

HOSTNAME_MAX = 253
LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# L7 rules on these ports carry TLS: the verifier must terminate it to see requests.
TLS_PORTS = (443, 8443)
DST_OVERLAP_WHY = (
    "destinations are looked up by address only, so two destination apps may not share "
    "addresses, even in different segments"
)
