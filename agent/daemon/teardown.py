"""`bulkhead down`: leave nothing behind.

Works with or without a running agent: asks a live agent to exit first,
then detaches our XDP program from every interface of this netns that has
it, removes the gateway plumbing and the pins, and the state files.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from bulkhead.core import wire
from bulkhead.datapath import libbpf, loader


def down(state_dir: str) -> dict:
    from bulkhead.daemon.state import STATE_FILE, prog_name, read_state, xdp_prog_ids

    actions: list[str] = []
    errors: list[str] = []
    state = read_state(state_dir)
    pin_dir = Path(state.get("pin_dir") or loader.pin_dir_for(state_dir))
    instance = state.get("instance") or loader.instance_name(state_dir)

    try:
        wire.request(state_dir, "shutdown", timeout=5)
        actions.append("asked the running agent to exit")
        for _ in range(50):
            if not wire.socket_path(state_dir).exists():
                break
            time.sleep(0.1)
    except Exception:
        pass

    # Our program: the pinned one, plus any attachment named like it on the
    # interfaces this instance recorded.
    pinned_id = None
    pinned = pin_dir / loader.XDP_PROG
    if pinned.exists():
        try:
            fd = libbpf.obj_get(str(pinned))
            pinned_id = libbpf.prog_info(fd).id
            os.close(fd)
        except OSError as e:
            errors.append(f"reading {pinned}: {e}")
    recorded = set(state.get("interfaces", {}))
    try:
        attached = xdp_prog_ids()
    except Exception as e:
        attached = {}
        errors.append(f"listing XDP attachments: {e}")
    for ifname, pid in sorted(attached.items()):
        ours = pid == pinned_id or (ifname in recorded and prog_name(pid).startswith(loader.XDP_PROG[:15]))
        if ours:
            loader.Datapath.detach(ifname)
            actions.append(f"detached XDP from {ifname}")
    # The TC steering filter (bulkhead_tc, our preference on clsact ingress).
    for ifname in sorted(recorded | {n for n, pid in attached.items()}):
        try:
            if loader.Datapath.tc_attached(ifname):
                loader.Datapath.detach_tc(ifname)
                actions.append(f"detached TC steering from {ifname}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"detaching TC from {ifname}: {e}")

    try:
        from bulkhead.datapath.plumbing import Plumbing, remove_all

        if state:
            Plumbing(instance).remove()
        else:
            remove_all()
        actions.append("removed gateway plumbing (nft table, ip rules, routes, transit device)")
    except Exception as e:
        errors.append(f"removing plumbing: {e}")

    if pin_dir.exists():
        loader.remove_pins(pin_dir)
        actions.append(f"removed pins {pin_dir}")
    for name in (STATE_FILE, wire.SOCKET_NAME):
        p = Path(state_dir) / name
        if p.exists():
            p.unlink()
    return {"actions": actions, "errors": errors}
