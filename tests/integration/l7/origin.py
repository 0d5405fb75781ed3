#!/usr/bin/env python3
"""A real HTTP/1.1 origin server for the L7 verifier tests.

    python tests/integration/l7/origin.py --listen 127.0.0.1:8080 [--tls CERT KEY] [--log FILE]

Prints `ready HOST PORT` on stdout once it listens. Threaded (one thread per
connection), keep-alive and pipelining capable, standard library only, so it
runs in any network namespace with the system python.

It is deliberately *lenient*, like the backends request smuggling exploits: it
accepts bare LF line ends, obs-fold, Transfer-Encoding containing `chunked`
anywhere (which then wins over Content-Length), the first of several
Content-Length headers. If the verifier ever let an ambiguous request through,
this server would read the smuggled request and log it; the tests check the log.

Every request is answered with a JSON echo (unless a special path says
otherwise) and, with --log, appended as one JSON line to FILE:

    {"method", "target", "version", "headers": [[name, value], ...],
     "body_len", "body_sha256", "client": [ip, port], "tls", "sni",
     "conn": connection number, "seq": request number on that connection}

Special paths (after any query is cut off):

    /big/N        N bytes (byte i = i % 251), Content-Length framed
    /chunked/N    N bytes, chunked (pieces of 1..16 KiB), with a trailer
    /slow/MS      sleep MS milliseconds, then the echo
    /close        the echo, delimited by closing the connection (no length)
    /status/N     status N with a short body (none for 1xx/204/304)
    /bad/clte     a response with Content-Length and Transfer-Encoding (malformed)
    /bad/garbage  bytes that are not HTTP
    /bad/cut      a Content-Length response cut short by a close
    /hang         read the request, never answer (until the client goes)

A request with `Expect: 100-continue` gets `100 Continue` before its body is read.
HEAD gets the headers a GET would get, without the body.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time

MAX_HEAD = 1 << 20


def pattern(n: int, start: int = 0) -> bytes:
    """Bytes start..start+n of the deterministic /big and /chunked payload (byte i = i % 251)."""
    period = bytes(range(251))
    block = period * (65536 // 251 + 2)
    out = bytearray()
    pos = start
    end = start + n
    while pos < end:
        off = pos % 251
        take = min(end - pos, len(block) - off - 1)
        take = min(take, 65000)
        out += block[off:off + take]
        pos += take
    return bytes(out)


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < n:
        take = min(1 << 20, n - pos)
        h.update(pattern(take, pos))
        pos += take
    return h.hexdigest()


class _Closed(Exception):
    pass


class _Conn:
    def __init__(self, server: "Origin", sock: socket.socket, addr, n: int):
        self.server = server
        self.sock = sock
        self.addr = addr
        self.n = n
        self.buf = b""
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.sni = getattr(sock, "_origin_sni", None)

    def recv_more(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise _Closed()
        self.buf += data

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return line
            if len(self.buf) > MAX_HEAD:
                raise _Closed()
            self.recv_more()

    def read_exact(self, n: int, sink) -> None:
        while n > 0:
            if not self.buf:
                self.recv_more()
            take = self.buf[:n]
            self.buf = self.buf[n:]
            sink(take)
            n -= len(take)

    def read_head(self):
        line = self.read_line()
        while line in (b"\r\n", b"\n"):
            line = self.read_line()
        parts = line.strip().split(b" ")
        if len(parts) == 2:  # HTTP/0.9
            method, target, version = parts[0], parts[1], b"HTTP/0.9"
        elif len(parts) >= 3:
            method, target, version = parts[0], b" ".join(parts[1:-1]), parts[-1]
        else:
            raise _Closed()
        headers: list[list[str]] = []
        size = len(line)
        while True:
            h = self.read_line()
            size += len(h)
            if size > MAX_HEAD:
                raise _Closed()
            if h in (b"\r\n", b"\n"):
                break
            if h[:1] in (b" ", b"\t") and headers:  # obs-fold: lenient
                headers[-1][1] += " " + h.strip().decode("latin-1")
                continue
            name, _, value = h.partition(b":")
            headers.append([name.decode("latin-1"), value.strip().decode("latin-1")])
        return method.decode("latin-1"), target.decode("latin-1"), version.decode("latin-1"), headers

    def serve(self) -> None:
        seq = 0
        try:
            while True:
                try:
                    method, target, version, headers = self.read_head()
                except _Closed:
                    return
                seq += 1
                if not self.handle(method, target, version, headers, seq):
                    return
        except (OSError, _Closed, ssl.SSLError):
            return
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def handle(self, method, target, version, headers, seq) -> bool:
        low = {}
        for n, v in headers:
            low.setdefault(n.strip().lower(), []).append(v)
        te = ",".join(low.get("transfer-encoding", [])).lower()
        h = hashlib.sha256()
        size = [0]

        def eat(b):
            h.update(b)
            size[0] += len(b)

        if "100-continue" in ",".join(low.get("expect", [])).lower() and version == "HTTP/1.1":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        trailers = []
        if "chunked" in te:
            while True:
                line = self.read_line()
                size_text = line.split(b";")[0].strip()
                try:
                    n = int(size_text, 16)
                except ValueError:
                    raise _Closed()
                if n == 0:
                    while True:
                        t = self.read_line()
                        if t in (b"\r\n", b"\n"):
                            break
                        tn, _, tv = t.partition(b":")
                        trailers.append([tn.decode("latin-1"), tv.strip().decode("latin-1")])
                    break
                self.read_exact(n, eat)
                self.read_line()
        elif "content-length" in low:
            try:
                n = int(low["content-length"][0].strip())
            except ValueError:
                n = 0
            self.read_exact(max(0, n), eat)
        info = {
            "method": method, "target": target, "version": version, "headers": headers,
            "trailers": trailers, "body_len": size[0], "body_sha256": h.hexdigest(),
            "client": [self.addr[0], self.addr[1]], "tls": self.tls, "sni": self.sni,
            "conn": self.n, "seq": seq, "time": time.time(),
        }
        self.server.log(info)
        conn_hdr = ",".join(low.get("connection", [])).lower()
        keep = ("close" not in conn_hdr) if version == "HTTP/1.1" else ("keep-alive" in conn_hdr)
        path = target.split("?", 1)[0]
        if "://" in path:
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        return self.respond(method, path, info, keep)

    def send(self, status: int, body: bytes, keep: bool, head: bool, extra=(), length=True) -> None:
        lines = [f"HTTP/1.1 {status} X", "Server: bulkhead-test-origin"]
        lines += list(extra)
        if length:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: " + ("keep-alive" if keep else "close"))
        out = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.sock.sendall(out if head else out + body)

    def respond(self, method: str, path: str, info: dict, keep: bool) -> bool:
        head = method == "HEAD"
        echo = json.dumps(info).encode()
        parts = path.split("/")
        try:
            if path.startswith("/big/"):
                n = int(parts[2])
                hdr = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n"
                       f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
                self.sock.sendall(hdr)
                if not head:
                    pos = 0
                    while pos < n:
                        take = min(1 << 20, n - pos)
                        self.sock.sendall(pattern(take, pos))
                        pos += take
                return keep
            if path.startswith("/chunked/"):
                n = int(parts[2])
                hdr = (f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Origin-Trailer\r\n"
                       f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
                self.sock.sendall(hdr)
                if not head:
                    pos = 0
                    step = 1024
                    while pos < n:
                        take = min(step, n - pos)
                        self.sock.sendall(b"%x\r\n" % take + pattern(take, pos) + b"\r\n")
                        pos += take
                        step = step * 2 if step < 16384 else 1024
                    self.sock.sendall(b"0\r\nX-Origin-Trailer: done\r\n\r\n")
                return keep
            if path.startswith("/slow/"):
                time.sleep(int(parts[2]) / 1000.0)
                self.send(200, echo, keep, head, ["Content-Type: application/json"])
                return keep
            if path == "/close":
                self.send(200, echo, False, head, ["Content-Type: application/json"], length=False)
                return False
            if path.startswith("/status/"):
                status = int(parts[2])
                body = b"" if status < 200 or status in (204, 304) else f"status {status}\n".encode()
                self.send(status, body, keep, head, length=status not in (204, 304))
                return keep
            if path == "/bad/clte":
                self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                return False
            if path == "/bad/garbage":
                self.sock.sendall(b"this is not http\r\n\r\n")
                return False
            if path == "/bad/cut":
                self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
                return False
            if path == "/hang":
                while True:
                    self.recv_more()
        except (ValueError, IndexError):
            self.send(400, b"bad special path\n", keep, head)
            return keep
        self.send(200, echo, keep, head, ["Content-Type: application/json"])
        return keep


class Origin:
    """The server; usable in-process too: Origin(...).start() / .stop()."""

    def __init__(self, host: str, port: int, tls: tuple[str, str] | None = None, log_path: str | None = None):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.host, self.port = self.sock.getsockname()[:2]
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(tls[0], tls[1])

            def remember(sslsock, name, _ctx):
                sslsock._origin_sni = name

            self.ctx.sni_callback = remember
        self.log_path = log_path
        self._log_lock = threading.Lock()
        self._n = 0
        self._stop = False
        self._thread = None

    def log(self, info: dict) -> None:
        if not self.log_path:
            return
        line = json.dumps(info) + "\n"
        with self._log_lock:
            with open(self.log_path, "a") as f:
                f.write(line)

    def serve_forever(self) -> None:
        while not self._stop:
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self._stop:
                    return
                continue
            self._n += 1
            threading.Thread(target=self._handle, args=(sock, addr, self._n), daemon=True).start()

    def _handle(self, sock, addr, n) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ctx is not None:
            try:
                sock.settimeout(10)
                sock = self.ctx.wrap_socket(sock, server_side=True)
                sock.settimeout(None)
            except (OSError, ssl.SSLError):
                sock.close()
                return
        _Conn(self, sock, addr, n).serve()

    def start(self) -> "Origin":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="ADDR:PORT (port 0: any; IPv6 as [ADDR]:PORT)")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--log", help="append one JSON line per request to this file")
    a = ap.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    host = host.strip("[]")
    srv = Origin(host, int(port), tuple(a.tls) if a.tls else None, a.log)
    print(f"ready {srv.host} {srv.port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
