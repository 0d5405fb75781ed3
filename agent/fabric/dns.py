"""The gateway's DNS: published apps resolve to their service addresses, per client segment.

Each segment with `dns: [ADDR, ...]` gets a UDP and a TCP listener on port 53 of each address,
on each of the segment's interfaces (SO_BINDTODEVICE: two segments may use the same address,
and the interface a query arrived on says which segment asked). What a query gets:

- a published name (exact, or one label under a published `*.domain`) of an app that some app
  of the asking segment may reach (an allow rule from one of the segment's apps to it, or to
  one of its backends for a router, or `default_action: allow`): the app's service addresses (A / AAAA; NOERROR with no answer for
  a family it has none in, and for other types), authoritative, TTL `fabric: dns_ttl`;
- a published name the segment may not reach: NXDOMAIN, as if it did not exist (DNS doesn't
  reveal apps a client can't reach);
- any other name: forwarded to `fabric: upstream_dns` (UDP queries over UDP, TCP over TCP;
  SERVFAIL if none answers), or REFUSED when the policy names no upstream;
- a message that does not parse: FORMERR when its header could be read, else nothing.

The wire format is dnslib's. Replies leave by the asking segment's routing table: the query
came in through conntrack, and the gateway plumbing routes the replies of a segment's
connections back into it (datapath/plumbing.py), so overlapping client CIDRs are fine.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ipaddress
import logging
import selectors
import socket
import struct
import threading
from typing import Optional

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSHeader, DNSRecord

log = logging.getLogger("bulkhead.dns")

PORT = 53
UPSTREAM_TIMEOUT = 2.0
TCP_TIMEOUT = 10.0
TCP_MAX_CONNECTIONS = 64
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class Zone:
    """What the gateway answers, from a bundle: names, service addresses, who may see them."""

    def __init__(self, bundle):
        fab = bundle.fabric or {}
        self.ttl = int(fab.get("dns_ttl", 30))
        self.upstream = [str(a) for a in fab.get("upstream_dns", [])]
        self.exact: dict[str, str] = {}
        self.wild: dict[str, str] = {}  # "*.apps.example" -> app, keyed "apps.example"
        for app in bundle.apps:
            for name in app.get("dns_names") or []:
                if name.startswith("*."):
                    self.wild.setdefault(name[2:], app["name"])
                else:
                    self.exact.setdefault(name, app["name"])
        self.vips = {name: [ipaddress.ip_address(a) for a in addrs] for name, addrs in (bundle.vips or {}).items()}
        seg_of_app = {a["name"]: a["segment"] for a in bundle.apps}
        seg_name = {s["id"]: s["name"] for s in bundle.segments}
        published = set(self.exact.values()) | set(self.wild.values())
        everyone = bundle.settings.get("default_action") == "allow"
        self.visible: dict[str, set[str]] = collections.defaultdict(set)  # segment name -> app names
        for sid, sname in seg_name.items():
            if everyone:
                self.visible[sname] = set(published)
        # a router is reachable where one of its backends is (docs/fabric.md, routes)
        via: dict[str, set[str]] = collections.defaultdict(set)  # backend -> published names leading to it
        for app in bundle.apps:
            if app["name"] in published:
                via[app["name"]].add(app["name"])
                for route in app.get("routes") or []:
                    via[route["to"]].add(app["name"])
        for r in bundle.rules:
            if r["action"] == "allow" and r["from"] in seg_of_app and r["to"] in via:
                self.visible[seg_of_app[r["from"]]] |= via[r["to"]]

    def lookup(self, qname: str) -> Optional[str]:
        """The app a name belongs to: exact first, then a wildcard covering exactly one label."""
        name = qname.lower().rstrip(".")
        if name in self.exact:
            return self.exact[name]
        label, _, rest = name.partition(".")
        if label and rest and rest in self.wild:
            return self.wild[rest]
        return None

    def answer(self, query: DNSRecord, segment: str) -> Optional[DNSRecord]:
        """The reply, or None: not the fabric's name, forward it (or refuse, if no upstream)."""
        reply = query.reply()  # copies id, rd, the question; sets qr, ra, aa
        if query.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return reply
        if len(query.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply
        q = query.questions[0]
        app = self.lookup(str(q.qname))
        if app is None:
            if self.upstream:
                return None
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
            return reply
        if app not in self.visible.get(segment, ()):
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for addr in self.vips.get(app, []):
            if addr.version == 4 and q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(str(addr)), ttl=self.ttl))
            elif addr.version == 6 and q.qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.AAAA, rdata=AAAA(str(addr)), ttl=self.ttl))
        return reply


