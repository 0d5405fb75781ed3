"""The transit between gateways: what this gateway's part of it is, and its VXLAN device.

A gateway of a policy with transit (`gateways:` entries with `transit: ADDR`) carries flows to
apps behind other gateways in VXLAN, with the destination segment in the VNI and the source app
in the Group Based Policy field. The kernel's VXLAN device in external (collect-metadata) mode
with GBP does the wire format; the data path sets the tunnel key per packet (bulkhead_tc
redirects to the device, whose ifindex it reads from the fab SELF entry) and judges what the
device decapsulates (bulkhead_transit_in on its clsact ingress).

  ip link add bhvx-<instance> type vxlan external gbp dstport PORT

This module is the pure part (which gateway this is, its transit address, the device's name)
and the device itself (create, check, delete). The plumbing (plumbing.py) owns its lifetime:
it records the device like its other changes so `bulkhead down` removes it, also after a crash.
"""
from __future__ import annotations

import errno
import ipaddress
import logging

from bulkhead.datapath import wireguard

log = logging.getLogger("bulkhead.plumbing")

DEVICE_PREFIX = "bhvx-"
RP_ALL = "/proc/sys/net/ipv4/conf/all/rp_filter"
IFNAMSIZ = 15  # usable characters of an interface name
VXLAN_MTU = 1500  # the kernel's MTU for a VXLAN device without a lower device (no WireGuard under it)


def device_name(instance: str) -> str:
    """The transit device of an instance (loader.instance_name): `bhvx-default`, or
    `bhvx-` + the first 10 hex digits of an `sd-<hash>` instance (names are at most 15)."""
    return (DEVICE_PREFIX + instance.removeprefix("sd-"))[:IFNAMSIZ]


def addr16(addr: str) -> bytes:
    """An address as the 16 bytes of every map key: IPv4-mapped for IPv4."""
    a = ipaddress.ip_address(addr)
    return (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed


def plan(bundle, gateway: str | None) -> dict | None:
    """This gateway's transit in `bundle`, or None (no gateway name, or a policy without transit):
    {"gateway", "gateway_id" (1-based index in bundle.gateways), "port", "address" (None: this
    gateway has no transit address), "peers": {name: address of every other transit gateway}}."""
    transit = bundle.transit
    if not gateway or not transit or gateway not in bundle.gateways:
        return None
    addrs = dict(transit.get("gateways") or {})
    return {"gateway": gateway, "gateway_id": bundle.gateways.index(gateway) + 1, "port": int(transit["port"]),
            "address": addrs.get(gateway), "peers": {n: a for n, a in sorted(addrs.items()) if n != gateway}}


def fab_self(p: dict | None, ifindex: int) -> tuple[int, int, bytes] | None:
    """The SELF entry fill.pack_slot writes for plan `p`: (gateway id, transit device ifindex or 0,
    transit address as 16 bytes, zeros without one); None without transit."""
    if p is None:
        return None
    return (p["gateway_id"], ifindex, addr16(p["address"]) if p["address"] else bytes(16))


def sysctls(name: str) -> dict[str, str]:
    """The sysctls the plumbing sets (and records, and restores) for the transit device: rp_filter
    0, since what it decapsulates comes from other gateways' segments, which no route here leads
    back to. The kernel applies max(conf.all, conf.<dev>): a strict conf.all is warned about."""
    try:
        with open(RP_ALL) as f:
            strict = f.read().strip() == "1"
    except OSError:
        strict = False
    if strict:
        log.warning("%s is 1 (strict): the kernel applies max(all, %s) = 1 to the transit device, so packets "
                    "it decapsulates that go up the stack may be dropped; set it to 0 or 2", RP_ALL, name)
    return {f"/proc/sys/net/ipv4/conf/{name}/rp_filter": "0"}


# ------------------------------------------------------------------ the device
def _ipr():
    from pyroute2 import IPRoute  # imported late: unit tests import this module without it

    return IPRoute()


def _linkinfo(link) -> tuple[str | None, dict]:
    info = link.get_attr("IFLA_LINKINFO")
    if not info:
        return None, {}
    kind = info.get_attr("IFLA_INFO_KIND")
    data = info.get_attr("IFLA_INFO_DATA")
    attrs = {k: v for k, v in data["attrs"]} if data is not None and kind == "vxlan" else {}
    return kind, attrs


def device(name: str) -> dict | None:
    """{"ifindex", "port", "external", "gbp", "up"} of a VXLAN device `name`, None if there is
    none; {"kind": other} for a device of another kind by that name."""
    with _ipr() as ipr:
        try:
            links = ipr.link("get", ifname=name)
        except Exception as e:  # noqa: BLE001 -- pyroute2's NetlinkError: no such device
            if getattr(e, "code", None) in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        if not links:
            return None
        link = links[0]
        kind, attrs = _linkinfo(link)
        if kind != "vxlan":
            return {"kind": kind, "ifindex": link["index"]}
        return {"kind": kind, "ifindex": link["index"], "port": attrs.get("IFLA_VXLAN_PORT"),
                "external": bool(attrs.get("IFLA_VXLAN_COLLECT_METADATA")), "gbp": "IFLA_VXLAN_GBP" in attrs,
                "up": bool(link["flags"] & 1)}


def ensure(name: str, port: int) -> tuple[int, bool]:
    """Make `name` a VXLAN device in external mode with GBP on UDP `port`, up. Returns (ifindex,
    created): an existing device of that shape is kept (its clsact filter with it); one of another
    port or shape is replaced (VXLAN can't change its port in place). A non-VXLAN device of that
    name is an error: it is not ours."""
    have = device(name)
    if have is not None and have["kind"] != "vxlan":
        raise OSError(errno.EEXIST, f"{name} exists and is a {have['kind'] or 'hardware'} device, not bulkhead's "
                                    "transit: rename it or run this agent with another --state-dir")
    created = False
    with _ipr() as ipr:
        if have is not None and (have["port"] != port or not have["external"] or not have["gbp"]):
            log.info("transit: %s is on port %s, wanted %d: recreating it", name, have["port"], port)
            ipr.link("del", index=have["ifindex"])
            have = None
        if have is None:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_collect_metadata=1, vxlan_gbp=True, vxlan_port=port)
            created = True
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, state="up")
    if created:
        log.info("transit: created %s (vxlan external gbp dstport %d), ifindex %d", name, port, idx)
    return idx, created


