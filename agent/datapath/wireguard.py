"""WireGuard under the transit (docs/fabric.md "Encryption between gateways").

With `wireguard:` on the policy's transit gateways, this gateway's transit address lives on a
WireGuard device `bhwg-<instance>`; each other gateway is a peer (its public key, its endpoint,
allowed-ips its transit address /32 or /128) and a route to its transit address leads through
the device. The VXLAN device (transit.py) then sends to transit addresses as before, and the
kernel encrypts: on the underlay only UDP to the WireGuard port is seen.

Fail closed: the policy asks for encryption, so a missing kernel module, a missing `wg`
(wireguard-tools) or an unusable private key file is an error of the apply (the running policy
stays), never a transit sent in the clear.

The private key is never in the policy: `agent run --wireguard-key FILE` ($BULKHEAD_WIREGUARD_KEY),
a file with the base64 private key, readable by its owner only.
"""
from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import logging
import os
import shutil
import stat
import subprocess

log = logging.getLogger("bulkhead.plumbing")

DEVICE_PREFIX = "bhwg-"
IFNAMSIZ = 15
# WireGuard's overhead on the underlay: outer IPv6 40 + UDP 8 + its header 16 + the auth tag 16
# (IPv4: 60). wg-quick's figure too: one MTU whichever family the endpoints are.
WG_OVERHEAD = 80
# VXLAN's inside WireGuard, by the transit addresses' family: Ethernet 14 + VXLAN 8 + UDP 8 + IP 20 (IPv6 40).
VXLAN_OVERHEAD = {32: 50, 128: 70}
DEFAULT_UNDERLAY_MTU = 1500  # no peer's endpoint has a route yet
MAIN_TABLE = 254  # the routes to the peers' transit addresses


class WireguardError(RuntimeError):
    pass


def device_name(instance: str) -> str:
    """`bhwg-default`, or `bhwg-` + the first 10 hex digits of an `sd-<hash>` instance."""
    return (DEVICE_PREFIX + instance.removeprefix("sd-"))[:IFNAMSIZ]


def plan(bundle, gateway: str | None) -> dict | None:
    """This gateway's WireGuard in `bundle`: {"listen_port", "public_key", "address", "prefix",
    "peers": {name: {"public_key", "endpoint", "address"}}}; None without wireguard in the bundle
    or without this gateway in it (an agent with no gateway name sends nothing through the transit)."""
    t = bundle.transit or {}
    wg = t.get("wireguard") or {}
    addrs = t.get("gateways") or {}
    if not wg or not gateway or gateway not in wg or gateway not in addrs:
        return None
    me = wg[gateway]
    prefix = 32 if ipaddress.ip_address(addrs[gateway]).version == 4 else 128
    peers = {n: {"public_key": w["public_key"], "endpoint": w["endpoint"], "address": addrs[n]}
             for n, w in sorted(wg.items()) if n != gateway and n in addrs}
    return {"listen_port": int(me["endpoint"].rpartition(":")[2]), "public_key": me["public_key"],
            "address": addrs[gateway], "prefix": prefix, "peers": peers}