def _formerr(data: bytes) -> Optional[bytes]:
    """FORMERR for a message whose 12-byte header reads, else None (nothing to answer)."""
    if len(data) < 12:
        return None
    qid = struct.unpack("!H", data[:2])[0]
    return DNSRecord(DNSHeader(id=qid, qr=1, rcode=RCODE.FORMERR)).pack()


class Listener:
    """The UDP socket and the TCP listener of one (segment, interface, address)."""

    def __init__(self, segment: str, ifname: str, addr: str, port: int = PORT):
        self.key = (segment, ifname, addr)
        self.segment = segment
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.socks = []
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(fam, kind)
                self.socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind((addr, port))
                except OSError as e:
                    why = ("it is not an address of this gateway: add it to an interface of the segment "
                           f"(ip addr add {addr}/{128 if fam == socket.AF_INET6 else 32} dev {ifname}) or "
                           "name one the gateway has") if e.errno == 99 else e.strerror
                    raise OSError(e.errno, f"segment {segment}: dns {addr} on {ifname}: cannot listen on "
                                           f"port {port}: {why}") from None
                if kind == socket.SOCK_STREAM:
                    s.listen(64)
                s.setblocking(False)
        except Exception:
            self.close()
            raise
        self.udp, self.tcp = self.socks

    def close(self) -> None:
        for s in self.socks:
            s.close()


