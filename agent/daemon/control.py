"""The agent's control socket server: one thread per connection, `handler(req) -> reply`.

The frames and the client are bulkhead.core.wire. The socket is created mode 0600 (root only):
whoever can write to it can change policy.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from bulkhead.core.wire import ControlError, recv_frame, request, send_frame, socket_path

log = logging.getLogger("bulkhead.control")


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
