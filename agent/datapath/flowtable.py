"""Userspace access to the kernel's flow tables (flows4 / flows6).

The verifier uses it twice per punted connection:
  - lookup(): the flow entry XDP made for the client's connection tells which
    apps, which rule and which generation the connection belongs to (the
    accepted socket alone can't: CIDRs overlap across segments);
  - steer_upstream(): before connecting to the origin from the client's
    address, it writes the reply-direction entry of that new connection, so
    XDP passes the origin's answers and steers them to the verifier's socket
    (reason l7_upstream) instead of judging them as a new flow.
"""
from __future__ import annotations

import ctypes as C
import ipaddress
import os
import socket
import time
from pathlib import Path

from bulkhead.core.names import CLOCK_MONOTONIC_COARSE
from bulkhead.datapath import abi, libbpf



class FlowTable:
    """The pinned flows4/flows6 maps of one bulkhead instance."""

    def __init__(self, maps_dir: str | os.PathLike | None = None, fds: dict[str, int] | None = None):
        self.owned: list[int] = []
        if fds is not None:
            self.fds = {"flows4": fds["flows4"], "flows6": fds["flows6"]}
        else:
            self.fds = {}
            for name in ("flows4", "flows6"):
                fd = libbpf.obj_get(str(Path(maps_dir) / name))
                self.fds[name] = fd
                self.owned.append(fd)

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.owned = []

    @staticmethod
    def key(src: str, dst: str, sport: int, dport: int, proto: int, segment: int):
        """(map name, key) of the entry for packets src:sport -> dst:dport arriving on `segment`."""
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        if isinstance(s, ipaddress.IPv6Address) and s.ipv4_mapped:
            s = s.ipv4_mapped
        if isinstance(d, ipaddress.IPv6Address) and d.ipv4_mapped:
            d = d.ipv4_mapped
        if s.version != d.version:
            raise ValueError(f"address families differ: {src} -> {dst}")
        if s.version == 4:
            k = abi.Flow4Key(saddr_be=socket.htonl(int(s)), daddr_be=socket.htonl(int(d)),
                             sport_be=socket.htons(sport), dport_be=socket.htons(dport),
                             proto=proto, segment_id=segment)
            return "flows4", k
        k = abi.Flow6Key(sport_be=socket.htons(sport), dport_be=socket.htons(dport), proto=proto,
                         segment_id=segment)
        C.memmove(k.saddr, s.packed, 16)
        C.memmove(k.daddr, d.packed, 16)
        return "flows6", k

    def lookup(self, src: str, dst: str, sport: int, dport: int, proto: int, segment: int) -> abi.Flow | None:
        name, k = self.key(src, dst, sport, dport, proto, segment)
        v = abi.Flow()
        if libbpf.lib().bpf_map_lookup_elem(self.fds[name], C.byref(k), C.byref(v)) < 0:
            return None
        return v

    def put(self, src: str, dst: str, sport: int, dport: int, proto: int, segment: int, v: abi.Flow) -> None:
        name, k = self.key(src, dst, sport, dport, proto, segment)
        libbpf.map_update(self.fds[name], k, v)

    def delete(self, src: str, dst: str, sport: int, dport: int, proto: int, segment: int) -> bool:
        name, k = self.key(src, dst, sport, dport, proto, segment)
        return libbpf.lib().bpf_map_delete_elem(self.fds[name], C.byref(k)) == 0

    def steer_upstream(self, fwd: abi.Flow, client_segment: int, client: tuple[str, int],
                       server: tuple[str, int]) -> None:
        """Write the reply entry of the verifier's upstream connection client -> server.

        `fwd` is the entry of the punted connection (its apps, rule, generation
        and the server's segment, peer_segment); `client` is the upstream
        socket's own address (the client's IP, a port the kernel chose)."""
        v = abi.Flow(
            last_seen_ns=time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE),
            generation=fwd.generation, rule_id=fwd.rule_id, src_app=fwd.src_app, dst_app=fwd.dst_app,
            action=int(abi.Action.ALLOW), flags=abi.FLOWF_REPLY, reason=int(abi.Reason.L7_UPSTREAM),
            peer_segment=client_segment,
        )
        self.put(server[0], client[0], server[1], client[1], socket.IPPROTO_TCP, fwd.peer_segment, v)
