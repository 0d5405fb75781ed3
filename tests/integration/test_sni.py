"""In-kernel TLS SNI on real traffic: real TLS servers and clients in the test namespaces.

A threaded Python `ssl` server listens on 443 at every core address (198.19.0.10/.20,
fd00:19::10/::20) with a certificate of a throwaway CA for every name used here. It
records, per client (address, port), what it saw: the first byte (TLS or plain text),
the server name, whether the handshake completed. Plain text gets a plain HTTP answer,
so "not TLS on a hostname-governed port" has something to be denied.

Clients: Python `ssl` (server_hostname, TCP_MAXSEG, a long ALPN list to pass 1500
bytes), `openssl s_client`, `curl --resolve`, and ClientHellos crafted byte by byte
(Chrome-like: GREASE, an X25519MLKEM768-sized key share, SNI last) sent over a
connected socket in chosen segments, where "allowed" means the server answered with
its ServerHello.

The policy (sni_policy): payments = 198.19.0.10 + fd00:19::10 named pay.example.internal;
hostname-only apps api (api.example.internal), svc (*.svc.example.internal) and blocked
(blocked.example.internal), which can only match at .20 / ::20 (not another app's
address). web (prod) may reach payments, api, svc; web -> blocked is reject; laptops
(dev) -> payments is deny. Every test checks what the client saw, which counters moved
(status --json) and the flow's entry in `bulkhead flows --json` (and its `sni` field
when the agent reports one). Client source ports are fixed and distinct per probe, so
each flow can be found in the flow table (and prod/dev never share a 5-tuple).
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.root, pytest.mark.integration]

PAY4, PAY6 = "198.19.0.10", "fd00:19::10"
OTHER4, OTHER6 = "198.19.0.20", "fd00:19::20"  # no app's address: hostname-only apps live here
TLS_PORT = 443
CLIENT = {"prod": ("198.18.1.10", "fd00:1::10"), "dev": ("198.18.1.10", "fd00:1::10")}

DENY_WAIT = 1.2  # seconds a client waits for a handshake that should never complete
ALLOW_WAIT = 5.0  # generous: an allowed handshake takes milliseconds
REJECT_FAST = 0.5
SERVER_IDLE = 4.0  # the server gives up on a connection that sends nothing after this

CERT_NAMES = [
    "pay.example.internal", "api.example.internal", "other.example.internal",
    "blocked.example.internal", "*.svc.example.internal", "a.b.svc.example.internal",
    "svc.example.internal",
]
_SPORT = itertools.count(21000)  # distinct client source ports, one per probe
FROM_PROBE, ANY = object(), object()  # check_flow's sni expectations


# ----------------------------------------------------------------------- policy
def sni_policy(unknown_sni: str = "deny", default: str = "deny", extra_rules: tuple = (),
               pay_ports: tuple = ("tcp/443",)) -> str:
    doc = {
        "version": 1,
        "settings": {"default_action": default, "mode": "enforce", "unknown_sni": unknown_sni},
        "segments": [{"name": "prod", "interfaces": ["bh-prod"]}, {"name": "dev", "interfaces": ["bh-dev"]},
                     {"name": "core", "interfaces": ["bh-core"]}],
        "apps": [
            {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
            {"name": "laptops", "segment": "dev", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
            {"name": "payments", "segment": "core", "addresses": [f"{PAY4}/32", f"{PAY6}/128"],
             "ports": list(pay_ports), "hostnames": ["pay.example.internal"]},
            {"name": "api", "segment": "core", "ports": ["tcp/443"], "hostnames": ["api.example.internal"]},
            {"name": "svc", "segment": "core", "ports": ["tcp/443"], "hostnames": ["*.svc.example.internal"]},
            {"name": "blocked", "segment": "core", "ports": ["tcp/443"],
             "hostnames": ["blocked.example.internal"]},
        ],
        "rules": [
            {"name": "web-pay", "from": "web", "to": "payments", "action": "allow"},
            {"name": "web-api", "from": "web", "to": "api", "action": "allow"},
            {"name": "web-svc", "from": "web", "to": "svc", "action": "allow"},
            {"name": "web-blocked", "from": "web", "to": "blocked", "action": "reject"},
            {"name": "laptops-pay", "from": "laptops", "to": "payments", "action": "deny"},
            *extra_rules,
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def plain_policy() -> str:
    """No hostnames anywhere: web may reach every core server (the harness baseline)."""
    doc = {
        "version": 1,
        "settings": {"default_action": "deny"},
        "segments": [{"name": "prod", "interfaces": ["bh-prod"]}, {"name": "dev", "interfaces": ["bh-dev"]},
                     {"name": "core", "interfaces": ["bh-core"]}],
        "apps": [
            {"name": "web", "segment": "prod", "addresses": ["198.18.1.0/24", "fd00:1::/64"]},
            {"name": "servers", "segment": "core",
             "addresses": [f"{PAY4}/32", f"{OTHER4}/32", f"{PAY6}/128", f"{OTHER6}/128"]},
        ],
        "rules": [{"name": "web-servers", "from": "web", "to": "servers", "ports": ["tcp/443"]}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def norm(name: str | None) -> str | None:
    if name is None:
        return None
    n = name.lower()
    return n[:-1] if n.endswith(".") and len(n) > 1 else n


# -------------------------------------------------------------------------- PKI
@dataclass
class Pki:
    ca: str
    cert: str
    key: str


def make_pki(d: Path) -> Pki:
    """A throwaway CA and one server certificate for CERT_NAMES (subjectAltName)."""
    def run(*argv: str) -> None:
        p = subprocess.run(["openssl", *argv], capture_output=True, text=True, cwd=str(d))
        assert p.returncode == 0, f"openssl {' '.join(argv)}: {p.stderr}"

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=bulkhead test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=pay.example.internal")
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in CERT_NAMES) + "\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return Pki(str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"))


# ----------------------------------------------------------------------- server
@dataclass
class Seen:
    """What the server saw from one client connection."""

    first: str = ""  # "tls" | "plain" | "" (nothing arrived)
    sni: str | None = None
    handshake: bool = False
    error: str = ""


class TlsServer:
    """A threaded TLS (and plain-text) server on TLS_PORT at every core address, in the core netns.

    The listening sockets are made in the core namespace (Topology.socket) and served by
    threads of this process; each connection answers, after the handshake and the
    client's request (a blank line ends it), `HTTP/1.0 200` with body
    `tls <local address> sni=<server name>`; a connection whose first byte is not a TLS
    handshake record gets `plain <local address>`.
    """

    def __init__(self, topo, pki: Pki, addrs=(PAY4, OTHER4, PAY6, OTHER6), port: int = TLS_PORT):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.cert, pki.key)
        self.ctx.sni_callback = self._on_sni
        self.seen: dict[tuple[str, int], Seen] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listeners = []
        for a in addrs:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            s = topo.socket("core", fam)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a, port))
            s.listen(64)
            s.settimeout(0.2)
            self.listeners.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    @staticmethod
    def _key(peer) -> tuple[str, int]:
        return (str(ipaddress.ip_address(peer[0])), peer[1])

    def _on_sni(self, sslsock, name, ctx):
        try:
            with self.lock:
                self.seen.setdefault(self._key(sslsock.getpeername()), Seen()).sni = name
        except OSError:
            pass

    def _accept(self, ls: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                c, peer = ls.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c, peer), daemon=True).start()

    def _conn(self, c: socket.socket, peer) -> None:
        key = self._key(peer)
        with self.lock:
            rec = self.seen.setdefault(key, Seen())
        local = str(ipaddress.ip_address(c.getsockname()[0]))
        c.settimeout(SERVER_IDLE)
        tls = None
        clean = False
        try:
            first = c.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first[0] != 0x16:
                rec.first = "plain"
                _read_request(c)
                _respond(c, f"plain {local}\n")
                clean = True
                return
            rec.first = "tls"
            tls = self.ctx.wrap_socket(c, server_side=True)
            rec.handshake = True
            req = _read_request(tls)
            if req.startswith(b"ECHO"):  # a long-lived connection: echo until the client closes
                tls.settimeout(30)
                tls.sendall(req)
                while True:
                    data = tls.recv(4096)
                    if not data:
                        break
                    tls.sendall(data)
            else:
                _respond(tls, f"tls {local} sni={rec.sni}\n")
            clean = True
        except Exception as e:  # timeouts, resets, handshake failures: recorded, never raised
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            s = tls or c
            try:
                if clean and tls is not None:
                    tls.settimeout(0.5)
                    try:
                        tls.unwrap()  # close_notify: curl and s_client see a clean end
                    except (OSError, ValueError):
                        pass
                elif not clean:
                    # Abort, don't FIN: a half-open connection of a denied flow must not
                    # leave the server retransmitting into later tests' counters.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def get(self, ip: str, sport: int) -> Seen:
        with self.lock:
            return self.seen.get((str(ipaddress.ip_address(ip)), sport), Seen())

    def close(self) -> None:
        self.stopping.set()
        for s in self.listeners:
            try:
                s.close()
            except OSError:
                pass


def _read_request(s, limit: int = 65536) -> bytes:
    buf = b""
    s.settimeout(1.0)
    try:
        while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < limit:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except (socket.timeout, TimeoutError):
        pass
    return buf


def _respond(s, body: str) -> None:
    b = body.encode()
    s.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
              b"Connection: close\r\n\r\n%s" % (len(b), b))


# ---------------------------------------------------------------------- clients
@dataclass
class Probe:
    tool: str
    result: str  # connected | timeout | reset | refused | error | server_hello
    sport: int
    dst: str
    name: str | None
    reply: str = ""
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result in ("connected", "server_hello")


def _abort(s: socket.socket) -> None:
    """Close with an RST: a denied connection must not keep retransmitting into later tests."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def _failed(probe: Probe, e: BaseException) -> None:
    probe.result = _classify(e)
    probe.detail = f"{type(e).__name__}: {e}"


