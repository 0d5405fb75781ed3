"""systemd's service notification protocol (sd_notify(3)), which `Type=notify` units use.

A datagram of newline-separated KEY=VALUE lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading "@" is Linux's abstract namespace). Without the variable
(not started by systemd) every call is a no-op, so the agent calls it unconditionally.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("bulkhead.notify")


def notify(**fields: object) -> bool:
    """notify(READY=1, STATUS="...") -> True if systemd was told."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not fields:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg)
        return True
    except OSError as e:  # systemd went away or the socket is not ours: telling it is best effort
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
