"""Control socket: length-prefixed msgpack over a unix stream socket.

Frame = 4-byte big-endian length + msgpack map. Requests are
{"op": str, ...}; replies are {"ok": bool, "error": str?, ...}. The socket
is created mode 0600 (root only): whoever can write to it can change policy.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import msgpack

log = logging.getLogger("bulkhead.control")

SOCKET_NAME = "bulkhead.sock"
MAX_FRAME = 256 * 1024 * 1024  # a 100k-rule bundle packs to a few MiB; refuse absurd frames


class ControlError(RuntimeError):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("control socket closed mid-frame")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_frame(sock: socket.socket) -> Any:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ControlError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
    return msgpack.unpackb(_recv_exact(sock, n), raw=False, strict_map_key=False)


def socket_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / SOCKET_NAME


def request(state_dir: str | os.PathLike, op: str, timeout: float = 60.0, **kw) -> dict:
    """One request/reply. Raises ControlError when no agent answers."""
    path = socket_path(state_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ControlError(
                f"no agent is listening on {path} (start one with `bulkhead agent run --policy FILE`"
                f" and the same --state-dir): {e.strerror}"
            ) from None
        send_frame(s, {"op": op, **kw})
        reply = recv_frame(s)
    finally:
        s.close()
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from agent")
    return reply


class ControlServer:
    """Serves requests on a thread per connection; `handler(req) -> reply dict`."""

    def __init__(self, state_dir: str | os.PathLike, handler: Callable[[dict], dict]):
        self.path = socket_path(state_dir)
        self.handler = handler
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_free(self) -> None:
        """Fail if a live agent serves this state dir; clear a dead one's socket."""
        if self.path.exists():
            try:
                request(self.path.parent, "ping", timeout=2)
            except Exception:
                self.path.unlink()
            else:
                raise ControlError(f"another agent is already serving {self.path}")

    def start(self) -> None:
        self.ensure_free()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # socket file mode 0600 from the moment it exists
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        s.listen(16)
        s.settimeout(0.5)
        self.sock = s
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            try:
                req = recv_frame(conn)
                if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                    reply = {"ok": False, "error": "request must be a map with a string 'op'"}
                else:
                    reply = self.handler(req)
            except Exception as e:  # a bad client must not take the agent down
                log.exception("control request failed")
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            try:
                send_frame(conn, reply)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self.sock:
            self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
