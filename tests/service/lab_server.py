"""The service lab's server (tests/service/lab.sh starts it in bhsvc-srv).

`lab_server.py --log FILE --ready FILE --tcp ADDR:PORT... --udp ADDR:PORT...`: greets each TCP
connection with "hello PORT\\n" and echoes; echoes UDP datagrams. Every accepted connection and
every datagram appends "tcp PORT PEER" / "udp PORT PEER" to the log, so a test can tell that a
denied flow never reached the server, whatever the client saw. Standard library only: it runs
with the system python3 at boot, before (and without) any venv.
"""
from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import threading


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--tcp", action="append", default=[])
    ap.add_argument("--udp", action="append", default=[])
    a = ap.parse_args()

    log_fd = os.open(a.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = threading.Lock()

    def arrived(proto: str, port: int, peer) -> None:
        with lock:  # one write per line: O_APPEND keeps lines whole
            os.write(log_fd, f"{proto} {port} {peer[0]}:{peer[1]}\n".encode())

    sel = selectors.DefaultSelector()
    for spec in a.tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(_addr(spec))
        s.listen(128)
        sel.register(s, selectors.EVENT_READ, "tcp")
    for spec in a.udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(_addr(spec))
        sel.register(s, selectors.EVENT_READ, "udp")

    def conn(c: socket.socket, port: int) -> None:
        with c:
            try:
                c.sendall(f"hello {port}\n".encode())
                while data := c.recv(65536):
                    c.sendall(data)
            except OSError:
                return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(a.ready, "w") as f:
        f.write(f"{os.getpid()}\n")
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            port = s.getsockname()[1]
            try:
                if key.data == "tcp":
                    c, peer = s.accept()
                    arrived("tcp", port, peer)
                    threading.Thread(target=conn, args=(c, port), daemon=True).start()
                else:
                    data, peer = s.recvfrom(65536)
                    arrived("udp", port, peer)
                    s.sendto(data, peer)
            except OSError:
                continue


if __name__ == "__main__":
    sys.exit(main())