def _connected(probe: Probe, answer: bytes) -> None:
    """The request got through: the reply is the answer's body."""
    probe.result = "connected"
    probe.reply = answer.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()


def _finish(probe: Probe, sock, t0: float) -> Probe:
    """Time the probe; close its socket, with an RST if it did not get through."""
    probe.seconds = time.monotonic() - t0
    if probe.ok:
        sock.close()
    else:
        _abort(sock)
    return probe


def _client_socket(topo, ns: str, dst: str, sport: int, mss: int | None) -> socket.socket:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = topo.socket(ns, fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
    if mss:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    return s


def _classify(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ssl.SSLError) and "reset" in str(e).lower():
        return "reset"
    return "error"


def py_tls(topo, pki: Pki, ns: str, dst: str, name: str | None, *, timeout: float = ALLOW_WAIT,
           mss: int | None = None, alpn: list[str] | None = None, port: int = TLS_PORT) -> Probe:
    """Python ssl: connect, handshake with server_hostname=name, GET, read the answer."""
    sport = next(_SPORT)
    s = _client_socket(topo, ns, dst, sport, mss)
    s.settimeout(timeout)
    ctx = ssl.create_default_context(cafile=pki.ca)
    if name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    probe = Probe("python-ssl", "error", sport, dst, name)
    t0 = time.monotonic()
    tls = None
    try:
        s.connect((dst, port))
        tls = ctx.wrap_socket(s, server_hostname=name, do_handshake_on_connect=False)
        tls.do_handshake()
        tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
        _connected(probe, data)
    except Exception as e:
        _failed(probe, e)
    return _finish(probe, tls or s, t0)


def recut_records(flight: bytes, size: int) -> bytes:
    """A client's first flight (one handshake record) re-cut into records of `size` bytes."""
    assert flight[0] == 22 and len(flight) == 5 + int.from_bytes(flight[3:5], "big"), flight[:5]
    body = flight[5:]
    return b"".join(flight[:3] + len(body[i:i + size]).to_bytes(2, "big") + body[i:i + size]
                    for i in range(0, len(body), size))


def py_tls_records(topo, pki: Pki, ns: str, dst: str, name: str, *, record: int, timeout: float = ALLOW_WAIT,
                   port: int = TLS_PORT) -> Probe:
    """Python ssl over memory BIOs: a real handshake whose ClientHello goes out in
    TLS records of `record` bytes (legal, and what some clients and DPI-evasion tools
    send), then a GET and the answer read to the end."""
    sport = next(_SPORT)
    s = _client_socket(topo, ns, dst, sport, None)
    s.settimeout(timeout)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=pki.ca).wrap_bio(inc, out, server_hostname=name)
    probe = Probe("python-ssl-records", "error", sport, dst, name)
    t0 = time.monotonic()

    def pump() -> None:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed")
        inc.write(chunk)

    try:
        s.connect((dst, port))
        first = True
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            flight = out.read()
            if flight:
                s.sendall(recut_records(flight, record) if first else flight)
                first = False
            if done:
                break
            pump()
        tls.write(b"GET / HTTP/1.0\r\n\r\n")
        s.sendall(out.read())
        data = b""
        while True:
            try:
                chunk = tls.read(4096)
            except ssl.SSLWantReadError:
                try:
                    pump()
                except ConnectionResetError:
                    break
                continue
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            data += chunk
        _connected(probe, data)
    except Exception as e:
        _failed(probe, e)
    return _finish(probe, s, t0)


