"""The control socket's wire: length-prefixed msgpack over a unix stream socket, and the client.

The server is bulkhead.daemon.control; the CLI, the verifier and tests use `request`.

Frame = 4-byte big-endian length + msgpack map. Requests are
{"op": str, ...}; replies are {"ok": bool, "error": str?, ...}. The socket
is created mode 0600 (root only): whoever can write to it can change policy.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

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
