"""Validation: every error kind at the right FILE:LINE, all reported in one pass.

Cases are YAML texts whose expected errors are written on the offending
line as `# ERR: fragment`; the test requires exactly those lines to carry
errors (no more, no fewer), each containing its fragment. That keeps the
line numbers correct by construction while the cases stay readable.
"""
from __future__ import annotations

import os
import re
import shutil
import textwrap

import pytest

from bulkhead.policy import Diag, PolicyError, load_policy

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "fixtures")
REPO = os.path.dirname(os.path.dirname(HERE))

# A valid start that cases extend: it ends inside the apps list.
BASE = """\
version: 1
segments:
  - name: prod
    interfaces: [bh-prod]
  - name: dev
    interfaces: [bh-dev]
  - name: core
    interfaces: [bh-core]
apps:
  - name: web
    segment: prod
    addresses: [198.18.1.0/24]
  - name: db
    segment: core
    addresses: [198.19.0.5]
    ports: [tcp/5432]
  - name: saas
    segment: core
    hostnames: [api.saas.example]
"""

_MARK = re.compile(r"#\s*ERR:\s*(.+?)\s*$")


def expected_marks(text: str) -> list[tuple[int, str]]:
    """(line, fragment) for every `# ERR: fragment` (several per line: `# ERR: a # ERR: b`)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if "# ERR:" in line:
            for frag in line.split("# ERR:")[1:]:
                out.append((n, frag.strip().rstrip("#").strip()))
    return out


def errors_of(paths: list[str]) -> list[Diag]:
    with pytest.raises(PolicyError) as e:
        load_policy(paths)
    return e.value.errors


def check_marks(path: str, text: str) -> None:
    expected = expected_marks(text)
    assert expected, "case has no ERR marker"
    got = errors_of([path])
    for d in got:
        assert d.file == path
    got_lines = sorted(d.line for d in got)
    assert got_lines == sorted(line for line, _ in expected), "\n".join(map(str, got))
    for line, frag in expected:
        msgs = [d.message for d in got if d.line == line]
        assert any(frag in m for m in msgs), f"line {line}: {frag!r} not in {msgs}"


CASES = {
    # --- top level ---------------------------------------------------------
    "version-missing": "segments: []   # ERR: version is required\n",
    "version-wrong": "version: 2     # ERR: unsupported version: got the number 2\n",
    "version-bool": "version: true  # ERR: got the boolean true\n",
    "version-string": "version: '1'   # ERR: unsupported version\n",
    "top-unknown-key": "version: 1\nrulez: []     # ERR: unknown key 'rulez' (did you mean 'rules'?)\n",
    "top-not-mapping": "- version: 1  # ERR: a policy must be a mapping\n",
    "empty-file": "# nothing but a comment  # ERR: the file is empty\n",
    "section-not-list": "version: 1\napps: {}      # ERR: apps must be a list of apps\n",
    "entry-not-mapping": "version: 1\nrules:\n  - just-a-name   # ERR: each entry of rules must be a mapping\n",
    # --- settings ----------------------------------------------------------
    "settings-values": """\
        version: 1
        settings:
          default_action: block   # ERR: default_action must be one of deny | allow
          mode: shadow            # ERR: mode must be one of enforce | audit
          unknown_sni: no         # ERR: got the boolean false
          moed: audit             # ERR: unknown key 'moed' (did you mean 'mode'?)
        """,
    "settings-not-mapping": "version: 1\nsettings: [deny]   # ERR: settings must be a mapping\n",
    # --- segments ----------------------------------------------------------
    "segment-names": """\
        version: 1
        segments:
          - interfaces: [a]       # ERR: segment #1 in
          - name: 123             # ERR: segment name must be a string, got the number 123
            interfaces: [b]
          - name: -bad            # ERR: segment name '-bad' is invalid
            interfaces: [c]
          - name: "x y"           # ERR: segment name 'x y' is invalid
            interfaces: [d]
          - name: ok
            interfaces: [e]
          - name: ok              # ERR: duplicate segment name 'ok'
            interfaces: [f]
          - name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa  # ERR: is invalid
            interfaces: [g]
        """,
    "segment-interfaces": """\
        version: 1
        segments:
          - name: a               # ERR: interfaces is required
          - name: b
            interfaces: []        # ERR: interfaces must be a non-empty list
          - name: c
            interfaces: eth0      # ERR: got the string 'eth0'
          - name: d
            interfaces:
              - abcdefghijklmnop  # ERR: interface name 'abcdefghijklmnop' is invalid
              - "with space"      # ERR: interface name 'with space' is invalid
              - "vlan:1"          # ERR: is invalid
              - 7                 # ERR: each interfaces entry must be a string
              - d0
              - d0                # ERR: listed twice in this segment
          - name: e
            interfaces: [x0, d0]  # ERR: interface 'd0' is already in segment d
        """,
    "segment-unknown-key": """\
        version: 1
        segments:
          - name: a
            interfaces: [a0]
            vlan: 10              # ERR: segment a: unknown key 'vlan'; allowed keys: name, interfaces
        """,
    # --- apps --------------------------------------------------------------
    "app-fields": BASE + """\
  - name: a1
    segment: nowhere           # ERR: app a1: segment 'nowhere' is not defined
    addresses:
      - 198.18.9.5/24          # ERR: write 198.18.9.0/24 for the network, or 198.18.9.5/32
      - "fd00::1/64"           # ERR: write fd00::/64 for the network
      - 300.1.2.3              # ERR: '300.1.2.3' is not an IPv4 or IPv6 address or CIDR
      - 198.18.9.0/33          # ERR: is not an IPv4 or IPv6 address
      - "fe80::1%eth0"         # ERR: scoped addresses
      - 1:2:3                  # ERR: quote IPv6 addresses
  - name: a2                   # ERR: app a2: segment is required # ERR: needs addresses or hostnames
    ports: [tcp/80]
  - name: a3
    segment: dev
    addresses: []              # ERR: addresses must be a non-empty list
  - name: a4
    segment: dev
    addresses: [198.18.50.0/24]
    ports: [tcp/0, udp/70000, tcp/9-3, tcp, icmpv6, http, tcp/1-2-3, 80]  # ERR: 'tcp/0' # ERR: 'udp/70000' # ERR: range start 9 is above its end 3 # ERR: tcp/1-65535 # ERR: icmp already means both # ERR: 'http' # ERR: 'tcp/1-2-3' # ERR: must be a string
    tls: {cert: /etc/c.pem}    # ERR: tls: key is required # ERR: cannot read cert file /etc/c.pem
  - name: a5
    segment: dev
    hostnames:
      - "*.ok.example"
      - "a.*.example"          # ERR: '*' is allowed only as the whole left-most label
      - "192.0.2.1"            # ERR: it is an address
      - "-bad.example"         # ERR: each label is
      - "*."                   # ERR: a wildcard needs a domain
      - "under_score.example"  # ERR: each label is
    tls: /etc/x.pem            # ERR: tls must be a mapping
  - name: a6
    segment: dev
    hostnames: [ok.example]
    tls: {cert: c, key: k, cas: x}  # ERR: app a6 tls: unknown key 'cas' (did you mean 'ca'?) # ERR: cannot read cert file # ERR: cannot read key file
    owner: me                  # ERR: app a6: unknown key 'owner'
