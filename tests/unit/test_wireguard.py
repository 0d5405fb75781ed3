"""WireGuard under the transit (docs/fabric.md "Encryption between gateways"): the policy's
`wireguard:`, the bundle, the private key file's checks, the plan and the `wg` command, and the
apply failing closed — without root: no device is made here (tests/integration does)."""
from __future__ import annotations

import base64
import os
import textwrap

import pytest
from bulkhead.datapath import wireguard
from bulkhead.policy import PolicyError, load_policy

KEY_E = base64.b64encode(bytes(range(32))).decode()
KEY_W = base64.b64encode(bytes(range(1, 33))).decode()
PRIV = base64.b64encode(bytes(range(2, 34))).decode()


def policy(gateways: str) -> str:
    return textwrap.dedent("""\
        version: 1
        gateways:
        {gw}
        segments:
          - {{name: prod, gateway: gw-east, interfaces: [bh-prod]}}
          - {{name: dev, gateway: gw-west, interfaces: [bh-dev]}}
        apps:
          - {{name: web, segment: prod, addresses: [198.18.1.0/24]}}
          - {{name: inventory, segment: dev, addresses: [198.19.0.30/32]}}
        rules:
          - {{name: web-to-inventory, from: web, to: inventory}}
        """).format(gw=textwrap.indent(textwrap.dedent(gateways), "  "))


WG = f"""\
- {{name: gw-east, transit: 198.18.100.1, wireguard: {{public_key: "{KEY_E}", endpoint: "198.18.50.1:51820"}}}}
- {{name: gw-west, transit: 198.18.100.2, wireguard: {{public_key: "{KEY_W}", endpoint: "198.18.50.2:51821"}}}}
"""


