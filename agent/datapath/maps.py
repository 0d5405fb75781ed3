"""The maps as maps.h declares them: their specs (type, key and value sizes, entries), the check
that pinned maps still match them, and whether a policy fits them."""
from __future__ import annotations

import ctypes as C
import os
from pathlib import Path

from bulkhead.datapath import abi, libbpf

# linux/bpf.h map types
MAP_HASH, MAP_ARRAY, MAP_PROG_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_LPM_TRIE = 1, 2, 3, 5, 6, 9, 11


def map_specs(sizes: dict[str, int]) -> dict[str, tuple[int, int, int, int]]:
    """name -> (type, key_size, value_size, max_entries), as maps.h declares them."""
    s = C.sizeof
    specs = {
        "ctl": (MAP_ARRAY, 4, s(abi.Ctl), 1),
        "slot_cfg": (MAP_ARRAY, 4, s(abi.SlotCfg), abi.NUM_SLOTS),
        "if_cfg": (MAP_ARRAY, 4, s(abi.IfCfg), sizes["BH_MAX_IFINDEX"]),
        "flows4": (MAP_LRU_HASH, s(abi.Flow4Key), s(abi.Flow), sizes["BH_MAX_FLOWS"]),
        "flows6": (MAP_LRU_HASH, s(abi.Flow6Key), s(abi.Flow), sizes["BH_MAX_FLOWS"]),
        "frags": (MAP_LRU_HASH, s(abi.FragKey), s(abi.Frag), sizes["BH_MAX_FRAGS"]),
        "fab_snat": (MAP_LRU_HASH, s(abi.SnatKey), s(abi.SnatVal), sizes["BH_MAX_FLOWS"]),
        "stats": (MAP_PERCPU_ARRAY, 4, s(abi.Counter), abi.REASON_MAX),
        "events": (MAP_PERCPU_ARRAY, 4, 8, abi.EVENT_MAX),
        "tails": (MAP_PROG_ARRAY, 4, 4, 8),
        "sni_state": (MAP_LRU_HASH, s(abi.Flow6Key), s(abi.SniState), sizes["BH_MAX_SNI_PARSE"]),
        "sni_scratch": (MAP_PERCPU_ARRAY, 4, s(abi.SniState), 1),
        "lat_hist": (MAP_PERCPU_HASH, s(abi.LatKey), s(abi.LatVal), sizes["BH_MAX_LAT"]),
        "pair_flows": (MAP_PERCPU_HASH, s(abi.PairKey), 8, sizes["BH_MAX_PAIRS"]),
    }
    for n in range(abi.NUM_SLOTS):
        specs[f"seg_map_{n}"] = (MAP_ARRAY, 4, s(abi.SegVal), sizes["BH_MAX_IFINDEX"])
        specs[f"src_host_{n}"] = (MAP_HASH, s(abi.SrcKey), s(abi.Ident), sizes["BH_MAX_IDENT"])
        specs[f"src_ident_{n}"] = (MAP_LPM_TRIE, s(abi.SrcKey), s(abi.Ident), sizes["BH_MAX_IDENT"])
        specs[f"dst_host_{n}"] = (MAP_HASH, s(abi.DstKey), s(abi.Ident), sizes["BH_MAX_IDENT"])
        specs[f"dst_ident_{n}"] = (MAP_LPM_TRIE, s(abi.DstKey), s(abi.Ident), sizes["BH_MAX_IDENT"])
        specs[f"pol_exact_{n}"] = (MAP_HASH, s(abi.PolicyKey), s(abi.PolicyVal), sizes["BH_MAX_POLICY"])
        specs[f"policy_{n}"] = (MAP_LPM_TRIE, s(abi.PolicyKey), s(abi.PolicyVal), sizes["BH_MAX_POLICY"])
        specs[f"sni_names_{n}"] = (MAP_HASH, s(abi.SniKey), s(abi.SniVal), sizes["BH_MAX_SNI"])
        specs[f"fab_{n}"] = (MAP_HASH, s(abi.FabKey), s(abi.FabVal), sizes["BH_MAX_IDENT"])
    return specs


def check_pinned_maps(maps_dir: Path, sizes: dict[str, int]) -> list[str]:
    """Problems that forbid reusing the pinned maps (bcc would not notice)."""
    problems = []
    for name, want in map_specs(sizes).items():
        path = maps_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        fd = libbpf.obj_get(str(path))
        try:
            info = libbpf.map_info(fd)
        finally:
            os.close(fd)
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        if have != want:
            problems.append(f"{name}: pinned (type, key, value, entries) {have} != expected {want}")
    return problems


def misfits(bundle, sizes: dict[str, int], ifindexes: dict[str, int] | None = None) -> list[str]:
    """Why `bundle` can't be written into a slot of maps this size (empty: it fits). Checked
    before the compile and before a slot is touched: a full map never half-applies a policy."""
    sizes = dict(abi.DEFAULT_SIZES, **sizes)
    exact = (abi.POLICY_PLEN_EXACT, abi.POLICY_PLEN_ANY_PORT, abi.POLICY_PLEN_ANY_PROTO)
    n_exact = sum(1 for e in bundle.policy_entries if e[0] in exact)
    src_host = sum(1 for e in bundle.src_entries if e[2] == 128)
    dst_host = sum(1 for e in bundle.dst_entries if e[1] == 128)
    need = {
        ("src_host", "BH_MAX_IDENT", "ident"): src_host,
        ("src_ident", "BH_MAX_IDENT", "ident"): len(bundle.src_entries) - src_host,
        ("dst_host", "BH_MAX_IDENT", "ident"): dst_host,
        ("dst_ident", "BH_MAX_IDENT", "ident"): len(bundle.dst_entries) - dst_host,
        ("pol_exact", "BH_MAX_POLICY", "policy"): n_exact,
        ("policy", "BH_MAX_POLICY", "policy"): len(bundle.policy_entries) - n_exact,
        ("sni_names", "BH_MAX_SNI", "sni_names"): len(bundle.sni_entries),
        # + 1: the SELF entry the agent adds when it runs as a gateway with transit (fill.pack_slot)
        ("fab", "BH_MAX_IDENT", "ident"): len(bundle.fab_entries) + 1,
    }
    out = [f"{m}: {n} entries, the map holds {sizes[knob]} (--map-size {opt}=N)"
           for (m, knob, opt), n in need.items() if n > sizes[knob]]
    for ifname, ifindex in sorted((ifindexes or {}).items()):
        if ifindex >= sizes["BH_MAX_IFINDEX"]:
            out.append(f"{ifname}: ifindex {ifindex} exceeds BH_MAX_IFINDEX ({sizes['BH_MAX_IFINDEX']}; "
                       "--map-size ifindex=N)")
    return out