""",
    "overlap-same-segment": BASE + """\
  - name: web2
    segment: prod
    addresses: [198.18.1.128/25]  # ERR: apps web and web2 overlap in segment prod: 198.18.1.0/24
  - name: v6a
    segment: dev
    addresses: ["fd00:1::/48"]
  - name: v6b
    segment: dev
    addresses: ["fd00:1:0:5::1"]  # ERR: apps v6a and v6b overlap in segment dev
  - name: mapped
    segment: prod
    addresses: ["::ffff:198.18.1.7"]  # ERR: apps web and mapped overlap
""",
    "destinations-distinct": BASE + """\
  - name: dbclone
    segment: dev
    addresses: [198.19.0.0/24]   # ERR: destinations are looked up by address only, so two destination apps may not share addresses, even in different segments
rules:
  - name: to-db
    from: web
    to: db
  - name: to-clone
    from: web
    to: dbclone
""",
    # --- rules -------------------------------------------------------------
    "rule-fields": BASE + """\
rules:
  - name: r1                   # ERR: rule r1: from is required
    to: db
  - name: r2
    from: wbe                  # ERR: from app 'wbe' is not defined (did you mean 'web'?)
    to: nothere                # ERR: to app 'nothere' is not defined
  - name: r3
    from: web
    to: db
    action: drop               # ERR: action must be one of allow | deny | reject, got the string 'drop'
    mode: shadow               # ERR: mode must be one of enforce | audit
  - name: r4
    from: web
    to: db
    ports: [udp/53]            # ERR: have nothing in common, so the rule could never match
  - name: r5
    from: saas                 # ERR: from app saas has no addresses
    to: db
  - name: r6
    from: web
    to: db
    ports: []                  # ERR: leave ports out to mean all ports
  - name: r7
    from: web
    to: db
    priority: 1                # ERR: unknown key 'priority'
""",
    "rule-http": BASE + """\
rules:
  - name: h1
    from: web
    to: db
    action: deny
    http: [{methods: [GET]}]   # ERR: cannot be combined with action: deny
  - name: h2
    from: web
    to: db
    action: reject
    http: [{paths: ["/"]}]     # ERR: cannot be combined with action: reject
  - name: h3
    from: web
    to: db
    http: {methods: [GET]}     # ERR: http must be a non-empty list of request matches
  - name: h4
    from: web
    to: db
    http:
      - GET                    # ERR: rule h4: http entry 1: each http entry must be a mapping
      - methods: GET           # ERR: http entry 2 methods: methods must be a non-empty list of HTTP methods like [GET, HEAD], got the string 'GET'
        cookies: [a]           # ERR: http entry 2 cookies: unknown key 'cookies'
      - headers: {x-a: b}
        tokens: [{jwt: /nonexistent/k}]  # ERR: http entry 3 tokens[0].jwt: cannot read key file /nonexistent/k
        hosts: [a.example]
""",
    # Every problem of the verifier's compiler, at the line of the offending item.
    "rule-http-items": BASE + """\
  - name: plain
    segment: core
    addresses: [198.19.0.80]
    ports: [tcp/80]