def remove(name: str) -> bool:
    """Delete the VXLAN device `name` if there is one (only a VXLAN device). True: deleted."""
    have = device(name)
    if have is None or have["kind"] != "vxlan":
        return False
    with _ipr() as ipr:
        try:
            ipr.link("del", index=have["ifindex"])
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) not in (errno.ENODEV, errno.ENOENT):
                raise
            return False
    log.info("transit: removed %s", name)
    return True


def sync(rec: dict, name: str, port: int | None, save, wg: tuple = (None, None)) -> int:
    """The plumbing's step for the transit device `name`, recorded in its record `rec` under
    "transit": made (kept, or recreated on another port) when `port` is given, removed when
    not. Recorded (`save(rec)`) before it is created, so a crash in between leaves it known to
    `bulkhead down`. Returns its ifindex (0: none).

    `wg`: (wireguard plan, private key file) of wireguard.py, or (None, None): the WireGuard
    device under the transit goes first (made, or removed), and fails closed (WireguardError)."""
    mtu = wireguard.sync(rec, wireguard.device_name(name.removeprefix(DEVICE_PREFIX)), wg[0] if port else None,
                         wg[1], save)
    if port:
        rec["transit"] = {"device": name, "port": int(port)}
        save(rec)
        idx = ensure(name, int(port))[0]
        wireguard.set_mtu(idx, mtu or VXLAN_MTU)
        return idx
    old = rec.pop("transit", None)
    if old:
        remove(old.get("device") or name)
        save(rec)
    return 0


def remove_recorded(rec: dict, name: str | None, sweep: bool) -> list[str]:
    """Remove the transit device a plumbing record names, else `name` (when the record is empty),
    and with `sweep` every transit device of this netns; the WireGuard device under it alike, first.
    Returns the errors (never raises)."""
    wg_name = wireguard.device_name(name.removeprefix(DEVICE_PREFIX)) if name else None
    errors, names = wireguard.remove_recorded(rec, wg_name, sweep), set()
    if rec.get("transit"):
        names.add(rec["transit"].get("device") or name)
    elif not rec and name:
        names.add(name)
    return errors + wireguard.remove_devices(names, devices if sweep else None, remove, "transit")


def devices() -> list[str]:
    """Names of every VXLAN device named like a transit device (DEVICE_PREFIX) in this netns."""
    out = []
    with _ipr() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith(DEVICE_PREFIX) and _linkinfo(link)[0] == "vxlan":
                out.append(name)
    return sorted(out)
