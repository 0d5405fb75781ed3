"""agent/datapath/probe.py without a kernel: instruction encoding, what counts as required,
and that `bulkhead agent run` refuses to start (exit 1, naming the feature) when the kernel
lacks one, before it loads anything. The probes themselves run in tests/bpf/test_probe.py."""
from __future__ import annotations

import logging

import pytest

from bulkhead.daemon import service as daemon
from bulkhead.datapath import probe
from bulkhead.datapath.errors import DatapathError

POLICY = """\
version: 1
segments:
  - {name: prod, interfaces: [bh-prod]}
apps:
  - {name: web, segment: prod, addresses: [198.18.1.0/24]}
rules: []
"""


def all_present() -> dict:
    return {name: True for name in probe.FEATURES}


def test_instructions_are_struct_bpf_insn():
    # mov64 r0, 2 ; exit — the canonical XDP_PASS program, byte for byte.
    assert probe.XDP_PASS_PROG == bytes.fromhex("b700000002000000" "9500000000000000")
    # call 160: code 0x85, no registers, imm = helper id (little-endian).
    assert probe.call(160) == bytes.fromhex("85000000a0000000")
    # dst in the low nibble, src in the high nibble.
    assert probe.insn(0xBF, dst=1, src=6) == bytes.fromhex("bf61000000000000")


def test_every_feature_has_a_probe_and_a_meaning():
    assert probe.PROBES.keys() == probe.FEATURES.keys()
    assert set(probe.REQUIRED) == {"lru_hash", "lpm_trie", "batch_map_ops",
                                   "ktime_get_coarse_ns", "xdp_adjust_tail"}
    for name, (_, meaning) in probe.FEATURES.items():
        assert meaning, name


def test_missing_required_ignores_optional_features():
    res = all_present()
    res["native_xdp_veth"] = "no driver-mode XDP on veth"
    res["prog_test_run_xdp"] = "EINVAL"
    assert probe.missing_required(res) == {}
    res["lpm_trie"] = "EINVAL"
    assert probe.missing_required(res) == {"lpm_trie": "EINVAL"}
    # A feature that was not probed at all is missing, not present.
    del res["lru_hash"]
    assert set(probe.missing_required(res)) == {"lpm_trie", "lru_hash"}


def test_require_raises_naming_the_missing_feature(monkeypatch, caplog):
    res = all_present()
    res["ktime_get_coarse_ns"] = "the verifier refused a call to helper 160: EINVAL"
    res["native_xdp_veth"] = "EOPNOTSUPP"
    monkeypatch.setattr(probe, "probe_all", lambda: res)
    with caplog.at_level(logging.INFO), pytest.raises(DatapathError) as exc:
        probe.require()
    msg = str(exc.value)
    assert "ktime_get_coarse_ns" in msg and "native_xdp_veth" not in msg
    assert "never runs without enforcement" in msg
    levels = {r.getMessage().split()[2]: r.levelno for r in caplog.records if "missing" in r.getMessage()}
    assert levels == {"ktime_get_coarse_ns": logging.ERROR, "native_xdp_veth": logging.WARNING}


def test_require_passes_and_logs_optional_gaps(monkeypatch, caplog):
    res = all_present()
    res["native_xdp_veth"] = "EOPNOTSUPP"
    monkeypatch.setattr(probe, "probe_all", lambda: res)
    with caplog.at_level(logging.INFO):
        assert probe.require() == res
    text = caplog.text
    assert "native_xdp_veth missing" in text and "generic" in text


def test_agent_run_exits_1_before_loading_when_a_required_feature_is_missing(monkeypatch, tmp_path, caplog):
    res = all_present()
    res["lru_hash"] = "the kernel refused a map of type 9: EINVAL"
    monkeypatch.setattr(probe, "probe_all", lambda: res)

    def must_not_load(self, bundle):
        raise AssertionError("the agent loaded the data path although a required feature is missing")

    monkeypatch.setattr(daemon.Agent, "start", must_not_load)
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    with caplog.at_level(logging.ERROR):
        rc = daemon.run([str(policy)], str(tmp_path / "state"), None)
    assert rc == 1
    assert "lru_hash" in caplog.text and "flow tables" in caplog.text
    from bulkhead.datapath import loader

    assert not loader.pin_dir_for(tmp_path / "state").exists()  # nothing pinned, nothing to undo
    assert list((tmp_path / "state").iterdir()) == []  # no socket, no state file