def check_key_file(path: str | None) -> str:
    """The private key file's path, checked: present, a regular file, readable, not group- or
    other-readable, one base64 WireGuard key. WireguardError otherwise."""
    if not path:
        raise WireguardError("the policy encrypts the transit with WireGuard but this agent has no private key: "
                             "run it with --wireguard-key FILE (or $BULKHEAD_WIREGUARD_KEY), a file with "
                             "the base64 private key (`wg genkey`), mode 0600")
    try:
        st = os.stat(path)
    except OSError as e:
        raise WireguardError(f"WireGuard private key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WireguardError(f"WireGuard private key {path}: not a regular file")
    if st.st_mode & 0o077:
        raise WireguardError(f"WireGuard private key {path} is mode {stat.S_IMODE(st.st_mode):04o}: group or "
                             "others may read it; chmod 600 it")
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise WireguardError(f"WireGuard private key {path}: {e.strerror}") from None
    try:
        ok = len(text) == 44 and len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise WireguardError(f"WireGuard private key {path}: not a WireGuard key (44 characters of base64, "
                             "as `wg genkey` prints it)")
    return path


def wg_commands(name: str, p: dict, key_file: str) -> list[list[str]]:
    """The `wg` command that configures device `name` for plan `p` (replace-peers: peers of an
    older policy go)."""
    cmd = ["wg", "set", name, "private-key", key_file, "listen-port", str(p["listen_port"])]
    for peer in p["peers"].values():
        cmd += ["peer", peer["public_key"], "endpoint", peer["endpoint"],
                "allowed-ips", f"{peer['address']}/{p['prefix']}"]
    return [cmd]


def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def _kind(name: str) -> tuple[int, str | None] | None:
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        info = ipr.get_links(idx[0])[0].get_attr("IFLA_LINKINFO")
        return idx[0], info.get_attr("IFLA_INFO_KIND") if info else None


def _wg(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise WireguardError("`wg` not found: install wireguard-tools (the policy encrypts the transit)") from None
    if r.returncode != 0:
        raise WireguardError(f"{' '.join(args[:3])}: {r.stderr.strip() or 'exit %d' % r.returncode}")
    return r.stdout


def underlay_mtu(p: dict, ipr, skip: int = 0) -> int:
    """The smallest MTU on the routes to the peers' endpoints (the route's mtu metric, else its
    device's), DEFAULT_UNDERLAY_MTU when none has a route; `skip`: the WireGuard device itself."""
    mtus = []
    for peer in p["peers"].values():
        host = peer["endpoint"].rpartition(":")[0].strip("[]")
        try:
            routes = ipr.route("get", dst=host)
        except Exception:  # noqa: BLE001 -- no route (yet): WireGuard sends nothing there either
            continue
        for r in routes:
            metrics = r.get_attr("RTA_METRICS")
            mtu = metrics.get_attr("RTAX_MTU") if metrics else None
            oif = r.get_attr("RTA_OIF")
            if not mtu and oif and oif != skip:
                mtu = ipr.get_links(oif)[0].get_attr("IFLA_MTU")
            if mtu:
                mtus.append(int(mtu))
    return min(mtus) if mtus else DEFAULT_UNDERLAY_MTU


def mtus(underlay: int, prefix: int) -> tuple[int, int]:
    """(the WireGuard device's MTU, the VXLAN device's inside it) over an underlay of MTU `underlay`:
    the kernel's WireGuard default (1420) assumes a 1500 underlay; the VXLAN device's (1500 by
    default) would promise inner packets that only fit fragmented."""
    wg = underlay - WG_OVERHEAD
    return wg, wg - VXLAN_OVERHEAD[prefix]


def set_mtu(ifindex: int, mtu: int) -> None:
    with _ipr() as ipr:
        if ipr.get_links(ifindex)[0].get_attr("IFLA_MTU") != mtu:
            ipr.link("set", index=ifindex, mtu=mtu)


def _peers_now(name: str) -> set[str]:
    lines = _wg(["wg", "show", name, "peers"]).split()
    return set(lines)


def ensure(name: str, p: dict, key_file: str) -> tuple[int, int]:
    """Make `name` the WireGuard device of plan `p`: created, keyed, peers set (others removed),
    its MTU the underlay's minus WG_OVERHEAD, the transit address on it, up, a route to each
    peer's transit address. Returns (its ifindex, the MTU for the VXLAN device inside it)."""
    check_key_file(key_file)
    if shutil.which("wg") is None:
        raise WireguardError("`wg` not found: install wireguard-tools (the policy encrypts the transit; "
                             "nothing is sent in the clear)")
    have = _kind(name)
    if have is not None and have[1] != "wireguard":
        raise WireguardError(f"{name} exists and is a {have[1] or 'hardware'} device, not bulkhead's WireGuard")
    with _ipr() as ipr:
        if have is None:
            try:
                ipr.link("add", ifname=name, kind="wireguard")
            except Exception as e:
                if getattr(e, "code", None) in (errno.EOPNOTSUPP, errno.EINVAL) or "Unknown device type" in str(e) \
                        or "not supported" in str(e).lower():
                    raise WireguardError(f"the kernel has no wireguard module (ip link add {name} type wireguard: "
                                         f"{e}): the policy encrypts the transit, so it is not applied") from None
                raise
            log.info("transit: created %s (wireguard)", name)
        idx = ipr.link_lookup(ifname=name)[0]
    want_peers = {peer["public_key"] for peer in p["peers"].values()}
    for gone in sorted(_peers_now(name) - want_peers):
        _wg(["wg", "set", name, "peer", gone, "remove"])
    for cmd in wg_commands(name, p, key_file):
        _wg(cmd)
    fam = 2 if p["prefix"] == 32 else 10
    with _ipr() as ipr:
        for a in ipr.get_addr(index=idx):
            addr = a.get_attr("IFA_ADDRESS")
            if (addr, a["prefixlen"]) != (p["address"], p["prefix"]):
                ipr.addr("del", index=idx, address=addr, prefixlen=a["prefixlen"])
        try:
            ipr.addr("add", index=idx, address=p["address"], prefixlen=p["prefix"])
        except Exception as e:
            if getattr(e, "code", None) != errno.EEXIST:
                raise
        wg_mtu, vx_mtu = mtus(underlay_mtu(p, ipr, skip=idx), p["prefix"])
        if ipr.get_links(idx)[0].get_attr("IFLA_MTU") != wg_mtu:
            ipr.link("set", index=idx, mtu=wg_mtu)
        ipr.link("set", index=idx, state="up")
        want = {peer["address"] for peer in p["peers"].values()}
        # Only the main table's: the local table has this gateway's own address on the device
        # (its /32 or /128 too), which is not a route to a peer and not ours to delete.
        for r in ipr.get_routes(family=fam, oif=idx, table=MAIN_TABLE):
            dst = r.get_attr("RTA_DST")
            if r["dst_len"] == p["prefix"] and dst not in want and r.get_attr("RTA_OIF") == idx:
                ipr.route("del", family=fam, dst=dst, dst_len=p["prefix"], oif=idx, table=MAIN_TABLE)
        for dst in sorted(want):
            ipr.route("replace", family=fam, dst=dst, dst_len=p["prefix"], oif=idx, table=MAIN_TABLE)
    log.info("transit: %s mtu %d (the VXLAN device inside it: %d)", name, wg_mtu, vx_mtu)
    return idx, vx_mtu


def remove(name: str) -> bool:
    """Delete the WireGuard device `name` if there is one (only a WireGuard device)."""
    have = _kind(name)
    if have is None or have[1] != "wireguard":
        return False
    with _ipr() as ipr:
        try:
            ipr.link("del", index=have[0])
        except Exception as e:
            if getattr(e, "code", None) not in (errno.ENODEV, errno.ENOENT):
                raise
            return False
    log.info("transit: removed %s", name)
    return True


def sync(rec: dict, name: str, p: dict | None, key_file: str | None, save) -> int | None:
    """The plumbing's step for the WireGuard device, recorded under "wireguard" (before it is
    made, so `bulkhead down` knows it after a crash); removed when `p` is None. Returns the MTU
    for the VXLAN device (None: no WireGuard, the VXLAN device's own default)."""
    if p is not None:
        check_key_file(key_file)
        rec["wireguard"] = {"device": name}
        save(rec)
        return ensure(name, p, key_file)[1]
    old = rec.pop("wireguard", None)
    if old:
        remove(old.get("device") or name)
        save(rec)
    return None


def remove_recorded(rec: dict, name: str | None = None, sweep: bool = False) -> list[str]:
    """Remove the WireGuard device a plumbing record names, else `name` (when the record is empty),
    and with `sweep` every WireGuard device named like bulkhead's in this netns (a lost record:
    the VXLAN devices are swept the same way, transit.remove_recorded). Returns the errors (never raises)."""
    names = set()
    if rec.get("wireguard"):
        names.add(rec["wireguard"].get("device"))
    elif not rec and name:
        names.add(name)
    return remove_devices(names, devices if sweep else None, remove, "wireguard")


def remove_devices(names: set, listing, remove_one, what: str) -> list[str]:
    """Remove the devices `names`, and those `listing()` gives (None: no sweep), each with
    `remove_one`; what fails is returned as errors naming `what` kind of device, the rest goes on.
    (transit.remove_recorded removes the VXLAN devices the same way.)"""
    errors = []
    if listing is not None:
        try:
            names.update(listing())
        except Exception as e:  # noqa: BLE001 -- keep removing the rest
            errors.append(f"listing {what} devices: {e}")
    for dev in sorted(n for n in names if n):
        try:
            remove_one(dev)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{what} device {dev}: {e}")
    return errors


def ours(links) -> list[str]:
    """Of (name, kind) pairs, the names of bulkhead's WireGuard devices: named DEVICE_PREFIX...
    and of kind wireguard (a device of another kind by such a name is not ours and stays)."""
    return sorted(n for n, kind in links if n and n.startswith(DEVICE_PREFIX) and kind == "wireguard")


def devices() -> list[str]:
    """Names of every WireGuard device named like bulkhead's (DEVICE_PREFIX) in this netns."""
    pairs = []
    with _ipr() as ipr:
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            pairs.append((link.get_attr("IFLA_IFNAME"), info.get_attr("IFLA_INFO_KIND") if info else None))
    return ours(pairs)


def show(name: str) -> dict | None:
    """`wg show NAME dump` as {"device", "public_key", "listen_port", "peers": {public key:
    {"endpoint", "latest_handshake"}}}; None when there is no such device."""
    try:
        out = _wg(["wg", "show", name, "dump"])
    except WireguardError:
        return None
    lines = [line.split("\t") for line in out.splitlines() if line.strip()]
    if not lines:
        return None
    head = lines[0]
    peers = {}
    for f in lines[1:]:
        if len(f) >= 5:
            peers[f[0]] = {"endpoint": None if f[2] == "(none)" else f[2], "latest_handshake": int(f[4] or 0)}
    return {"device": name, "public_key": head[1], "listen_port": int(head[2]) if head[2].isdigit() else None,
            "peers": peers}


def status(p: dict | None, instance: str) -> dict | None:
    """`status --json` transit.wireguard: the device of plan `p` as `wg show NAME dump` has it,
    peers by gateway name; None without WireGuard."""
    if p is None:
        return None
    name = device_name(instance)
    shown = show(name) or {"device": name, "public_key": None, "listen_port": None, "peers": {}}
    peers = {}
    for gw, peer in p["peers"].items():
        now = shown["peers"].get(peer["public_key"]) or {}
        peers[gw] = {"endpoint": now.get("endpoint"), "latest_handshake": now.get("latest_handshake", 0)}
    return {"device": name, "public_key": shown["public_key"], "listen_port": shown["listen_port"], "peers": peers}
