"""Which interfaces the XDP fast path may redirect frames out of (if_cfg.redirect_ok).

bh_forward (bpf/bulkhead.c) forwards an allowed, unsteered packet with bpf_fib_lookup and
bpf_redirect. A redirect from native XDP hands the frame to the egress driver's ndo_xdp_xmit;
where that can't take it, the frame is lost after the program has returned, uncounted by us.
So the loader says per interface, at attach, whether it is a safe target, and the program
passes everything else to the stack (counted as fwd_no_target):

  - a NIC driver with native XDP (no rtnetlink link kind): yes; its XDP transmit queues
    exist while an XDP program is attached, and bulkhead's is;
  - a veth with native XDP: only if its peer has an XDP program now. A veth delivers a
    redirected frame into the peer's XDP ring, which only a peer with NAPI running (an XDP
    program, or GRO) drains; without one the frame is dropped. Unlike the reject path
    (loader.choose_reject_path), which must work whatever the peer does, the fast path is an
    optimisation: it is taken where it works when checked, and re-checked at every attach.
    A peer that loses its program later drops redirected frames until the next attach
    (`bulkhead apply`, a restart), or for good with BH_CTL_NO_FASTPATH;
  - generic XDP, and other software devices (bridge, bond, tun, vxlan...): no.
"""
from __future__ import annotations

import logging

log = logging.getLogger("bulkhead.fastpath")

def _attr(msg, name, default=None):
    for k, v in msg.get("attrs", []):
        if k == name:
            return v
    return default


def veth_peer_has_xdp(ifname: str) -> bool | None:
    """Whether the peer of veth `ifname` has an XDP program attached (in whatever namespace it
    is); None if the peer can't be asked (gone, or in a namespace without an id here)."""
    from pyroute2 import IPRoute  # imported late: unit tests run without it

    with IPRoute() as ipr:
        links = ipr.link("get", ifname=ifname)
        if not links:
            return None
        peer = _attr(links[0], "IFLA_LINK")
        nsid = _attr(links[0], "IFLA_LINK_NETNSID")
        if not peer or (nsid is not None and nsid < 0):
            return None
        # IFLA_IF_NETNSID (IFLA_TARGET_NETNSID): ask about a link in the namespace of that id.
        kw = {"if_netnsid": nsid} if nsid is not None else {}
        try:
            reply = ipr.link("get", index=peer, **kw)
        except Exception as e:  # noqa: BLE001 - netlink's errors are many; any means "can't tell"
            log.debug("%s: the veth peer %d can't be asked: %s", ifname, peer, e)
            return None
        if not reply:
            return None
        xdp = _attr(reply[0], "IFLA_XDP")
        return bool(xdp and _attr(xdp, "IFLA_XDP_PROG_ID"))


def redirect_ok(mode: str, link_kind: str | None, ifname: str) -> bool:
    """May bh_forward bpf_redirect frames out of `ifname` (XDP attached in `mode`)?"""
    if mode != "native":
        return False
    if not link_kind:
        return True
    if link_kind == "veth":
        return veth_peer_has_xdp(ifname) is True
    return False
