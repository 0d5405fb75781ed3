"""This gateway's part of the transit (datapath/transit.py), `agent run --policy --gateway`, and the
transit in `bulkhead status` — without root: no device is made here (tests/integration does)."""
from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from bulkhead.cli import main as cli
from bulkhead.cli import render
from bulkhead.daemon import service
from bulkhead.daemon.agent import Agent
from bulkhead.datapath import abi, fill, transit
from bulkhead.policy import load_policy

POLICY = textwrap.dedent("""\
    version: 1
    gateways:
      - {name: gw-east, transit: 198.18.100.1}
      - {name: gw-west, transit: 198.18.100.2}
      - {name: gw-north}
    fabric:
      transit_port: 8472
    segments:
      - {name: prod, gateway: gw-east, interfaces: [bh-prod]}
      - {name: dev, gateway: gw-west, interfaces: [bh-dev]}
      - {name: lab, gateway: gw-north, interfaces: [bh-lab]}
    apps:
      - {name: web, segment: prod, addresses: [198.18.1.0/24]}
      - {name: inventory, segment: dev, addresses: [198.19.0.30/32]}
    rules:
      - {name: web-to-inventory, from: web, to: inventory}
    """)


@pytest.fixture
def policy_file(tmp_path):
    p = tmp_path / "transit.yaml"
    p.write_text(POLICY)
    return p


@pytest.fixture
def bundle(policy_file):
    return load_policy([str(policy_file)])[0]


def test_device_names_fit_an_interface_name():
    assert transit.device_name("default") == "bhvx-default"
    name = transit.device_name("sd-0123456789ab")
    assert name == "bhvx-0123456789" and len(name) <= 15


def test_plan_of_a_transit_gateway(bundle):
    p = transit.plan(bundle.for_gateway("gw-west"), "gw-west")
    assert p == {"gateway": "gw-west", "gateway_id": 2, "port": 8472, "address": "198.18.100.2",
                 "peers": {"gw-east": "198.18.100.1"}}
    gw_id, ifindex, addr = transit.fab_self(p, 9)
    assert (gw_id, ifindex, addr) == (2, 9, b"\0" * 10 + b"\xff\xff" + bytes([198, 18, 100, 2]))
    assert transit.addr16("fd00:64::1") == bytes.fromhex("fd000064000000000000000000000001")


def test_plan_without_transit_address_or_name(bundle):
    p = transit.plan(bundle, "gw-north")  # a gateway of the policy with no transit: address
    assert p["address"] is None and p["gateway_id"] == 3
    assert transit.fab_self(p, 0) == (3, 0, bytes(16))
    assert transit.plan(bundle, None) is None  # an agent with no gateway name
    assert transit.plan(bundle, "gw-south") is None
    assert transit.fab_self(None, 5) is None


def test_self_goes_into_the_slot_with_the_bundles_entries(bundle):
    mine = bundle.for_gateway("gw-east")
    packed, flags = fill.pack_slot(mine, transit.fab_self(transit.plan(mine, "gw-east"), 17))
    keys, vals = packed["fab"]
    assert len(keys) == len(mine.fab_entries) + 1 and flags & abi.SLOTF_FABRIC
    self_val = abi.FabVal.from_buffer_copy(vals[keys.index(bytes(abi.FabKey(kind=abi.FAB_SELF)))])
    assert (self_val.a, self_val.b, bytes(self_val.addr)[12:]) == (1, 17, bytes([198, 18, 100, 1]))
    # the policy side's GW entry for this gateway names the same address
    gw = [e for e in mine.fab_entries if e[0] == abi.FAB_GW and e[1] == 1]
    assert gw and gw[0][5] == bytes(self_val.addr)


def test_a_transit_device_needs_a_sysctl_of_its_own():
    assert transit.sysctls("bhvx-default") == {"/proc/sys/net/ipv4/conf/bhvx-default/rp_filter": "0"}


# ----------------------------------------------------------------- the agent
def test_agent_with_a_gateway_enforces_its_part(bundle, tmp_path):
    a = Agent(str(tmp_path / "st"), gateway="gw-east")
    mine = a.mine(bundle)
    assert [s["name"] for s in mine.segments] == ["prod"]
    assert Agent(str(tmp_path / "st2")).mine(bundle) is bundle  # no name: the whole policy
    with pytest.raises(ValueError, match="gw-south"):
        Agent(str(tmp_path / "st3"), gateway="gw-south").mine(bundle)


