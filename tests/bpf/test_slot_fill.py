"""Filling a policy slot (datapath/fill.py): batch writes, the per-entry fallback, clearing what
the slot held before, and a failure half-way through a fill.

Every test reads the slot's maps back from the kernel and compares them, entry by entry, with
what the bundle packs to: a slot must hold exactly the bundle, nothing left from its previous
fill and nothing missing."""
from __future__ import annotations

import ctypes as C
import dataclasses
import ipaddress
import logging
import os

import pytest
from scapy.all import IP, TCP

from bulkhead.datapath import abi, fill, libbpf, loader, probe
from bulkhead.datapath.errors import DatapathError

from .conftest import APP_PAY, APP_WEB, BASE, C4, PAY4, RULE_PAY_HTTPS, E, R, X, base_bundle, pol

HTTPS = E / IP(src=C4, dst=PAY4) / TCP(sport=41000, dport=443, flags="S")


def big_bundle(n: int, shift: int = 0):
    """BASE plus n host sources, n host destinations, n exact and n/4 port-range policy entries,
    n/8 prefix sources and n/16 server names: every per-slot map gets entries. `shift` moves
    which entries there are, so two bundles overlap in part."""
    b = base_bundle()
    src, dst, pols, sni = list(b.src_entries), list(b.dst_entries), list(b.policy_entries), []
    base6 = int(ipaddress.IPv6Address("fd00:77::"))
    for i in range(shift, shift + n):
        addr = (base6 + i).to_bytes(16, "big")
        src.append((1, addr, 128, 100 + i))
        dst.append((addr, 128, 100 + i, 3))
        pols.append(pol(100 + i, APP_PAY, 6, 1000 + i % 50000, int(abi.Action.ALLOW), 100 + i))
    for i in range(shift, shift + n // 4):
        pols.append(pol(100 + i, APP_PAY, 17, (4096, 4111), int(abi.Action.DENY), 100 + i))
    for i in range(shift, shift + n // 8):
        src.append((2, (base6 + (i << 16)).to_bytes(16, "big"), 112, 100 + i))
    for i in range(shift, shift + n // 16):
        sni.append((0xABC0000 + i, APP_WEB, abi.APP_ANY, 443, int(abi.Action.ALLOW), 0, 100 + i, 100 + i))
    return dataclasses.replace(b, src_entries=src, dst_entries=dst, policy_entries=pols, sni_entries=sni)


def slot_content(dp: loader.Datapath, slot: int) -> dict[str, set[tuple[bytes, bytes]]]:
    """Every (key, value) of the slot's maps, read from the kernel."""
    out = {}
    for base, (key_l, val_l) in fill.SLOT_MAPS.items():
        fd = dp.map_fds[f"{base}_{slot}"]
        entries = set()
        for k in fill.SlotWriter.keys(fd, key_l.size):
            v = C.create_string_buffer(val_l.size)
            assert libbpf.lib().bpf_map_lookup_elem(fd, k, v) == 0
            entries.add((k, v.raw))
        out[base] = entries
    return out


def expected(bundle) -> dict[str, set[tuple[bytes, bytes]]]:
    packed, _ = fill.pack_slot(bundle)
    return {base: set(zip(*packed[base])) for base in fill.SLOT_MAPS}


def kernel_batches(map_type: int) -> bool:
    """Whether this kernel has batch updates for `map_type`, asked of a fresh map."""
    fd = probe.create_map(map_type, 8, 4, 1, 1)  # BPF_F_NO_PREALLOC, as the slot maps
    try:
        n = C.c_uint32(0)
        return libbpf.lib().bpf_map_update_batch(fd, None, None, C.byref(n), None) >= 0
    finally:
        os.close(fd)


def active_slot(dp) -> int:
    return dp.ctl().active_slot & 1


@pytest.fixture
def fresh_writer(xdp):
    """The session's writer (its batch-support answers) restored after the test."""
    saved = xdp.dp.writer
    yield xdp
    xdp.dp.writer = saved


def test_batch_fill_writes_every_entry_and_clears_the_previous_fill(fresh_writer):
    xdp = fresh_writer
    dp = xdp.dp
    a, b = big_bundle(3000), big_bundle(3000, shift=1500)
    xdp.apply(a)
    slot_a = active_slot(dp)
    assert slot_content(dp, slot_a) == expected(a)
    xdp.apply(b)  # the other slot
    assert slot_content(dp, active_slot(dp)) == expected(b)
    # Back into slot_a, which holds `a`: only a's entries that b lacks are deleted.
    xdp.apply(b)
    assert active_slot(dp) == slot_a
    assert slot_content(dp, slot_a) == expected(b)
    written = [m for m, entries in expected(a).items() if entries]
    assert {"src_ident", "policy", "pol_exact", "sni_names"} <= set(written)
    # The batch path ran wherever the kernel has it: hash maps always (5.6+), tries where a fresh
    # trie takes a zero-count batch update (the writer must not have fallen back without cause).
    for m in written:
        want = kernel_batches(loader.MAP_LPM_TRIE) if m in ("src_ident", "dst_ident", "policy") else True
        assert dp.writer.batch[(dp.map_fds[f"{m}_{slot_a}"], "update")] is want, m
    xdp.expect(HTTPS, "prod", X.PASS, R.ALLOW_RULE)


def test_unknown_slot_content_is_scanned_and_cleared(fresh_writer):
    """After a restart the agent doesn't know what a slot holds: every key found goes."""
    xdp = fresh_writer
    dp = xdp.dp
    xdp.apply(big_bundle(2000))
    xdp.apply(big_bundle(2000, shift=7))
    dp.slot_content = {n: None for n in dp.slot_content}
    small = base_bundle(policy=[pol(APP_WEB, APP_PAY, 6, 443, A_DENY, RULE_PAY_HTTPS)])
    xdp.apply(small)
    assert slot_content(dp, active_slot(dp)) == expected(small)
    xdp.expect(HTTPS, "prod", X.DROP, R.DENY_RULE)


A_DENY = int(abi.Action.DENY)


def test_per_entry_fallback_fills_the_same_slot(fresh_writer, caplog):
    """A kernel without batch ops for a map type (LPM tries on 6.1) gets one syscall per entry."""
    xdp = fresh_writer
    dp = xdp.dp
    dp.writer = fill.SlotWriter(force_per_entry=frozenset(fill.SLOT_MAPS))
    a, b = big_bundle(1500), big_bundle(1500, shift=600)
    with caplog.at_level(logging.INFO, logger="bulkhead.datapath"):
        xdp.apply(a)
        xdp.apply(b)
        xdp.apply(b)  # deletes too, one by one
    assert slot_content(dp, active_slot(dp)) == expected(b)
    assert any("no batch update for this map type" in r.getMessage() and "policy_" in r.getMessage()
               for r in caplog.records)
    assert not any(dp.writer.batch.values())
    xdp.expect(HTTPS, "prod", X.PASS, R.ALLOW_RULE)


@pytest.mark.parametrize("per_entry", [False, True], ids=["batch", "per-entry"])
def test_a_fill_failing_half_way_leaves_the_slot_empty_and_the_old_policy_enforcing(fresh_writer, per_entry):
    """The kernel refuses one entry in the middle of a map's batch: the apply raises, the slot
    it was filling stays marked generation 0, the active slot and its generation don't move,
    and the next apply (which no longer knows what the slot holds) still ends exact."""
    xdp = fresh_writer
    dp = xdp.dp
    if per_entry:
        dp.writer = fill.SlotWriter(force_per_entry=frozenset(fill.SLOT_MAPS))
    xdp.apply(BASE)
    active, gen = active_slot(dp), dp.active_generation()
    good = big_bundle(2000)
    src = list(good.src_entries)
    # A source prefix longer than 128 bits: src_ident's trie refuses it (EINVAL) half-way.
    prefixes = [i for i, e in enumerate(src) if e[2] != 128]
    src.insert(prefixes[len(prefixes) // 2], (2, b"\x20" * 16, 129, 9999))
    bad = dataclasses.replace(good, src_entries=src)
    xdp.generation += 1
    with pytest.raises(DatapathError, match="src_ident_"):
        dp.apply(bad, xdp.ifindex, xdp.generation)
    assert active_slot(dp) == active and dp.active_generation() == gen
    assert dp.slot_cfg(1 - active).generation == 0
    assert dp.slot_content[1 - active] is None
    xdp.expect(HTTPS, "prod", X.PASS, R.ALLOW_RULE)  # BASE still judges
    xdp.active = None
    xdp.apply(good)
    assert slot_content(dp, active_slot(dp)) == expected(good)


def test_a_policy_that_does_not_fit_is_refused_before_the_slot_is_touched(fresh_writer, monkeypatch):
    xdp = fresh_writer
    dp = xdp.dp
    xdp.apply(big_bundle(500))
    xdp.apply(BASE)
    standby = 1 - active_slot(dp)
    before_cfg, before = bytes(dp.slot_cfg(standby)), slot_content(dp, standby)
    assert dp.slot_cfg(standby).generation != 0
    monkeypatch.setitem(dp.sizes, "BH_MAX_POLICY", 100)  # as if the maps were made this small
    with pytest.raises(DatapathError, match=r"does not fit the maps: .*--map-size policy=N"):
        dp.apply(big_bundle(500), xdp.ifindex, xdp.generation + 1)
    assert bytes(dp.slot_cfg(standby)) == before_cfg and slot_content(dp, standby) == before
    assert dp.slot_content[standby] is not None  # still known: nothing was written