def load(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return load_policy([str(p)])[0]


def errors(tmp_path, text) -> str:
    with pytest.raises(PolicyError) as e:
        load(tmp_path, text)
    return str(e.value)


def test_bundle_carries_public_keys_and_endpoints(tmp_path):
    b = load(tmp_path, policy(WG))
    assert b.transit["wireguard"] == {
        "gw-east": {"public_key": KEY_E, "endpoint": "198.18.50.1:51820"},
        "gw-west": {"public_key": KEY_W, "endpoint": "198.18.50.2:51821"}}
    assert b.for_gateway("gw-west").transit["wireguard"] == b.transit["wireguard"]


def test_no_wireguard_no_key_in_the_bundle(tmp_path):
    b = load(tmp_path, policy("- {name: gw-east, transit: 198.18.100.1}\n- {name: gw-west, transit: 198.18.100.2}\n"))
    assert "wireguard" not in b.transit


def test_all_or_none(tmp_path):
    text = policy(WG.splitlines()[0] + "\n- {name: gw-west, transit: 198.18.100.2}\n")
    assert "but not on gw-west" in errors(tmp_path, text)


@pytest.mark.parametrize("wg, want", [
    ('{public_key: "short", endpoint: "198.18.50.2:51821"}', "44 characters of base64"),
    (f'{{public_key: "{KEY_W}", endpoint: "198.18.50.2"}}', "endpoint must be ADDRESS:PORT"),
    (f'{{public_key: "{KEY_W}", endpoint: "198.18.50.2:70000"}}', "endpoint must be ADDRESS:PORT"),
    (f'{{public_key: "{KEY_W}"}}', "endpoint"),
    (f'{{public_key: "{KEY_W}", endpoint: "198.18.50.1:51820"}}', "already gateway gw-east's"),
    (f'{{public_key: "{KEY_E}", endpoint: "198.18.50.2:51821"}}', "public_key is already gateway gw-east's"),
    (f'{{public_key: "{KEY_W}", endpoint: "198.18.100.2:51821"}}', "is its transit address"),
    (f'{{public_key: "{KEY_W}", endpoint: "198.18.50.2:1", port: 3}}', "port"),
    ("yes", "wireguard must be a mapping"),
])
def test_validation_errors(tmp_path, wg, want):
    text = policy(WG.splitlines()[0] + f"\n- {{name: gw-west, transit: 198.18.100.2, wireguard: {wg}}}\n")
    assert want in errors(tmp_path, text)


def test_wireguard_needs_transit(tmp_path):
    text = policy(f'- {{name: gw-east, wireguard: {{public_key: "{KEY_E}", endpoint: "198.18.50.1:1"}}}}\n'
                  "- {name: gw-west}\n")
    assert "wireguard needs transit" in errors(tmp_path, text)


def test_ipv6_endpoint(tmp_path):
    text = policy(WG.replace('"198.18.50.2:51821"', '"[fd00:50::2]:51821"'))
    assert load(tmp_path, text).transit["wireguard"]["gw-west"]["endpoint"] == "[fd00:50::2]:51821"


def test_plan_and_wg_command(tmp_path):
    b = load(tmp_path, policy(WG)).for_gateway("gw-east")
    p = wireguard.plan(b, "gw-east")
    assert p == {"listen_port": 51820, "public_key": KEY_E, "address": "198.18.100.1", "prefix": 32,
                 "peers": {"gw-west": {"public_key": KEY_W, "endpoint": "198.18.50.2:51821",
                                       "address": "198.18.100.2"}}}
    assert wireguard.wg_commands("bhwg-default", p, "/k") == [
        ["wg", "set", "bhwg-default", "private-key", "/k", "listen-port", "51820",
         "peer", KEY_W, "endpoint", "198.18.50.2:51821", "allowed-ips", "198.18.100.2/32"]]
    assert wireguard.plan(b, None) is None
    plain = load(tmp_path, policy("- {name: gw-east, transit: 198.18.100.1}\n- {name: gw-west, transit: 198.18.100.2}\n"))
    assert wireguard.plan(plain, "gw-east") is None
    assert wireguard.device_name("sd-0123456789abcdef") == "bhwg-0123456789"


def test_key_file_checks(tmp_path):
    k = tmp_path / "wg.key"
    with pytest.raises(wireguard.WireguardError, match="--wireguard-key FILE"):
        wireguard.check_key_file(None)
    with pytest.raises(wireguard.WireguardError, match="No such file"):
        wireguard.check_key_file(str(k))
    k.write_text(PRIV + "\n")
    os.chmod(k, 0o644)
    with pytest.raises(wireguard.WireguardError, match="mode 0644: group or others may read it"):
        wireguard.check_key_file(str(k))
    os.chmod(k, 0o640)
    with pytest.raises(wireguard.WireguardError, match="chmod 600"):
        wireguard.check_key_file(str(k))
    os.chmod(k, 0o600)
    assert wireguard.check_key_file(str(k)) == str(k)
    k.write_text("not a key")
    with pytest.raises(wireguard.WireguardError, match="not a WireGuard key"):
        wireguard.check_key_file(str(k))


def test_sync_fails_closed_before_recording_without_a_key(tmp_path):
    rec, saved = {}, []
    p = {"listen_port": 1, "public_key": KEY_E, "address": "198.18.100.1", "prefix": 32, "peers": {}}
    with pytest.raises(wireguard.WireguardError):
        wireguard.sync(rec, "bhwg-x", p, str(tmp_path / "missing"), saved.append)
    assert rec == {} and saved == []


def test_show_parses_wg_dump(monkeypatch):
    dump = (f"{PRIV}\t{KEY_E}\t51820\toff\n"
            f"{KEY_W}\t(none)\t198.18.50.2:51821\t198.18.100.2/32\t1700000000\t10\t20\toff\n")
    monkeypatch.setattr(wireguard, "_wg", lambda args: dump)
    assert wireguard.show("bhwg-default") == {
        "device": "bhwg-default", "public_key": KEY_E, "listen_port": 51820,
        "peers": {KEY_W: {"endpoint": "198.18.50.2:51821", "latest_handshake": 1700000000}}}


def test_status_names_peers_by_gateway(tmp_path, monkeypatch):
    b = load(tmp_path, policy(WG))
    p = wireguard.plan(b, "gw-east")
    assert wireguard.status(None, "default") is None
    monkeypatch.setattr(wireguard, "show", lambda name: {
        "device": name, "public_key": KEY_E, "listen_port": 51820,
        "peers": {KEY_W: {"endpoint": "198.18.50.2:51821", "latest_handshake": 5}}})
    assert wireguard.status(p, "default") == {
        "device": "bhwg-default", "public_key": KEY_E, "listen_port": 51820,
        "peers": {"gw-west": {"endpoint": "198.18.50.2:51821", "latest_handshake": 5}}}


def test_the_sweep_takes_wireguard_devices_named_like_ours_only():
    links = [("bhwg-default", "wireguard"), ("bhwg-0123456789", "wireguard"), ("bhwg-stray", "dummy"),
             ("wg0", "wireguard"), ("bhvx-default", "vxlan"), ("lo", None), (None, "wireguard")]
    assert wireguard.ours(links) == ["bhwg-0123456789", "bhwg-default"]


def test_mtus_inside_wireguard():
    # the lab's 1600 underlay: WireGuard's 80 off it, then VXLAN's 50 (IPv4 transit) or 70 (IPv6)
    assert wireguard.mtus(1600, 32) == (1520, 1470)
    assert wireguard.mtus(1600, 128) == (1520, 1450)
    assert wireguard.mtus(1500, 32) == (1420, 1370)  # 1420: the kernel's own WireGuard default