def test_apply_of_a_policy_without_the_gateway_is_refused(tmp_path):
    """The control op: code 2, nothing applied (the data path is never reached)."""
    other = load_policy([_write(tmp_path, POLICY.replace("gw-east", "gw-elsewhere"))])[0]

    class DP:
        @staticmethod
        def active_generation():
            return 4

    a = Agent(str(tmp_path / "st"), gateway="gw-east")
    a.dp = DP()
    a.apply = lambda b: pytest.fail("applied a policy without this gateway")
    r = a.handle({"op": "apply", "bundle": other.pack()})
    assert r["ok"] is False and r["code"] == 2 and "gw-east" in r["error"] and r["generation"] == 4


def test_agent_run_refuses_a_gateway_the_policy_lacks(policy_file, tmp_path, capsys):
    """Exit 2 before anything touches the kernel (no capability check, no compile)."""
    rc = service.run([str(policy_file)], str(tmp_path / "st"), None, gateway="gw-south")
    assert rc == 2
    assert "gateway 'gw-south' is not in this policy" in capsys.readouterr().out


def _write(tmp_path, text):
    p = tmp_path / "other.yaml"
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------- the CLI
@pytest.fixture
def ran(monkeypatch):
    calls = []
    monkeypatch.setattr(service, "run", lambda *a, **kw: calls.append((a, kw)) or 0)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.delenv("BULKHEAD_ETCD", raising=False)
    return calls


def test_agent_run_takes_gateway_with_policy(ran, policy_file):
    r = CliRunner().invoke(cli.main, ["agent", "run", "--policy", str(policy_file), "--gateway", "gw-east",
                                      "--metrics", "off"])
    assert r.exit_code == 0, r.output
    (args, kw), = ran
    assert args[0] == [str(policy_file)] and kw["gateway"] == "gw-east" and kw["fleet"] is None


def test_agent_run_trust_still_needs_etcd(ran, policy_file):
    r = CliRunner().invoke(cli.main, ["agent", "run", "--policy", str(policy_file), "--trust", "k.pub"])
    assert r.exit_code == 2 and "go with --etcd" in r.output and not ran


def test_agent_run_etcd_passes_the_gateway_to_the_fleet(ran, tmp_path):
    r = CliRunner().invoke(cli.main, ["agent", "run", "--etcd", "http://127.0.0.1:1", "--gateway", "gw-east",
                                      "--trust", str(tmp_path / "k.pub"), "--metrics", "off"])
    assert r.exit_code == 0, r.output
    (_, kw), = ran
    assert kw["fleet"]["gateway"] == "gw-east" and kw["gateway"] == "gw-east"


# ---------------------------------------------------------------- the status
def test_status_line_of_the_transit():
    t = {"device": "bhvx-default", "ifindex": 7, "port": 4789, "address": "198.18.100.1", "gateway": "gw-east",
         "gateway_id": 1, "peers": {"gw-west": "198.18.100.2"}}
    assert render.transit_line(t) == ("transit: gateway gw-east 198.18.100.1, device bhvx-default (ifindex 7), "
                                      "udp/4789; peers gw-west 198.18.100.2")
    assert "MISSING" in render.transit_line({**t, "ifindex": 0})
    line = render.transit_line({**t, "device": None, "ifindex": 0, "address": None})
    assert "no transit address" in line and "transit_no_tunnel" in line


def test_transit_status_from_the_applied_plan(bundle, tmp_path, monkeypatch):
    a = Agent(str(tmp_path / "st"), gateway="gw-east")
    assert a.transit_status() is None
    a.transit = {**transit.plan(bundle, "gw-east"), "device": "bhvx-x", "ifindex": 7}
    monkeypatch.setattr(transit, "device", lambda name: {"kind": "vxlan", "ifindex": 8} if name == "bhvx-x" else None)
    assert a.transit_status() == {"device": "bhvx-x", "ifindex": 8, "port": 8472, "address": "198.18.100.1",
                                  "gateway": "gw-east", "gateway_id": 1, "peers": {"gw-west": "198.18.100.2"},
                                  "wireguard": None}