def _bind_addr(ns: str, dst: str) -> str:
    v4, v6 = CLIENT[ns]
    return f"[{v6}]" if ":" in dst else v4


def _hostport(dst: str, port: int) -> str:
    return f"[{dst}]:{port}" if ":" in dst else f"{dst}:{port}"


def s_client(topo, pki: Pki, ns: str, dst: str, name: str | None, *, timeout: float = ALLOW_WAIT,
             extra: list[str] = (), port: int = TLS_PORT) -> Probe:
    """openssl s_client with -servername NAME (or -noservername), a GET, the answer read to the end."""
    sport = next(_SPORT)
    argv = ["timeout", "-s", "KILL", str(timeout), "openssl", "s_client", "-connect", _hostport(dst, port),
            "-bind", f"{_bind_addr(ns, dst)}:{sport}", "-CAfile", pki.ca, "-verify_return_error",
            "-ign_eof", "-brief", *extra]
    argv += ["-servername", name] if name is not None else ["-noservername"]
    probe = Probe("openssl", "error", sport, dst, name)
    t0 = time.monotonic()
    p = topo.run(ns, argv, check=False, input="GET / HTTP/1.0\r\n\r\n", timeout=timeout + 10)
    probe.seconds = time.monotonic() - t0
    out = p.stdout
    probe.detail = f"rc={p.returncode} stderr={p.stderr.strip()[-600:]}"
    if "tls " in out and "sni=" in out:
        probe.result = "connected"
        probe.reply = out[out.index("tls "):].strip()
    elif p.returncode in (-9, 137, 124):
        probe.result = "timeout"
    elif "errno=104" in p.stderr or "reset" in p.stderr.lower():
        probe.result = "reset"
    return probe


def curl(topo, pki: Pki, ns: str, dst: str, name: str, *, timeout: float = ALLOW_WAIT,
         port: int = TLS_PORT) -> Probe:
    """curl --resolve NAME:443:ADDR https://NAME/ with the test CA."""
    sport = next(_SPORT)
    addr = f"[{dst}]" if ":" in dst else dst
    argv = ["curl", "-sS", "--max-time", str(timeout), "--resolve", f"{name}:{port}:{addr}",
            "--cacert", pki.ca, "--local-port", str(sport), f"https://{name}:{port}/"]
    probe = Probe("curl", "error", sport, dst, name)
    t0 = time.monotonic()
    p = topo.run(ns, argv, check=False, timeout=timeout + 10)
    probe.seconds = time.monotonic() - t0
    probe.detail = f"rc={p.returncode} stderr={p.stderr.strip()[-600:]}"
    if p.returncode == 0:
        probe.result, probe.reply = "connected", p.stdout.strip()
    elif p.returncode == 28:
        probe.result = "timeout"
    elif p.returncode in (35, 56) and "reset" in p.stderr.lower():
        probe.result = "reset"
    return probe


# ------------------------------------------------------ crafted ClientHellos
def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _v8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _v16(b: bytes) -> bytes:
    return _u16(len(b)) + b


def _ext(etype: int, body: bytes) -> bytes:
    return _u16(etype) + _v16(body)