class DnsServer:
    """Listeners for every segment's `dns:` on this gateway, answering from the current Zone.

    Applies are two-phase like the data path's: prepare() opens the listeners a new bundle needs
    (an address the gateway doesn't have fails the apply before anything switches), commit()
    switches the zone and closes the listeners it no longer names, abort() closes what prepare
    opened."""

    def __init__(self, port: int = PORT):
        self.port = port
        self.zone: Optional[Zone] = None
        self.listeners: dict[tuple, Listener] = {}
        self._pending: Optional[tuple[Zone, dict, list]] = None
        self.counts: collections.Counter = collections.Counter()  # answer -> queries
        self.by_segment: collections.Counter = collections.Counter()  # (segment, answer) -> queries
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="bh-dns")
        self.tcp_slots = threading.BoundedSemaphore(TCP_MAX_CONNECTIONS)
        self.thread: Optional[threading.Thread] = None

    @staticmethod
    def wanted(bundle, ifnames: Optional[set[str]] = None) -> list[tuple[str, str, str]]:
        out = []
        for s in bundle.segments:
            for ifname in s["interfaces"]:
                if ifnames is None or ifname in ifnames:
                    out += [(s["name"], ifname, a) for a in s.get("dns") or []]
        return out

    def prepare(self, bundle, ifnames: Optional[set[str]] = None) -> None:
        want = self.wanted(bundle, ifnames) if bundle.fabric else []
        new, opened = {}, []
        try:
            for key in want:
                if key in self.listeners:
                    new[key] = self.listeners[key]
                else:
                    new[key] = Listener(*key, port=self.port)
                    opened.append(new[key])
        except Exception:
            for lst in opened:
                lst.close()
            raise
        self._pending = (Zone(bundle) if want else None, new, opened)

    def commit(self) -> None:
        if self._pending is None:
            return
        zone, new, _ = self._pending
        self._pending = None
        with self.lock:
            old, self.listeners, self.zone = self.listeners, new, zone
        self._wake()
        for key, lst in old.items():
            if key not in new:
                lst.close()
        if new and self.thread is None:
            self.thread = threading.Thread(target=self._run, name="bulkhead-dns", daemon=True)
            self.thread.start()
        if new:
            log.info("DNS: answering on %s", ", ".join(f"{a} ({i}, segment {s})" for s, i, a in sorted(new)))

    def abort(self) -> None:
        if self._pending is not None:
            for lst in self._pending[2]:
                lst.close()
            self._pending = None

    def stop(self) -> None:
        self.stop_event.set()
        self._wake()
        if self.thread is not None:
            self.thread.join(timeout=5)
        for lst in self.listeners.values():
            lst.close()
        self.listeners = {}
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()

    def status(self) -> dict:
        return {"listeners": [{"segment": s, "interface": i, "address": a} for s, i, a in sorted(self.listeners)],
                "queries": dict(self.counts)}

    # ----------------------------------------------------------------- loop
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _sync(self, registered: dict) -> None:
        """Register the current listeners' sockets with the selector (after a commit)."""
        with self.lock:
            current = {s.fileno(): (lst, s) for lst in self.listeners.values() for s in lst.socks}
        for fd in [fd for fd in registered if fd not in current or registered[fd] is not current[fd][1]]:
            try:
                self.sel.unregister(registered.pop(fd))
            except (KeyError, ValueError, OSError):
                registered.pop(fd, None)
        for fd, (lst, s) in current.items():
            if fd not in registered:
                self.sel.register(s, selectors.EVENT_READ, lst)
                registered[fd] = s

    def _run(self) -> None:
        registered: dict[int, socket.socket] = {}
        self._sync(registered)
        while not self.stop_event.is_set():
            for key, _ in self.sel.select(timeout=1.0):
                lst = key.data
                if lst is None:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    self._sync(registered)
                    continue
                try:
                    if key.fileobj is lst.udp:
                        data, peer = lst.udp.recvfrom(65535)
                        self._udp(lst, data, peer)
                    else:
                        conn, peer = lst.tcp.accept()
                        self._tcp_accept(lst, conn, peer)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:  # a listener closed by a commit while selected
                    log.debug("DNS socket: %s", e)

    def _udp(self, lst: Listener, data: bytes, peer) -> None:
        out = self._handle(lst.segment, data, tcp=False)
        if isinstance(out, concurrent.futures.Future):
            out.add_done_callback(lambda f: self._send(lst.udp, f.result(), peer))
        elif out is not None:
            if len(out) > 512:  # classic UDP limit without EDNS: truncate, the client retries over TCP
                rec = DNSRecord.parse(out)
                rec.rr = []
                rec.header.tc = 1
                out = rec.pack()
            self._send(lst.udp, out, peer)

    @staticmethod
    def _send(sock: socket.socket, data: Optional[bytes], peer) -> None:
        if data is None:
            return
        try:
            sock.sendto(data, peer)
        except OSError as e:
            log.debug("DNS reply to %s: %s", peer, e)

    def _tcp_accept(self, lst: Listener, conn: socket.socket, peer) -> None:
        if not self.tcp_slots.acquire(blocking=False):
            self._count(lst.segment, "tcp_busy")
            conn.close()
            return
        threading.Thread(target=self._tcp_conn, args=(lst.segment, conn), daemon=True,
                         name="bulkhead-dns-tcp").start()

    def _tcp_conn(self, segment: str, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(TCP_TIMEOUT)
            while not self.stop_event.is_set():
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                data = _recv_exact(conn, struct.unpack("!H", head)[0])
                if data is None:
                    return
                out = self._handle(segment, data, tcp=True)
                if isinstance(out, concurrent.futures.Future):
                    out = out.result()
                if out is None:
                    return
                conn.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            pass
        finally:
            conn.close()
            self.tcp_slots.release()

    def _count(self, segment: str, answer: str) -> None:
        self.counts[answer] += 1
        self.by_segment[(segment, answer)] += 1

    def _handle(self, segment: str, data: bytes, tcp: bool):
        """bytes to send, None for nothing, or a Future of either (a forwarded query)."""
        zone = self.zone
        try:
            query = DNSRecord.parse(data)
        except Exception:
            self._count(segment, "formerr")
            return _formerr(data)
        if query.header.qr or zone is None:
            self._count(segment, "ignored")
            return None
        reply = zone.answer(query, segment)
        if reply is None:
            self._count(segment, "forwarded")
            return self.pool.submit(self._forward, zone.upstream, query, data, tcp, segment)
        self._count(segment, RCODE.get(reply.header.rcode).lower())
        return reply.pack()

    def _forward(self, upstream: list[str], query: DNSRecord, data: bytes, tcp: bool, segment: str) -> bytes:
        for server in upstream:
            try:
                return query.send(server, PORT, tcp=tcp, timeout=UPSTREAM_TIMEOUT,
                                  ipv6=":" in server)
            except (OSError, socket.timeout) as e:
                log.warning("DNS upstream %s: %s", server, e)
        self._count(segment, "servfail")
        reply = query.reply()
        reply.header.aa = 0
        reply.header.rcode = RCODE.SERVFAIL
        return reply.pack()


def _recv_exact(conn: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
