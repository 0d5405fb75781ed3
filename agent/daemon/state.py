"""What an agent leaves in its state dir (state.json) and what it has attached where."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bulkhead.datapath import libbpf

STATE_FILE = "state.json"


def read_state(state_dir: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(state_dir) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def write_state(state_dir: str | os.PathLike, state: dict) -> None:
    p = Path(state_dir) / STATE_FILE
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, p)


def xdp_prog_ids() -> dict[str, int]:
    """ifname -> id of the XDP program attached there (this netns)."""
    from pyroute2 import IPRoute

    ids = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            xdp = link.get_attr("IFLA_XDP")
            if xdp is None:
                continue
            # one program: IFLA_XDP_PROG_ID; several modes at once: one id per mode
            for attr in ("IFLA_XDP_PROG_ID", "IFLA_XDP_DRV_PROG_ID", "IFLA_XDP_SKB_PROG_ID",
                         "IFLA_XDP_HW_PROG_ID"):
                pid = xdp.get_attr(attr)
                if pid:
                    ids[link.get_attr("IFLA_IFNAME")] = pid
                    break
    return ids


def prog_name(prog_id: int) -> str:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return libbpf.prog_info(fd).name.decode(errors="replace")
    finally:
        os.close(fd)
