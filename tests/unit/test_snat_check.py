"""The apply-time check of transit_snat addresses (agent/fabric/snat.py), without a kernel."""
from __future__ import annotations

import ipaddress

import pytest

from bulkhead.fabric import snat
from bulkhead.policy.bundle import Bundle


def bundle(*segments: dict) -> Bundle:
    return Bundle(settings={}, segments=list(segments), apps=[], rules=[], src_entries=[], dst_entries=[],
                  policy_entries=[])


def on(table: dict[str, list[str]]):
    return lambda names: {n: {ipaddress.ip_address(a) for a in table[n]} for n in names if n in table}


SEG = {"id": 1, "name": "b-srv", "interfaces": ["bh-srv", "bh-srv2"], "transit_snat": ["198.18.1.1", "fd00:1::1"]}


def test_addresses_on_any_interface_of_the_segment_pass():
    snat.check(bundle(SEG), on({"bh-srv": ["198.18.1.1"], "bh-srv2": ["fd00:1::1"]}))
    snat.check(bundle({"id": 2, "name": "plain", "interfaces": ["x"]}), on({}))  # nothing to check


def test_a_missing_address_names_the_segment_the_address_and_the_fix():
    with pytest.raises(snat.SnatError) as e:
        snat.check(bundle(SEG), on({"bh-srv": ["198.18.1.1", "fd00:1::2"]}))
    msg = str(e.value)
    assert "segment b-srv: transit_snat fd00:1::1 is on none of its interfaces (bh-srv, bh-srv2)" in msg
    assert "ip addr add fd00:1::1/PREFIX dev bh-srv" in msg and "198.18.1.1 is" not in msg


def test_an_address_on_another_segments_interface_does_not_count():
    with pytest.raises(snat.SnatError):
        snat.check(bundle(SEG), on({"bh-cli": ["198.18.1.1", "fd00:1::1"]}))