def client_hello(name: str | bytes | None, *, sni_at: str = "last", mlkem: bool = True, pad: int = 0,
                 second_sni: str | None = None) -> bytes:
    """A Chrome-like TLS 1.3 ClientHello: GREASE, X25519MLKEM768 + X25519 key shares.

    The server (OpenSSL 3.0) does not know X25519MLKEM768 and answers with an X25519
    ServerHello, as it would to Chrome. sni_at: first | middle | last; pad adds a
    padding extension (21) of that many bytes before the SNI.
    """
    exts = [
        _ext(0x0A0A, b""),  # GREASE
        _ext(0x002B, _v8(_u16(0x1A1A) + _u16(0x0304) + _u16(0x0303))),  # supported_versions
        _ext(0x000A, _v16(b"".join(_u16(g) for g in ([0x11EC] if mlkem else []) + [0x001D, 0x0017]))),
        _ext(0x0033, _v16((_u16(0x11EC) + _v16(os.urandom(1216)) if mlkem else b"")
                          + _u16(0x001D) + _v16(os.urandom(32)))),  # key_share
        _ext(0x000D, _v16(b"".join(_u16(a) for a in (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501,
                                                     0x0806, 0x0601)))),  # signature_algorithms
        _ext(0x000B, _v8(b"\x00")),  # ec_point_formats
        _ext(0x002D, _v8(b"\x01")),  # psk_key_exchange_modes
        _ext(0x0010, _v16(_v8(b"http/1.1"))),  # ALPN
        _ext(0x0017, b""),  # extended_master_secret
        _ext(0xFF01, b"\x00"),  # renegotiation_info
        _ext(0x0023, b""),  # session_ticket
        _ext(0x0005, b"\x01\x00\x00\x00\x00"),  # status_request
        _ext(0x0012, b""),  # signed_certificate_timestamp
        _ext(0x001B, _v8(_u16(0x0002))),  # compress_certificate: brotli
        _ext(0x44CD, _v16(_v8(b"h2"))),  # application_settings
        # encrypted_client_hello, GREASE form: outer, HPKE suite, config id, enc, payload
        _ext(0xFE0D, b"\x00" + _u16(0x0001) + _u16(0x0001) + bytes([os.urandom(1)[0]])
             + _v16(os.urandom(32)) + _v16(os.urandom(208))),
    ]
    if pad:
        exts.append(_ext(0x0015, bytes(pad)))
    if name is not None:
        raw = name.encode() if isinstance(name, str) else name
        sni = _ext(0x0000, _v16(b"\x00" + _v16(raw)))
        exts.insert({"first": 0, "middle": len(exts) // 2, "last": len(exts)}[sni_at], sni)
    if second_sni is not None:  # a second server_name extension: malformed (RFC 8446 4.2)
        exts.append(_ext(0x0000, _v16(b"\x00" + _v16(second_sni.encode()))))
    exts.append(_ext(0x3A3A, b"\x00"))  # trailing GREASE, as Chrome does
    ciphers = b"".join(_u16(c) for c in (0x2A2A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030))
    body = _u16(0x0303) + os.urandom(32) + _v8(os.urandom(32)) + _v16(ciphers) + _v8(b"\x00") + _v16(b"".join(exts))
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _v16(hs)


def raw_hello(topo, ns: str, dst: str, hello: bytes, *, cuts: tuple[int, ...] = (), mss: int | None = None,
              timeout: float = ALLOW_WAIT, name: str | None = None, port: int = TLS_PORT) -> Probe:
    """Send `hello` over a connected socket, as one write or in segments ending at `cuts`.

    TCP_NODELAY and a short pause between writes make each piece its own segment.
    result: server_hello when the server answers with a TLS handshake record holding a
    ServerHello, timeout, reset, or error (another answer, in detail).
    """
    sport = next(_SPORT)
    s = _client_socket(topo, ns, dst, sport, mss)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(timeout)
    probe = Probe("raw", "error", sport, dst, name)
    t0 = time.monotonic()
    try:
        s.connect((dst, port))
        last = 0
        for c in (*cuts, len(hello)):
            s.sendall(hello[last:c])
            last = c
            if c != len(hello):
                time.sleep(0.01)
        data = b""
        while len(data) < 6:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if len(data) >= 6 and data[0] == 0x16 and data[5] == 0x02:
            probe.result = "server_hello"
        else:
            probe.detail = f"answer {data[:16].hex()}"
    except Exception as e:
        _failed(probe, e)
    probe.seconds = time.monotonic() - t0
    _abort(s)
    return probe


def raw_plain(topo, ns: str, dst: str, *, timeout: float = ALLOW_WAIT, port: int = TLS_PORT) -> Probe:
    """Plain HTTP (not TLS) to the TLS port; the server answers `plain ...` to plain text."""
    sport = next(_SPORT)
    s = _client_socket(topo, ns, dst, sport, None)
    s.settimeout(timeout)
    probe = Probe("plain", "error", sport, dst, None)
    t0 = time.monotonic()
    try:
        s.connect((dst, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: pay.example.internal\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        _connected(probe, data)
    except Exception as e:
        _failed(probe, e)
    return _finish(probe, s, t0)


# ---------------------------------------------------------------------- fixture
class Sni:
    """The module's TLS server, PKI and agent, plus probes that also check the flow table."""

    def __init__(self, gateway, pki: Pki, server: TlsServer):
        self.gw = gateway
        self.topo = gateway.topo
        self.pki = pki
        self.server = server

    # policy
    def apply_text(self, text: str) -> int:
        path = self.gw.write(text)
        p = self.gw.agent.apply(path)
        assert p.returncode == 0, f"apply failed ({p.returncode}): {p.stdout}{p.stderr}\n{text}"
        return int(p.stdout.split()[-1])

    def apply(self, **kw) -> int:
        return self.apply_text(sni_policy(**kw))

    # measurements
    def snapshot(self) -> dict[str, int]:
        st = self.gw.agent.status()
        out = {k: v["packets"] for k, v in st["counters"].items()}
        out.update({f"ev:{k}": v for k, v in st.get("events", {}).items()})
        return out

    def flows(self) -> list[dict]:
        p = self.gw.agent.cli("flows", "--table", "--json", "--limit", "100000")
        assert p.returncode == 0, p.stderr
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

    def flow(self, ns: str, probe: Probe, port: int = TLS_PORT) -> dict | None:
        dst = ipaddress.ip_address(probe.dst)
        for f in self.flows():
            if (f["direction"] == "forward" and f["segment"] == ns and f["proto"] == "tcp"
                    and f["sport"] == probe.sport and f["dport"] == port
                    and ipaddress.ip_address(f["dst"]) == dst):
                return f
        return None

    def check_flow(self, ns: str, probe: Probe, reason: str, rule: str | None = None,
                   dst_app: str | None = None, sni: str | None | object = FROM_PROBE,
                   port: int = TLS_PORT) -> dict:
        """The probe's forward entry in `bulkhead flows --json` has `reason` (and rule, app).

        sni: the name the flow's `sni` field must show (FROM_PROBE: the name the client
        sent; None: no name; ANY: not checked). Checked only where flows report `sni`.
        """
        f = self.gw.wait_for(lambda: self.flow(ns, probe, port), timeout=2.0)
        assert f, f"no forward flow for {probe} in bulkhead flows"
        assert f["reason"] == reason, (f, probe)
        if rule is not None:
            assert f["rule"] == rule, (f, probe)
        if dst_app is not None:
            assert f["dst_app"] == dst_app, (f, probe)
        want = probe.name if sni is FROM_PROBE else sni
        if "sni" in f and want is None:
            assert not f["sni"], (f, probe)
        elif "sni" in f and want is not ANY:
            shown = f["sni"]
            if shown.endswith("\u2026"):  # a long name, shown truncated: compare what fits
                n = len(shown) - 2  # the last shown byte may be a placeholder of the log
                assert norm(want)[:n] == shown[:n].lower(), (f, probe)
            else:
                assert norm(shown) == norm(want), (f, probe)
        return f

    # expectations
    def allowed(self, probe: Probe) -> Probe:
        assert probe.result in ("connected", "server_hello"), probe
        if probe.result == "connected":
            assert probe.reply.startswith(("tls ", "plain ")), probe
            if probe.name is not None and probe.reply.startswith("tls "):
                assert norm(probe.reply.split("sni=", 1)[1]) == norm(probe.name), probe
            ip = CLIENT["prod"][1 if ":" in probe.dst else 0]
            assert self.server.get(ip, probe.sport).first in ("tls", "plain"), probe
        return probe

    def reap(self, ns: str, probe: Probe) -> None:
        """Abort both ends of a connection the gateway cut (ss -K sends each end an RST).

        Otherwise the client's kernel keeps retransmitting its ClientHello (openssl and
        curl leave orphaned sockets when killed) and the server gives up seconds later:
        packets of this flow would be counted in later tests' counter deltas.
        """
        for where, sel in ((ns, "sport"), ("core", "dport")):
            self.topo.run(where, ["ss", "-K", "-tn", sel, "=", f":{probe.sport}"], check=False)

    def denied(self, probe: Probe, ns: str = "prod") -> Probe:
        self.reap(ns, probe)
        assert probe.result == "timeout", probe
        ip = CLIENT["prod"][1 if ":" in probe.dst else 0]
        seen = self.server.get(ip, probe.sport)
        assert not seen.handshake, (probe, seen)
        return probe

    def rejected(self, probe: Probe, ns: str = "prod") -> Probe:
        self.reap(ns, probe)
        assert probe.result == "reset", probe
        assert probe.seconds < REJECT_FAST, probe
        ip = CLIENT["prod"][1 if ":" in probe.dst else 0]
        assert not self.server.get(ip, probe.sport).handshake, probe
        return probe

    # clients
    def py(self, ns, dst, name, **kw) -> Probe:
        return py_tls(self.topo, self.pki, ns, dst, name, **kw)

    def py_records(self, ns, dst, name, **kw) -> Probe:
        return py_tls_records(self.topo, self.pki, ns, dst, name, **kw)

    def openssl(self, ns, dst, name, **kw) -> Probe:
        return s_client(self.topo, self.pki, ns, dst, name, **kw)

    def curl(self, ns, dst, name, **kw) -> Probe:
        return curl(self.topo, self.pki, ns, dst, name, **kw)

    def raw(self, ns, dst, hello, **kw) -> Probe:
        return raw_hello(self.topo, ns, dst, hello, **kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(topo, pki):
    srv = TlsServer(topo, pki)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def sni(gateway, pki, tls_server):
    return Sni(gateway, pki, tls_server)


def moved(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# ------------------------------------------------------------------------ tests
def test_harness_baseline_without_hostnames(sni):
    """Without hostnames every client stack and name completes: denials below are bulkhead's."""
    sni.apply_text(plain_policy())
    before = sni.snapshot()
    for dst, name in ((PAY4, "pay.example.internal"), (OTHER4, "api.example.internal"),
                      (PAY6, "a.b.svc.example.internal"), (OTHER6, "blocked.example.internal")):
        sni.allowed(sni.py("prod", dst, name))
        sni.allowed(sni.openssl("prod", dst, name))
        sni.allowed(sni.curl("prod", dst, name))
    sni.allowed(sni.py("prod", PAY4, "PAY.EXAMPLE.INTERNAL"))
    sni.allowed(sni.openssl("prod", PAY4, "pay.example.internal."))
    sni.allowed(sni.raw("prod", OTHER4, client_hello("other.example.internal"), name="other.example.internal"))
    sni.allowed(sni.raw("prod", OTHER4, client_hello(None)))
    p = sni.allowed(sni.py("prod", PAY4, None))
    assert p.reply.endswith("sni=None"), p
    p = sni.allowed(raw_plain(sni.topo, "prod", PAY4))
    assert p.reply == f"plain {PAY4}", p
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) > 0 and d.get("allow_reply", 0) > 0, d
    assert not {k for k in d if k.startswith("sni_")}, d


def test_allowed_name_completes_handshake_and_exchanges_data(sni):
    sni.apply()
    before = sni.snapshot()
    p = sni.allowed(sni.py("prod", PAY4, "pay.example.internal"))
    assert p.reply == f"tls {PAY4} sni=pay.example.internal", p
    sni.check_flow("prod", p, "allow_rule", rule="web-pay", dst_app="payments")
    o = sni.allowed(sni.openssl("prod", PAY4, "pay.example.internal"))
    sni.check_flow("prod", o, "allow_rule", rule="web-pay", dst_app="payments")
    c = sni.allowed(sni.curl("prod", PAY4, "pay.example.internal"))
    assert c.reply == f"tls {PAY4} sni=pay.example.internal", c
    sni.check_flow("prod", c, "allow_rule", rule="web-pay", dst_app="payments")
    d = moved(before, sni.snapshot())
    assert d.get("sni_pending", 0) >= 3 * 3, d  # SYN, SYN-ACK, ACK of each connection
    assert d.get("allow_rule", 0) >= 3 * 2, d  # ClientHello, request, ... of each
    assert d.get("allow_reply", 0) >= 3 * 2, d
    assert d.get("ev:sni_decided", 0) >= 3, d
    assert not {"sni_unknown", "sni_hold", "sni_out_of_order", "punt_no_handler"} & set(d), d


def test_clienthello_in_several_tls_records(sni):
    """A real handshake whose ClientHello comes in 100-byte TLS records is decided
    by its name in the kernel, record by record: allowed, it completes and
    exchanges data; denied, the server never handshakes."""
    sni.apply()
    before = sni.snapshot()
    p = sni.allowed(sni.py_records("prod", PAY4, "pay.example.internal", record=100))
    assert p.reply == f"tls {PAY4} sni=pay.example.internal", p
    sni.check_flow("prod", p, "allow_rule", rule="web-pay", dst_app="payments")
    q = sni.denied(sni.py_records("dev", PAY4, "pay.example.internal", record=100, timeout=DENY_WAIT), "dev")
    sni.check_flow("dev", q, "deny_rule", rule="laptops-pay")
    d = moved(before, sni.snapshot())
    assert d.get("ev:sni_decided", 0) >= 2, d
    assert not {"sni_unknown", "sni_out_of_order", "punt_no_handler"} & set(d), d


def test_denied_name_fails_and_server_never_handshakes(sni):
    sni.apply()
    before = sni.snapshot()
    # laptops -> payments is a deny rule: decided on the ClientHello
    p = sni.denied(sni.py("dev", PAY4, "pay.example.internal", timeout=DENY_WAIT), "dev")
    sni.check_flow("dev", p, "deny_rule", rule="laptops-pay")
    o = sni.denied(sni.openssl("dev", PAY4, "pay.example.internal", timeout=DENY_WAIT), "dev")
    sni.check_flow("dev", o, "deny_rule", rule="laptops-pay")
    d = moved(before, sni.snapshot())
    assert d.get("deny_rule", 0) >= 2, d
    assert d.get("sni_pending", 0) >= 2 * 3, d  # the handshakes passed
    assert "allow_rule" not in d, d
    # the same name from prod is allowed: the rule, not the name, denied it
    sni.allowed(sni.py("prod", PAY4, "pay.example.internal"))


def test_same_address_two_names_two_verdicts(sni):
    sni.apply()
    # .20 is no app's address: the hostname-only apps decide by name
    before = sni.snapshot()
    ok = sni.allowed(sni.py("prod", OTHER4, "api.example.internal"))
    assert ok.reply == f"tls {OTHER4} sni=api.example.internal", ok
    sni.check_flow("prod", ok, "allow_rule", rule="web-api", dst_app="api")
    no = sni.denied(sni.py("prod", OTHER4, "other.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", no, "deny_default")
    rej = sni.rejected(sni.py("prod", OTHER4, "blocked.example.internal", timeout=2.0))
    sni.check_flow("prod", rej, "reject_rule", rule="web-blocked")
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) >= 2 and d.get("deny_default", 0) >= 1 and d.get("reject_rule", 0) >= 1, d
    # reject by name resets both ends: the server (its ClientHello segment becomes a RST),
    # then the client (its retransmission is answered with a RST)
    assert d.get("ev:reset_onward", 0) >= 1 and d.get("ev:reject_tcp_rst", 0) >= 1, d

    # .10 is payments' address: both address and name must match
    before = sni.snapshot()
    ok = sni.allowed(sni.curl("prod", PAY4, "pay.example.internal"))
    api_at_pay = sni.denied(sni.py("prod", PAY4, "api.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", api_at_pay, "deny_default")
    # ... and pay.example.internal anywhere but payments' address is not payments
    pay_elsewhere = sni.denied(sni.py("prod", OTHER4, "pay.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", pay_elsewhere, "deny_default")
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) >= 2 and d.get("deny_default", 0) >= 2, d
    assert ok.reply.endswith("sni=pay.example.internal"), ok


def test_wildcard_matches_exactly_one_label(sni):
    sni.apply()
    before = sni.snapshot()
    ok = sni.allowed(sni.py("prod", OTHER4, "a.svc.example.internal"))
    sni.check_flow("prod", ok, "allow_rule", rule="web-svc", dst_app="svc")
    ok2 = sni.allowed(sni.openssl("prod", OTHER4, "x-9.svc.example.internal"))
    sni.check_flow("prod", ok2, "allow_rule", rule="web-svc", dst_app="svc")
    two = sni.denied(sni.py("prod", OTHER4, "a.b.svc.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", two, "deny_default")
    bare = sni.denied(sni.py("prod", OTHER4, "svc.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", bare, "deny_default")
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) >= 4 and d.get("deny_default", 0) >= 2, d


def test_uppercase_and_trailing_dot(sni):
    sni.apply()
    before = sni.snapshot()
    # openssl sends -servername byte for byte; the server reports what arrived
    up = sni.allowed(sni.openssl("prod", PAY4, "PAY.Example.INTERNAL"))
    assert up.reply.endswith("sni=PAY.Example.INTERNAL") or up.reply.endswith("sni=pay.example.internal"), up
    sni.check_flow("prod", up, "allow_rule", rule="web-pay")
    dot = sni.allowed(sni.openssl("prod", PAY4, "pay.example.internal."))
    sni.check_flow("prod", dot, "allow_rule", rule="web-pay")
    # crafted: exact bytes on the wire, whatever the client libraries normalize
    for name in ("API.EXAMPLE.INTERNAL", "api.example.internal.", "A.SVC.Example.Internal."):
        p = sni.allowed(sni.raw("prod", OTHER4, client_hello(name), name=name))
        sni.check_flow("prod", p, "allow_rule")
    rej = sni.rejected(sni.raw("prod", OTHER4, client_hello("BLOCKED.EXAMPLE.INTERNAL."), timeout=2.0,
                               name="BLOCKED.EXAMPLE.INTERNAL."))
    sni.check_flow("prod", rej, "reject_rule", rule="web-blocked")
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) >= 5 and d.get("reject_rule", 0) >= 1, d
    assert "sni_unknown" not in d, d


@pytest.mark.parametrize("dst", [PAY4, PAY6], ids=["ipv4", "ipv6"])
def test_small_mss_splits_clienthello(sni, dst):
    """TCP_MAXSEG 200: the ClientHello spans several segments, decided on the last."""
    sni.apply()
    before = sni.snapshot()
    ok = sni.allowed(sni.py("prod", dst, "pay.example.internal", mss=200))
    sni.check_flow("prod", ok, "allow_rule", rule="web-pay")
    mid = sni.snapshot()
    d = moved(before, mid)
    assert d.get("ev:sni_segment", 0) >= 2, d  # more than one ClientHello segment parsed
    assert d.get("ev:sni_decided", 0) >= 1 and d.get("allow_rule", 0) >= 1, d
    no = sni.denied(sni.py("dev", dst, "pay.example.internal", mss=200, timeout=DENY_WAIT), "dev")
    sni.check_flow("dev", no, "deny_rule", rule="laptops-pay")
    d = moved(mid, sni.snapshot())
    assert d.get("ev:sni_segment", 0) >= 2 and d.get("deny_rule", 0) >= 1, d
    assert "allow_rule" not in d, d


def test_crafted_clienthello_split_inside_fields(sni):
    """Segments cut inside the record header, the SNI extension header and the name itself."""
    sni.apply()
    name = "deep-label-" + "x" * 40 + ".svc.example.internal"
    hello = client_hello(name, mlkem=False)
    at = hello.index(name.encode())
    cuts = (3, 60, at - 3, at + 7, at + 30)
    before = sni.snapshot()
    ok = sni.allowed(sni.raw("prod", OTHER4, hello, cuts=cuts, name=name))
    sni.check_flow("prod", ok, "allow_rule", rule="web-svc", dst_app="svc")
    bad = "deep-label-" + "x" * 40 + ".svc.example.internal.evil"
    hello2 = client_hello(bad, mlkem=False)
    at2 = hello2.index(bad.encode())
    no = sni.denied(sni.raw("prod", OTHER4, hello2, cuts=(3, at2 + 5, at2 + 52), name=bad, timeout=DENY_WAIT))
    sni.check_flow("prod", no, "deny_default")
    d = moved(before, sni.snapshot())
    assert d.get("ev:sni_segment", 0) >= 6 + 4, d
    assert d.get("allow_rule", 0) >= 1 and d.get("deny_default", 0) >= 1, d
    assert "sni_out_of_order" not in d, d


@pytest.mark.parametrize("dst", [OTHER4, OTHER6], ids=["ipv4", "ipv6"])
def test_clienthello_past_1500_bytes(sni, dst):
    """Big ClientHellos in two segments: Chrome-like (ML-KEM key share, SNI last, in the
    second segment), and real clients padded by a long ALPN list."""
    sni.apply()
    before = sni.snapshot()
    hello = client_hello("api.example.internal", sni_at="last")
    assert len(hello) > 1500 and hello.index(b"api.example.internal") > 1500
    ok = sni.allowed(sni.raw("prod", dst, hello, name="api.example.internal"))
    sni.check_flow("prod", ok, "allow_rule", rule="web-api", dst_app="api")
    no = sni.denied(sni.raw("prod", dst, client_hello("other.example.internal", sni_at="last"),
                            name="other.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", no, "deny_default")
    alpn = [f"proto-{i:03d}" for i in range(180)]  # ~1.8 KB of ALPN: the hello passes 1500 bytes
    ok2 = sni.allowed(sni.py("prod", dst, "a.svc.example.internal", alpn=alpn))
    sni.check_flow("prod", ok2, "allow_rule", rule="web-svc")
    no2 = sni.denied(sni.py("prod", dst, "x.other.example.internal", alpn=alpn, timeout=DENY_WAIT))
    sni.check_flow("prod", no2, "deny_default")
    ok3 = sni.allowed(sni.openssl("prod", dst, "api.example.internal", extra=["-alpn", ",".join(alpn)]))
    sni.check_flow("prod", ok3, "allow_rule", rule="web-api")
    d = moved(before, sni.snapshot())
    assert d.get("ev:sni_segment", 0) >= 2 * 5, d
    assert d.get("allow_rule", 0) >= 3 and d.get("deny_default", 0) >= 2, d
    assert "sni_unknown" not in d and "sni_out_of_order" not in d, d


def test_sni_position_first_middle_last(sni):
    sni.apply()
    before = sni.snapshot()
    for where in ("first", "middle", "last"):
        p = sni.allowed(sni.raw("prod", OTHER4, client_hello("api.example.internal", sni_at=where),
                                name="api.example.internal"))
        sni.check_flow("prod", p, "allow_rule", rule="web-api")
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) >= 3, d


def test_no_sni_is_unknown_sni(sni):
    sni.apply()
    before = sni.snapshot()
    p = sni.denied(sni.py("prod", PAY4, None, timeout=DENY_WAIT))
    sni.check_flow("prod", p, "sni_unknown")
    o = sni.denied(sni.openssl("prod", PAY4, None, timeout=DENY_WAIT))
    sni.check_flow("prod", o, "sni_unknown")
    r = sni.denied(sni.raw("prod", OTHER4, client_hello(None), timeout=DENY_WAIT))
    sni.check_flow("prod", r, "sni_unknown")
    # malformed: two server_name extensions (each name alone would be allowed)
    m = sni.denied(sni.raw("prod", OTHER4, client_hello("api.example.internal", second_sni="api.example.internal"),
                           timeout=DENY_WAIT))
    sni.check_flow("prod", m, "sni_unknown", sni=ANY)  # the first name may be shown
    d = moved(before, sni.snapshot())
    assert d.get("sni_unknown", 0) >= 4, d
    assert "allow_rule" not in d and "sni_unknown_allow" not in d, d

    sni.apply(unknown_sni="allow")
    before = sni.snapshot()
    p = sni.allowed(sni.py("prod", PAY4, None))
    assert p.reply == f"tls {PAY4} sni=None", p
    sni.check_flow("prod", p, "sni_unknown_allow")
    o = sni.allowed(sni.openssl("prod", PAY4, None))
    sni.check_flow("prod", o, "sni_unknown_allow")
    d = moved(before, sni.snapshot())
    assert d.get("sni_unknown_allow", 0) >= 2, d
    assert "sni_unknown" not in d, d
    # a name still decides by name: unknown_sni is only for flows without one
    sni.denied(sni.py("prod", OTHER4, "other.example.internal", timeout=DENY_WAIT))


def test_plain_http_on_governed_port_is_unknown_sni(sni):
    sni.apply()
    before = sni.snapshot()
    p = raw_plain(sni.topo, "prod", PAY4, timeout=DENY_WAIT)
    sni.reap("prod", p)
    assert p.result == "timeout", p
    assert sni.server.get(CLIENT["prod"][0], p.sport).first == "", p  # nothing reached the server
    sni.check_flow("prod", p, "sni_unknown")
    d = moved(before, sni.snapshot())
    assert d.get("sni_unknown", 0) >= 1 and "allow_rule" not in d, d

    sni.apply(unknown_sni="allow")
    p = sni.allowed(raw_plain(sni.topo, "prod", PAY4))
    assert p.reply == f"plain {PAY4}", p
    sni.check_flow("prod", p, "sni_unknown_allow")


def test_ipv6_names(sni):
    sni.apply()
    before = sni.snapshot()
    p = sni.allowed(sni.py("prod", PAY6, "pay.example.internal"))
    assert p.reply == f"tls {PAY6} sni=pay.example.internal", p
    sni.check_flow("prod", p, "allow_rule", rule="web-pay", dst_app="payments")
    c = sni.allowed(sni.curl("prod", OTHER6, "api.example.internal"))
    sni.check_flow("prod", c, "allow_rule", rule="web-api", dst_app="api")
    o = sni.allowed(sni.openssl("prod", OTHER6, "b.svc.example.internal"))
    sni.check_flow("prod", o, "allow_rule", rule="web-svc")
    no = sni.denied(sni.py("dev", PAY6, "pay.example.internal", timeout=DENY_WAIT), "dev")
    sni.check_flow("dev", no, "deny_rule", rule="laptops-pay")
    dflt = sni.denied(sni.py("prod", OTHER6, "other.example.internal", timeout=DENY_WAIT))
    sni.check_flow("prod", dflt, "deny_default")
    rej = sni.rejected(sni.py("prod", OTHER6, "blocked.example.internal", timeout=2.0))
    sni.check_flow("prod", rej, "reject_rule", rule="web-blocked")
    d = moved(before, sni.snapshot())
    assert d.get("allow_rule", 0) >= 6, d
    assert d.get("deny_rule", 0) >= 1 and d.get("deny_default", 0) >= 1 and d.get("reject_rule", 0) >= 1, d


def test_server_payload_held_until_the_verdict(sni):
    """A server that speaks first (the topology's greeting server on 8443, governed by
    payments' hostnames here): its greeting is held until the client's first payload
    decides the flow, so nothing reaches an undecided client."""
    topo = sni.topo
    extra = {"pay_ports": ("tcp/443", "tcp/8443")}
    for unknown, reason in (("deny", "sni_unknown"), ("allow", "sni_unknown_allow")):
        sni.apply(unknown_sni=unknown, **extra)
        before = sni.snapshot()
        sport = next(_SPORT)
        probe = Probe("greeting", "error", sport, PAY4, None)
        s = _client_socket(topo, "prod", PAY4, sport, None)
        try:
            s.settimeout(2.0)
            s.connect((PAY4, 8443))
            s.settimeout(0.8)
            with pytest.raises((socket.timeout, TimeoutError)):
                s.recv(100)  # the greeting was sent at once, and held
            s.sendall(b"plain\n")  # not TLS: unknown_sni decides
            s.settimeout(DENY_WAIT if unknown == "deny" else ALLOW_WAIT)
            got = b""
            try:
                while not got.endswith(b"plain\n"):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    got += chunk
            except (socket.timeout, TimeoutError):
                pass
        finally:
            _abort(s)
            sni.reap("prod", probe)
        if unknown == "deny":
            assert got == b"", got
        else:
            assert got == b"hello from payments\nplain\n", got
        sni.check_flow("prod", probe, reason, port=8443)
        d = moved(before, sni.snapshot())
        assert d.get("sni_hold", 0) >= 1 and d.get(reason, 0) >= 1, d
        assert d.get("sni_pending", 0) >= 3, d


def test_policy_swap_redecides_an_established_tls_flow(sni):
    """An allowed TLS connection stays open across applies: a new deny on its name cuts it
    (re-decided from the name parsed before), and allowing again lets it go on."""
    sni.apply()
    sport = next(_SPORT)
    probe = Probe("python-ssl", "error", sport, PAY4, "pay.example.internal")
    s = _client_socket(sni.topo, "prod", PAY4, sport, None)
    s.settimeout(ALLOW_WAIT)
    s.connect((PAY4, TLS_PORT))
    tls = ssl.create_default_context(cafile=sni.pki.ca).wrap_socket(s, server_hostname="pay.example.internal")
    try:
        tls.sendall(b"ECHO\n\n")
        assert _recv_n(tls, 6) == b"ECHO\n\n"
        tls.sendall(b"one\n")
        assert _recv_n(tls, 4) == b"one\n"
        sni.check_flow("prod", probe, "allow_rule", rule="web-pay")

        sni.apply(extra_rules=({"name": "web-pay-deny", "from": "web", "to": "payments", "action": "deny"},))
        before = sni.snapshot()
        tls.settimeout(DENY_WAIT)
        tls.sendall(b"two\n")
        with pytest.raises((socket.timeout, TimeoutError)):
            tls.recv(100)
        sni.check_flow("prod", probe, "deny_rule", rule="web-pay-deny")
        d = moved(before, sni.snapshot())
        assert d.get("deny_rule", 0) >= 1, d

        sni.apply()  # allowed again: the retransmitted record passes, the echo comes back
        tls.settimeout(ALLOW_WAIT)
        assert _recv_n(tls, 4) == b"two\n"
        sni.check_flow("prod", probe, "allow_rule", rule="web-pay")
    finally:
        _abort(tls)
        sni.reap("prod", probe)


def _recv_n(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


# ------------------------------------------------------------ the fabric: domain fronting
FRONT_POOLS = ["198.19.255.0/24", "fd00:ff::/120"]


def fronting_policy() -> str:
    """sni_policy with payments published (its hostnames resolve to a service address) and the
    default allow: through the service address only payments' own names pass."""
    doc = yaml.safe_load(sni_policy(default="allow"))
    doc["fabric"] = {"service_addresses": FRONT_POOLS}
    for app in doc["apps"]:
        if app["name"] == "payments":
            app["publish"] = True
    return yaml.safe_dump(doc, sort_keys=False)


def payments_vips(text: str) -> list[str]:
    """payments' service addresses, as the agent allocates them (placed by name: a first compile
    gives the running allocation when no earlier one exists)."""
    from bulkhead.policy import load_policy

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bh-fronting-{os.getpid()}.yaml"
    path.write_text(text)
    try:
        return load_policy([str(path)])[0].vips["payments"]
    finally:
        path.unlink()


def test_domain_fronting_through_a_service_address_is_denied_and_counted(sni):
    """Through payments' service address (translated to 198.19.0.10 in the kernel) a ClientHello
    naming pay.example.internal completes; one naming api.example.internal (another app's name)
    is refused as sni_fronting although the default allows it, which it does to the real address."""
    text = fronting_policy()
    sni.apply_text(text)
    vips = payments_vips(text)
    for vip in vips:
        before = sni.snapshot()
        ok = sni.allowed(sni.py("prod", vip, "pay.example.internal"))
        assert ok.reply == f"tls {PAY4 if ':' not in vip else PAY6} sni=pay.example.internal", ok
        front = sni.denied(sni.py("prod", vip, "api.example.internal", timeout=DENY_WAIT))
        d = moved(before, sni.snapshot())
        assert d.get("sni_fronting", 0) >= 1, d
        assert d.get("ev:vip_nat", 0) >= 2, d
        assert front.result == "timeout"
    # the same name to the real address: not through the service address, the default decides
    sni.allowed(sni.py("prod", PAY4, "api.example.internal"))
