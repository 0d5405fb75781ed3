"""The lab's test servers: `python -m bulkhead.lab.servers NAME --tcp ADDR:PORT --udp ADDR:PORT`.

Greets each TCP connection with "hello from NAME\\n" and then echoes; UDP datagrams come back
as b"NAME: " + data; `--http` ports answer each HTTP/1.1 request with one line. Prints "ready"
once every socket listens. No http.server (its bind does a reverse DNS lookup that hangs
without DNS).
"""
from __future__ import annotations

import argparse
import ipaddress
import selectors
import signal
import socket
import sys
import threading



def _parse_addr(text: str) -> tuple[int, tuple]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    return fam, (host, int(port))


def _http_conn(name: str, c: socket.socket, peer) -> None:
    """A minimal HTTP/1.1 origin: answers every request (keep-alive) with one text line."""
    buf = b""
    with c:
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > 65536:
                        return
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target = (lines[0].split() + ["?", "?"])[:2]
                length = 0
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    if k.strip().lower() == "content-length" and v.strip().isdigit():
                        length = int(v.strip())
                while len(buf) < length:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                body = f"{name}: {method} {target} from {peer[0]}\n".encode()
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body if method != "HEAD" else b""))
        except OSError:
            return


def _serve(name: str, tcp: list[str], udp: list[str], http: list[str] = ()) -> None:
    greeting = f"hello from {name}\n".encode()
    sel = selectors.DefaultSelector()
    for kind, specs in (("accept", tcp), ("http", http)):
        for spec in specs:
            fam, addr = _parse_addr(spec)
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(128)
            sel.register(s, selectors.EVENT_READ, kind)
    for spec in udp:
        fam, addr = _parse_addr(spec)
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind(addr)
        sel.register(s, selectors.EVENT_READ, "udp")

    def conn(c: socket.socket) -> None:
        with c:
            try:
                c.sendall(greeting)
                while True:
                    data = c.recv(65536)
                    if not data:
                        return
                    c.sendall(data)
            except OSError:
                return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if key.data in ("accept", "http"):
                try:
                    c, peer = s.accept()
                except OSError:
                    continue
                if key.data == "http":
                    threading.Thread(target=_http_conn, args=(name, c, peer), daemon=True).start()
                else:
                    threading.Thread(target=conn, args=(c,), daemon=True).start()
            else:
                try:
                    data, peer = s.recvfrom(65536)
                    s.sendto(name.encode() + b": " + data, peer)
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bulkhead.lab.servers",
                                 description="greeting/echo TCP and UDP echo server (and a minimal HTTP origin)")
    ap.add_argument("name")
    ap.add_argument("--tcp", action="append", default=[], metavar="ADDR:PORT")
    ap.add_argument("--udp", action="append", default=[], metavar="ADDR:PORT")
    ap.add_argument("--http", action="append", default=[], metavar="ADDR:PORT",
                    help="a minimal HTTP/1.1 origin answering each request with one line")
    a = ap.parse_args(argv)
    _serve(a.name, a.tcp, a.udp, a.http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