rules:
  - name: h1
    from: web
    to: plain
    http:
      - {}                     # ERR: rule h1: http entry 1: this entry has no conditions, so it matches every request: remove http to allow all
      - methods: [GET, "BAD ONE"]  # ERR: http entry 2 methods[1]: a method must be a token
        paths:
          - /ok/*
          - nope               # ERR: http entry 2 paths[1]: a path must be a string starting with '/'
          - /a/../b            # ERR: dot-segment
          - /%61dmin           # ERR: without %-escapes
        hosts: ["*", ok.example]  # ERR: '*' alone matches any host
      - headers:
          x-tenant: blue
          X-Tenant: red        # ERR: header x-tenant is given twice
          x-n: 5               # ERR: quote numbers
          x-m:
            regex: "a.*"       # ERR: exactly one of equals, glob, present
          x-p: {present: maybe}  # ERR: present must be true or false
      - tokens:
          - jwt: missing.pem   # ERR: tokens[0].jwt: cannot read key file
            algorithms: [none, RS256]  # ERR: algorithm none is never accepted
            colour: red        # ERR: unknown key 'colour'
          - api_key: keys.txt  # ERR: cannot read API key file
            header: "a b"      # ERR: header must be a header name
          - {}                 # ERR: exactly one of jwt (a key file) or api_key
""",
    "rule-http-tls-port": BASE + """\
  - name: web443
    segment: core
    addresses: [198.19.0.43]
    ports: [tcp/443, tcp/80]
  - name: anyport
    segment: core
    addresses: [198.19.0.44]
  - name: alt
    segment: core
    addresses: [198.19.0.45]
    ports: [tcp/8000-9000]
rules:
  - name: t1
    from: web
    to: web443
    http: [{methods: [GET]}]   # ERR: rule t1: http rules on TLS port tcp/443 need the verifier to terminate TLS: give app web443 `tls: {cert, key}`, or limit the rule's ports to plain-HTTP ports
  - name: t2
    from: web
    to: web443
    ports: [tcp/80]
    http: [{methods: [GET]}]
  - name: t3
    from: web
    to: anyport
    http: [{methods: [GET]}]   # ERR: http rules on TLS port tcp/443
  - name: t4
    from: web
    to: alt
    http: [{methods: [GET]}]   # ERR: http rules on TLS port tcp/8443 need the verifier
  - name: t5
    from: web
    to: anyport
    ports: [tcp/8080, tcp/3000-3999]
    http: [{methods: [GET]}]
  - name: t6
    from: web
    to: web443
    ports: [tcp/1-1000]
    http:                      # ERR: on TLS port tcp/443
      - methods: [GET]
""",
    "settings-http": """\
        version: 1
        settings:
          http:
            via: yes
            x_forwarded_for: 1       # ERR: settings http: x_forwarded_for must be true or false, got the number 1
            max_header_bytes: 512    # ERR: max_header_bytes must be an integer from 1024 to 1048576, got the number 512
            header_timeout: 0        # ERR: header_timeout must be a number of seconds above 0
            idle_timeout: "60"       # ERR: idle_timeout must be a number of seconds above 0 and at most 86400, got the string '60'
            keepalive: 5             # ERR: settings http: unknown key 'keepalive'
        """,
    "settings-http-shape": "version: 1\nsettings:\n  http: [via]   # ERR: settings: http must be a mapping\n",
    # --- gateways (a fleet) --------------------------------------------------
    "gateway-entries": """\
        version: 1
        gateways:
          - name: gw-east
          - name: gw/west          # ERR: gateway name 'gw/west' is invalid
          - name: gw-east          # ERR: duplicate gateway name 'gw-east'
          - {name: gw-north, transmit: 198.18.100.9}   # ERR: gateway gw-north: unknown key 'transmit' (did you mean 'transit'?)
          - gw-south               # ERR: each entry of gateways must be a mapping
          - {}                     # ERR: gateway #6 in
        """,
    "gateways-empty": "version: 1\ngateways: []   # ERR: gateways must be a non-empty list\n",
    "gateways-not-list": "version: 1\ngateways: gw-east   # ERR: gateways must be a list of gateways\n",
    "gateway-without-gateways": """\
        version: 1
        segments:
          - name: prod
            gateway: gw-east       # ERR: segment prod: gateway needs the gateways declared: add a top-level `gateways:`
            interfaces: [bh-prod]
        """,
    "gateway-missing-or-unknown": """\
        version: 1
        gateways: [{name: gw-east}, {name: gw-west}]
        segments:
          - name: prod             # ERR: segment prod: gateway is required: the policy declares gateways (gw-east, gw-west)
            interfaces: [bh-prod]
          - name: dev
            gateway: gw-wset       # ERR: segment dev: gateway 'gw-wset' is not defined (did you mean 'gw-west'?)
            interfaces: [bh-dev]
          - name: core
            gateway: 7             # ERR: segment core: gateway must be a non-empty string, got the number 7
            interfaces: [bh-core]
          - {name: east, gateway: gw-east, interfaces: [bh-east]}
        apps:
          - {name: web, segment: dev, addresses: [198.18.1.0/24]}
          - {name: db, segment: east, addresses: [198.19.0.5]}
        rules:
          - {name: web-db, from: web, to: db}   # no "across gateways" on top of the errors above
        """,
    "gateway-interfaces": """\
        version: 1
        gateways: [{name: gw-east}, {name: gw-west}]
        segments:
          - name: prod
            gateway: gw-east
            interfaces: [bh-prod, bh-core]
          - name: core
            gateway: gw-east
            interfaces: [bh-core]  # ERR: segment core: interface 'bh-core' is already in segment prod (
          - name: dev
            gateway: gw-west
            interfaces: [bh-prod, bh-core]
        """,
    "gateway-transit": """\
        version: 1
        gateways:
          - {name: gwa, transit: 198.18.100.1}
          - {name: gwb, transit: 198.18.100.0/24}   # ERR: gateway gwb: transit: '198.18.100.0/24' is not an IPv4 or IPv6 address (one address, no /prefix)
          - {name: gwc, transit: true}              # ERR: gateway gwc: transit must be one IPv4 or IPv6 address (the address other gateways reach it at), got the boolean true
          - {name: gwd, transit: "fd00:100::4"}     # ERR: gateway gwd: transit fd00:100::4 is IPv6 but gateway gwa's (
          - {name: gwe, transit: 198.18.100.1}      # ERR: gateway gwe: transit 198.18.100.1 is already gateway gwa's (
          - {name: gwf, transit: 198.19.255.7}      # ERR: gateway gwf: transit 198.19.255.7 is inside fabric service_addresses 198.19.255.0/24
          - {name: gwg, transit: 198.18.1.9}        # ERR: gateway gwg: transit 198.18.1.9 is inside app web's address 198.18.1.0/24
          - {name: gwh, transit: 198.18.100.8}
        fabric:
          service_addresses: [198.19.255.0/24]
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
        apps:
          - {name: web, segment: prod, addresses: [198.18.1.0/24]}
        """,
    "transit-port-without-transit": """\
        version: 1
        gateways: [{name: gwa}, {name: gwb}]
        fabric:
          transit_port: 4789       # ERR: fabric: transit_port needs a gateway with transit: give the gateways `transit: ADDRESS`
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
        """,
    "transit-port-range": """\
        version: 1
        gateways: [{name: gwa, transit: 198.18.100.1}]
        fabric:
          transit_port: 65536      # ERR: fabric: transit_port must be an integer UDP port from 1 to 65535 (default 4789), got the number 65536
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
        """,
    "transit-port-type": """\
        version: 1
        gateways: [{name: gwa, transit: 198.18.100.1}]
        fabric: {transit_port: "4789"}   # ERR: fabric: transit_port must be an integer UDP port from 1 to 65535
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
        """,
    "transit-only-fabric-has-no-dns": """\
        version: 1
        gateways: [{name: gwa, transit: 198.18.100.1}]
        fabric: {transit_port: 8472}
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod], dns: [198.18.1.1]}   # ERR: segment prod: dns needs the fabric: add a top-level `fabric:` with service_addresses
        """,
    "transit-cross-rules": """\
        version: 1
        gateways:
          - {name: gwa, transit: 198.18.100.1}
          - {name: gwb, transit: 198.18.100.2}
          - {name: gwc}
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
          - {name: core, gateway: gwb, interfaces: [bh-core]}
          - {name: dev, gateway: gwc, interfaces: [bh-dev]}
        apps:
          - {name: web, segment: prod, addresses: [198.18.1.0/24]}
          - {name: db, segment: core, addresses: [198.19.0.5/32], ports: [tcp/80]}
          - {name: laptops, segment: dev, addresses: [198.18.2.0/24]}
          - {name: saas, segment: core, hostnames: [api.saas.example]}
        rules:
          - {name: web-db, from: web, to: db}
          - {name: db-web, from: db, to: web, action: deny}
          - {name: laptops-db, from: laptops, to: db}   # ERR: rule laptops-db: app laptops is behind gateway gwc and app db behind gwb: rules across gateways need the fabric's transit: give gateway gwc `transit: ADDRESS`
          - name: web-db-http
            from: web
            to: db
            http:                  # ERR: rule web-db-http: app web is behind gateway gwa and app db behind gwb: not yet: http rules across gateways
              - {methods: [GET]}
          - {name: laptops-saas, from: laptops, to: saas}
          - {name: web-saas, from: web, to: saas}
        """,
    "transit-router-across-gateways": """\
        version: 1
        gateways:
          - {name: gwa, transit: 198.18.100.1}
          - {name: gwb, transit: 198.18.100.2}
        fabric:
          service_addresses: [198.19.255.0/24]
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
          - {name: core-a, gateway: gwa, interfaces: [bh-core]}
          - {name: core-b, gateway: gwb, interfaces: [bh-core]}
        apps:
          - {name: web, segment: prod, addresses: [198.18.1.0/24]}
          - {name: cat, segment: core-a, addresses: [198.19.0.20/32]}
          - {name: pay, segment: core-b, addresses: [198.19.0.10/32]}
          - name: shop
            publish: [shop.example]
            ports: [tcp/443]
            routes:
              - {sni: cat.shop.example, to: cat}
              - {sni: pay.shop.example, to: pay}   # ERR: app shop: route to pay: not yet: a router's backend behind another gateway than its client: pay is behind gateway gwb and app web (a client by rule web-pay) behind gwa
        rules:
          - {name: web-cat, from: web, to: cat}
          - {name: web-pay, from: web, to: pay}
        """,
    "transit-router-default-allow": """\
        version: 1
        settings: {default_action: allow}
        gateways:
          - {name: gwa}
          - {name: gwb}
        fabric:
          service_addresses: [198.19.255.0/24]
        segments:
          - {name: prod, gateway: gwa, interfaces: [bh-prod]}
          - {name: core-b, gateway: gwb, interfaces: [bh-core]}
        apps:
          - {name: web, segment: prod, addresses: [198.18.1.0/24]}
          - {name: pay, segment: core-b, addresses: [198.19.0.10/32]}
          - name: shop
            publish: [shop.example]
            ports: [tcp/443]
            routes:
              - {sni: pay.shop.example, to: pay}   # ERR: (a client by settings.default_action: allow) behind gwa
        """,
    "publish-needs-a-host-address": """\
        version: 1
        fabric: {service_addresses: [198.19.255.0/24, "fd00:ff::/120"]}
        segments:
          - {name: core, interfaces: [bh-core]}
        apps:
          - name: net
            segment: core
            addresses: [198.19.0.0/24, "fd00:19::/64"]
            publish: [net.example]   # ERR: app net: publish needs a host address (/32 or /128) to translate the service address to
          - {name: one, segment: core, addresses: [198.19.1.0/24, "fd00:20::1/128"], publish: [one.example]}
        """,
    "gateway-cross-rule": """\
        version: 1
        gateways: [{name: gw-east}, {name: gw-west}]
        segments:
          - {name: prod, gateway: gw-east, interfaces: [bh-prod]}
          - {name: dev, gateway: gw-west, interfaces: [bh-dev]}
        apps:
          - {name: web, segment: prod, addresses: [198.18.1.0/24]}
          - {name: db, segment: dev, addresses: [198.19.0.5]}
          - {name: laptops, segment: dev, addresses: [198.18.2.0/24]}
          - {name: saas, segment: dev, hostnames: [api.saas.example]}
        rules:
          - name: web-db
            from: web
            to: db                 # ERR: rule web-db: app web is behind gateway gw-east and app db behind gw-west: rules across gateways need the fabric's transit: give gateway gw-east and gw-west `transit: ADDRESS`
          - {name: laptops-db, from: laptops, to: db}
          - {name: web-saas, from: web, to: saas}
          - {name: laptops-saas, from: laptops, to: saas}
          - {name: db-web, from: db, to: web}   # ERR: app db is behind gateway gw-west and app web behind gw-east
        """,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_cases(tmp_path, name):
    text = textwrap.dedent(CASES[name]) if not CASES[name].startswith(BASE) else CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    check_marks(str(path), text)


def test_base_is_valid(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    bundle, warnings = load_policy([str(path)])
    assert [a["name"] for a in bundle.apps] == ["web", "db", "saas"]
    assert warnings == []


def test_fixture_with_many_errors_reports_them_all_at_once():
    path = os.path.join(FIXTURES, "errors.yaml")
    with open(path) as f:
        text = f.read()
    assert len(expected_marks(text)) >= 15
    check_marks(path, text)


def test_policy_error_formatting():
    path = os.path.join(FIXTURES, "errors.yaml")
    errors = errors_of([path])
    text = str(PolicyError(errors))
    assert text.splitlines() == [f"{d.file}:{d.line}: {d.message}" for d in errors]
    assert [d.line for d in errors] == sorted(d.line for d in errors)


def test_same_cidr_in_two_segments_is_fine(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BASE + """\
  - name: laptops
    segment: dev
    addresses: [198.18.1.0/24]
  - name: laptops6
    segment: dev
    addresses: ["fd00::/64"]
  - name: web6
    segment: prod
    addresses: ["fd00::/64"]
rules:
  - name: a
    from: laptops
    to: db
""")
    bundle, _ = load_policy([str(path)])
    assert {a["name"] for a in bundle.apps} >= {"laptops", "web6"}


def test_overlapping_sources_in_other_segments_may_reach_one_destination(tmp_path):
    """Only *destination* apps must be disjoint across segments; sources may share."""
    path = tmp_path / "p.yaml"
    path.write_text(BASE + """\
  - name: laptops
    segment: dev
    addresses: [198.18.1.0/24]
rules:
  - {name: a, from: web, to: db}
  - {name: b, from: laptops, to: db}
""")
    bundle, warnings = load_policy([str(path)])
    assert warnings == []
    apps = {a["name"]: a for a in bundle.apps}
    seg = {s["name"]: s["id"] for s in bundle.segments}
    assert apps["web"]["id"] != apps["laptops"]["id"]
    # the same /24 is a source in both segments, each mapping to its own app
    v4_24 = 96 + 24
    srcs = {(sid, plen, app) for sid, _addr, plen, app in bundle.src_entries if plen == v4_24}
    assert (seg["prod"], v4_24, apps["web"]["id"]) in srcs
    assert (seg["dev"], v4_24, apps["laptops"]["id"]) in srcs
    # and both rules reach db: one allow entry per source app
    allowed = {(src, dst) for _p, src, dst, *_ in bundle.policy_entries}
    assert {(apps["web"]["id"], apps["db"]["id"]), (apps["laptops"]["id"], apps["db"]["id"])} <= allowed


def test_names_are_unique_per_kind_only(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("""\
version: 1
segments: [{name: web, interfaces: [w0]}]
apps: [{name: web, segment: web, addresses: [198.18.0.1]}]
rules: [{name: web, from: web, to: web}]
""")
    bundle, _ = load_policy([str(path)])
    assert bundle.rules[0]["from"] == bundle.rules[0]["to"] == "web"


# --- warnings -----------------------------------------------------------------

def test_example_policy_has_no_warnings():
    """L7 rules no longer warn: the verifier ships."""
    path = os.path.join(REPO, "policies", "example.yaml")
    bundle, warnings = load_policy([path])
    assert warnings == bundle.warnings == []
    assert bundle.rules[1]["l7"] is True


def test_hostname_rules_compile_to_name_table(tmp_path):
    """Rules to hostname apps need no warning: the kernel decides them by SNI."""
    from bulkhead.datapath.abi import APP_ANY, Action
    from bulkhead.policy import sni

    path = tmp_path / "p.yaml"
    path.write_text(BASE + """\
  - name: pay
    segment: core
    addresses: [198.19.1.1]
    hostnames: [Pay.Example.]
rules:
  - {name: to-saas, from: web, to: saas}
  - {name: deny-pay, from: web, to: pay, action: deny}
  - {name: allow-pay, from: web, to: pay}
""")
    bundle, warnings = load_policy([str(path)])
    assert warnings == []
    assert [a["hostnames"] for a in bundle.apps if a["name"] == "pay"] == [["pay.example"]]
    ids = {a["name"]: a["id"] for a in bundle.apps}
    h_pay = sni.name_hash("pay.example")
    h_saas = sni.name_hash("api.saas.example")
    # (hash, src, dst key, port, action, flags, rule, app): deny-pay (rule 2) beats allow-pay
    assert sorted(bundle.sni_entries) == sorted([
        (h_saas, ids["web"], APP_ANY, 0, int(Action.ALLOW), 0, 1, ids["saas"]),
        (h_pay, ids["web"], ids["pay"], 0, int(Action.DENY), 0, 2, ids["pay"]),
    ])
    # The trie entries only gate: both pairs are decided on the ClientHello.
    gates = {(e[1], e[2]): e[5] for e in bundle.policy_entries}
    assert gates == {(ids["web"], APP_ANY): int(Action.SNI), (ids["web"], ids["pay"]): int(Action.SNI)}


# --- several files --------------------------------------------------------------

def test_gateways_merge_across_files(tmp_path):
    """`gateways:` in one file, segments naming them in another: one fleet policy."""
    gws, segs = tmp_path / "gateways.yaml", tmp_path / "segments.yaml"
    gws.write_text("version: 1\ngateways: [{name: gw-east}]\n")
    segs.write_text("""\
gateways: [{name: gw-west}]
segments:
  - {name: prod, gateway: gw-east, interfaces: [bh-prod]}
  - {name: dev, gateway: gw-west, interfaces: [bh-prod]}
apps:
  - {name: web, segment: prod, addresses: [198.18.1.0/24]}
  - {name: db, segment: dev, addresses: [198.19.0.5]}
rules:
  - {name: db-db, from: db, to: db}
""")
    bundle, _ = load_policy([str(gws), str(segs)])
    assert bundle.gateways == ["gw-east", "gw-west"]
    assert [(s["name"], s["gateway"]) for s in bundle.segments] == [("prod", "gw-east"), ("dev", "gw-west")]
    dup = tmp_path / "dup.yaml"
    dup.write_text("gateways:\n  - name: gw-east\n")
    got = [(d.file, d.line, d.message) for d in errors_of([str(gws), str(segs), str(dup)])]
    assert got == [(str(dup), 2, f"duplicate gateway name 'gw-east' (first defined at {gws}:2)")]


def test_gateways_in_an_unreadable_file_do_not_cascade(tmp_path):
    """The broken file may be the one declaring gateways: no "gateway needs ..." errors."""
    broken, segs = tmp_path / "broken.yaml", tmp_path / "segments.yaml"
    broken.write_text("version: 1\ngateways: [\n")
    segs.write_text("segments:\n  - {name: prod, gateway: gw-east, interfaces: [bh-prod]}\n")
    got = errors_of([str(broken), str(segs)])
    assert len(got) == 1 and got[0].file == str(broken) and "invalid YAML" in got[0].message



def test_two_files_merge_in_order():
    base = os.path.join(FIXTURES, "split-base.yaml")
    rules = os.path.join(FIXTURES, "split-rules.yaml")
    bundle, warnings = load_policy([base, rules])
    assert warnings == []
    assert [(a["id"], a["name"]) for a in bundle.apps] == [(1, "web"), (2, "db"), (3, "metrics")]
    assert [r["name"] for r in bundle.rules] == ["web-db", "web-metrics"]
    assert bundle.source == [base, rules]


def test_each_split_file_alone_is_incomplete():
    rules = os.path.join(FIXTURES, "split-rules.yaml")
    lines = {(d.line, d.message.split(" is ")[0]) for d in errors_of([rules])}
    assert (1, "version") in lines
    assert any("segment 'core' is not defined" in d.message for d in errors_of([rules]))


def test_duplicates_across_files_point_at_the_second_file(tmp_path):
    base = os.path.join(FIXTURES, "split-base.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("""\
version: 1
settings: {mode: audit}
segments:
  - name: extra
    interfaces: [bh-prod]
apps:
  - name: web
    segment: extra
    addresses: [198.18.7.0/24]
""")
    got = [(d.file, d.line, d.message) for d in errors_of([base, str(other)])]
    o = str(other)
    assert [(f, line) for f, line, _ in got] == [(o, 1), (o, 2), (o, 5), (o, 7)]
    assert "version is already set at" in got[0][2] and base in got[0][2]
    assert "settings are already set at" in got[1][2]
    assert "interface 'bh-prod' is already in segment prod" in got[2][2]
    assert f"duplicate app name 'web' (first defined at {base}:12)" in got[3][2]


def test_unparseable_file_does_not_cascade_into_reference_errors(tmp_path):
    """The broken file may define what the others refer to: report only its syntax."""
    rules = os.path.join(FIXTURES, "split-rules.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nsegments: [\n")
    got = errors_of([str(broken), rules])
    assert len(got) == 1 and got[0].file == str(broken) and "invalid YAML" in got[0].message


def test_errors_sort_by_file_order_then_line(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("version: 1\nbogus: 1\n")
    b.write_text("zzz: 1\nrules: [{name: r, from: x, to: y}]\n")
    got = [(os.path.basename(d.file), d.line) for d in errors_of([str(b), str(a)])]
    assert got == [("b.yaml", 1), ("b.yaml", 2), ("b.yaml", 2), ("a.yaml", 2)]


def test_same_file_twice_reports_duplicates(tmp_path):
    src = os.path.join(FIXTURES, "split-base.yaml")
    copy = tmp_path / "copy.yaml"
    shutil.copy(src, copy)
    got = errors_of([src, str(copy)])
    assert all(d.file == str(copy) for d in got)
    assert any("duplicate segment name 'prod'" in d.message for d in got)


def test_no_paths():
    with pytest.raises(PolicyError, match="no policy file given"):
        load_policy([])


def test_too_many_segments(tmp_path, monkeypatch):
    from bulkhead.policy import validate
    monkeypatch.setattr(validate, "MAX_SEGMENTS", 2)
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nsegments:\n" + "".join(
        f"  - name: s{i}\n    interfaces: [i{i}]\n" for i in range(3)))
    [d] = errors_of([str(path)])
    assert (d.line, d.message) == (7, "segment s2: too many segments (at most 2)")


def test_anchors_and_aliases_work(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BASE + """\
  - name: api
    segment: core
    addresses: [198.19.1.0/24]
    ports: &api-ports [tcp/8443, udp/53]
rules:
  - {name: a, from: web, to: api, ports: *api-ports}
""")
    bundle, _ = load_policy([str(path)])
    assert bundle.rules[0]["ports"] == ["tcp/8443", "udp/53"]


# --- L7: key files, TLS material, settings.http ------------------------------------

def _write_cert(dir_, stem: str):
    """A self-signed cert and its key as PEM files; returns (cert path, key path)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1)).sign(key, hashes.SHA256()))
    crt, pem = dir_ / f"{stem}.crt", dir_ / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


TLS_APP = BASE + """\
  - name: shop
    segment: core
    addresses: [198.19.0.43]
    ports: [tcp/443]
    tls: {TLS}
rules:
  - name: reads
    from: web
    to: shop
    http:
      - methods: [GET]
"""


def test_app_tls_paths_resolve_against_the_policy_file_and_load(tmp_path, monkeypatch):
    sub = tmp_path / "certs"
    sub.mkdir()
    _write_cert(sub, "shop")
    path = tmp_path / "p.yaml"
    path.write_text(TLS_APP.replace("{TLS}", "{cert: certs/shop.crt, key: certs/shop.key, ca: certs/shop.crt}"))
    monkeypatch.chdir("/")  # relative to the policy file, not to the working directory
    bundle, warnings = load_policy([str(path)])
    assert warnings == []
    shop = [a for a in bundle.apps if a["name"] == "shop"][0]
    assert shop["tls"] == {"cert": str(sub / "shop.crt"), "key": str(sub / "shop.key"), "ca": str(sub / "shop.crt")}
    from bulkhead.policy import validate_files
    app = [a for a in validate_files([str(path)]).apps if a.name == "shop"][0]
    assert (app.tls.cert, app.tls.key, app.tls.ca) == (str(sub / "shop.crt"), str(sub / "shop.key"),
                                                       str(sub / "shop.crt"))


def test_app_tls_ca_is_optional(tmp_path):
    _write_cert(tmp_path, "shop")
    path = tmp_path / "p.yaml"
    path.write_text(TLS_APP.replace("{TLS}", "{cert: shop.crt, key: shop.key}"))
    from bulkhead.policy import validate_files
    app = [a for a in validate_files([str(path)]).apps if a.name == "shop"][0]
    assert app.tls.ca is None and os.path.isabs(app.tls.cert)


def test_app_tls_errors_at_their_lines(tmp_path):
    _write_cert(tmp_path, "a")
    _write_cert(tmp_path, "b")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    path = tmp_path / "p.yaml"
    text = BASE + """\
  - name: t1
    segment: core
    addresses: [198.19.0.41]
    tls:
      cert: a.crt              # ERR: app t1 tls: cert {D}/a.crt and key {D}/b.key do not load together
      key: b.key
  - name: t2
    segment: core
    addresses: [198.19.0.42]
    tls:
      cert: a.crt
      key: a.key
      ca: junk.pem             # ERR: app t2 tls: ca {D}/junk.pem is not a PEM CA bundle
  - name: t3
    segment: core
    addresses: [198.19.0.43]
    tls:
      cert: junk.pem           # ERR: do not load together
      key: a.key
  - name: t4
    segment: core
    addresses: [198.19.0.44]
    tls:
      cert: a.crt
      key: nope.key            # ERR: app t4 tls: cannot read key file {D}/nope.key: No such file or directory
rules:
  - {name: r1, from: web, to: t1, http: [{methods: [GET]}]}
  - {name: r4, from: web, to: t4, http: [{methods: [GET]}]}
""".replace("{D}", str(tmp_path))
    path.write_text(text)
    # A broken tls is reported once: the L7 rules to t1 and t4 do not add "give app tls" errors.
    check_marks(str(path), text)


def test_token_files_resolve_against_the_policy_file_and_are_stored_absolute(tmp_path, monkeypatch):
    sub = tmp_path / "secrets"
    sub.mkdir()
    (sub / "hs.secret").write_bytes(b"k" * 32 + b"\n")
    (sub / "keys.txt").write_text("key-1\n")
    path = tmp_path / "p.yaml"
    path.write_text(BASE + """\
  - name: api
    segment: core
    addresses: [198.19.0.8]
    ports: [tcp/8080]
rules:
  - name: calls
    from: web
    to: api
    http:
      - methods: [GET]
        tokens:
          - {jwt: secrets/hs.secret, aud: api}
          - {api_key: ./secrets/keys.txt, header: x-key}
      - paths: [/health]
""")
    monkeypatch.chdir("/")
    bundle, warnings = load_policy([str(path)])
    assert warnings == []
    assert bundle.rules[0]["http"] == [
        {"methods": ["GET"], "tokens": [{"jwt": str(sub / "hs.secret"), "aud": "api"},
                                        {"api_key": str(sub / "keys.txt"), "header": "x-key"}]},
        {"paths": ["/health"]},
    ]
    # What the bundle carries compiles on its own, from anywhere.
    from bulkhead.l7.rules import Request, compile_rule
    rule = compile_rule("calls", bundle.rules[0]["http"])
    assert rule.check(Request("GET", "/x", None, None, (("x-key", "key-1"),))).allowed


def test_short_hmac_secret_is_an_error_at_its_line(tmp_path):
    (tmp_path / "short.secret").write_text("only-twenty-bytes-xx\n")
    path = tmp_path / "p.yaml"
    text = BASE + """\
rules:
  - name: r
    from: web
    to: db
    http:
      - tokens:
          - jwt: short.secret  # ERR: rule r: http entry 1 tokens[0].jwt: key file {D}/short.secret: not a PEM key or certificate, and as an HMAC secret it is 20 bytes; HS256 secrets must be at least 32 bytes
""".replace("{D}", str(tmp_path))
    path.write_text(text)
    check_marks(str(path), text)


def test_l7_rule_on_tls_port_with_app_tls_is_valid(tmp_path):
    _write_cert(tmp_path, "shop")
    path = tmp_path / "p.yaml"
    path.write_text(TLS_APP.replace("{TLS}", "{cert: shop.crt, key: shop.key}"))
    bundle, warnings = load_policy([str(path)])
    assert warnings == [] and bundle.rules[0]["l7"]


def test_settings_http_defaults_and_values(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    bundle, _ = load_policy([str(path)])
    assert bundle.settings == {"default_action": "deny", "mode": "enforce", "unknown_sni": "deny",
                               "http": {"via": False, "x_forwarded_for": False, "max_header_bytes": 16384,
                                        "header_timeout": 10, "idle_timeout": 60}}
    path.write_text(BASE.replace("version: 1\n", """\
version: 1
settings:
  mode: audit
  http: {via: true, x_forwarded_for: true, max_header_bytes: 1024, header_timeout: 2.5, idle_timeout: 300}
"""))
    bundle, _ = load_policy([str(path)])
    assert bundle.settings["mode"] == "audit"
    assert bundle.settings["http"] == {"via": True, "x_forwarded_for": True, "max_header_bytes": 1024,
                                       "header_timeout": 2.5, "idle_timeout": 300}
    import msgpack
    assert msgpack.unpackb(msgpack.packb(bundle.settings)) == bundle.settings
