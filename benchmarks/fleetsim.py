"""Simulated gateways for the fleet benchmark: one process, many gateways on one asyncio loop.

    python benchmarks/fleetsim.py --etcd URL --trust FILE.pub --first 0 --count 250

Each gateway does what a follower does with a published envelope, minus the kernel: a lease
(TTL 10 s, kept alive every 3 s) and its lease-bound `alive` key, a `status` key, a watch on
`/bulkhead/v1/policy`; on every event it verifies the envelope with the real
`bulkhead.fleet.envelope.open_verified` and the trusted key, refuses a revision not above the
applied one, and acks by writing its status (applied_revision, digest) as the follower does.
It does not unpack the bundle or load maps: that is each gateway's own work on its own host,
not the fleet's fan-out.

etcd3gw holds a watch with a blocking `requests` stream and two threads per watch; a few hundred
watches per process are cheaper as plain HTTP/1.1 connections to etcd's JSON gateway on one
event loop, so this speaks /v3/watch, /v3/kv/put and /v3/lease/* itself.

Protocol with the benchmark (stdin/stdout lines): prints `READY N` once every watch is created;
on `stats` prints `STATS {json}` (per revision: gateways acked, first/last receipt, the decode +
verify time summed, last ack, refusals); exits on stdin EOF (the benchmark closing the pipe), and
on SIGTERM. Timestamps are CLOCK_MONOTONIC, which every process on the host shares.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from bulkhead.fleet.envelope import EnvelopeError, open_verified
from bulkhead.fleet.keys import load_public
from bulkhead.fleet.store import ALIVE_TTL, POLICY_KEY, alive_key, status_key

KEEPALIVE_EVERY = ALIVE_TTL / 3


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class EtcdError(Exception):
    pass


class Conn:
    """One keep-alive HTTP/1.1 connection to etcd's JSON gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        # 8 MiB: a watch message carries a whole base64'd envelope on one line.
        reader, writer = await asyncio.open_connection(host, port, limit=8 << 20)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, host)

    def send(self, path: str, body: dict) -> None:
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)

    async def head(self) -> tuple[int, dict[str, str]]:
        status = await self.reader.readline()
        if not status.startswith(b"HTTP/1.1 "):
            raise ConnectionError(f"etcd: not an HTTP answer: {status[:80]!r}")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(status.split()[1]), headers

    async def chunk(self) -> bytes:
        size = int((await self.reader.readline()).split(b";")[0], 16)
        if size == 0:
            # The last chunk; the gateway may send trailers (Grpc-Trailer-*) before the blank line.
            while (await self.reader.readline()) not in (b"\r\n", b""):
                pass
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def call(self, path: str, body: dict) -> dict:
        """One request and its whole answer (so the connection stays in step); EtcdError if not 200."""
        self.send(path, body)
        await self.writer.drain()
        code, headers = await self.head()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        else:
            parts = []
            while part := await self.chunk():
                parts.append(part)
            data = b"".join(parts)
        if code != 200:
            raise EtcdError(f"etcd {path}: {code} {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.writer.close()


class Pool:
    def __init__(self, host: str, port: int, conns: list[Conn]):
        self.host, self.port = host, port
        self.free: asyncio.Queue[Conn] = asyncio.Queue()
        for c in conns:
            self.free.put_nowait(c)

    async def call(self, path: str, body: dict) -> dict:
        c = await self.free.get()
        try:
            return await c.call(path, body)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            # Out of step or broken: never reuse it.
            c.close()
            c = await Conn.open(self.host, self.port)
            raise
        finally:
            self.free.put_nowait(c)


class Stats:
    def __init__(self) -> None:
        self.revs: dict[int, dict[str, Any]] = {}
        # Lease keepalives: the slowest answer, and how many found the lease already gone.
        self.keepalive = {"count": 0, "max_s": 0.0, "expired": 0, "failed": 0, "last_error": None}

    def rev(self, n: int) -> dict[str, Any]:
        return self.revs.setdefault(n, {"acked": 0, "refused": 0, "first_recv": None, "last_recv": 0.0,
                                        "verify_s": 0.0, "last_ack": 0.0, "errors": []})


class Gateway:
    def __init__(self, name: str, pool: Pool, public_key, stats: Stats, agent: str):
        self.name, self.pool, self.public_key, self.stats, self.agent = name, pool, public_key, stats, agent
        self.lease = 0
        self.applied = 0
        self.digest = None
        self.error = None

    def status(self) -> bytes:
        return json.dumps({"name": self.name, "applied_revision": self.applied, "digest": self.digest,
                           "stale": False, "error": self.error, "updated": time.time(),
                           "agent": self.agent}).encode()

    async def put_status(self) -> None:
        for attempt in range(3):  # as the follower: a failed ack is written again
            try:
                await self.pool.call("/v3/kv/put", {"key": b64(status_key(self.name)),
                                                    "value": b64(self.status())})
                return
            except (EtcdError, OSError, asyncio.IncompleteReadError, ValueError):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5)

    async def register(self) -> None:
        self.lease = int((await self.pool.call("/v3/lease/grant", {"TTL": ALIVE_TTL}))["ID"])
        await self.pool.call("/v3/kv/put", {"key": b64(alive_key(self.name)),
                                            "value": b64(self.agent), "lease": self.lease})
        await self.put_status()

    async def watch(self, host: str, port: int, created: asyncio.Event) -> None:
        conn = await Conn.open(host, port)
        conn.send("/v3/watch", {"create_request": {"key": b64(POLICY_KEY)}})
        await conn.writer.drain()
        code, headers = await conn.head()
        if code != 200 or "chunked" not in headers.get("transfer-encoding", ""):
            raise RuntimeError(f"{self.name}: etcd refused the watch ({code})")
        buf = b""
        while True:
            part = await conn.chunk()
            if not part:
                raise RuntimeError(f"{self.name}: etcd ended the watch")
            buf += part
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if line.strip():
                    await self.message(line, time.monotonic(), created)

    async def message(self, line: bytes, t_recv: float, created: asyncio.Event) -> None:
        result = json.loads(line)["result"]
        if result.get("created"):
            created.set()
            return
        for ev in result.get("events", ()):
            if ev.get("type") == "DELETE" or "value" not in ev.get("kv", {}):
                continue
            raw = base64.b64decode(ev["kv"]["value"])
            try:
                sealed = open_verified(raw, self.public_key)
            except EnvelopeError as e:
                self.error = f"refused: {e}"
                await self.put_status()
                continue
            rs = self.stats.rev(sealed.revision)
            rs["verify_s"] += time.monotonic() - t_recv
            rs["first_recv"] = t_recv if rs["first_recv"] is None else min(rs["first_recv"], t_recv)
            rs["last_recv"] = max(rs["last_recv"], t_recv)
            if sealed.revision <= self.applied:
                self.error = f"revision {sealed.revision} is not above the applied {self.applied} (replay?)"
                rs["refused"] += 1
            else:
                self.applied, self.digest, self.error = sealed.revision, sealed.digest, None
            await self.put_status()
            if self.error is None:
                rs["acked"] += 1
                rs["last_ack"] = max(rs["last_ack"], time.monotonic())

    async def keepalive(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_EVERY)
            t = time.monotonic()
            ka = self.stats.keepalive
            try:
                out = await self.pool.call("/v3/lease/keepalive", {"ID": self.lease})
            except (EtcdError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                ka["failed"] += 1
                ka["last_error"] = str(e)[:200]
                out = {}
            ka["count"] += 1
            ka["max_s"] = max(ka["max_s"], time.monotonic() - t)
            if int(out.get("result", {}).get("TTL", -1)) <= 0:
                # Gone: the alive key went with it. A follower grants a new lease and writes the
                # key again; so does this gateway, and the benchmark counts it.
                ka["expired"] += 1
                await self.register()


async def main(args: argparse.Namespace) -> None:
    url = urlsplit(args.etcd)
    host, port = url.hostname, url.port
    public_key = load_public(args.trust)
    stats = Stats()
    agent = f"{socket.gethostname()}/{os.getpid()}"
    # Every gateway has its own connection for acks and keepalives, as a real agent does: a
    # shared few would queue one gateway's keepalive behind another's ack.
    gws = [Gateway(f"gw-{i:04d}", Pool(host, port, [await Conn.open(host, port)]), public_key, stats, agent)
           for i in range(args.first, args.first + args.count)]
    await asyncio.gather(*(g.register() for g in gws))
    created = [asyncio.Event() for _ in gws]
    tasks = [asyncio.ensure_future(g.watch(host, port, c)) for g, c in zip(gws, created)]
    tasks += [asyncio.ensure_future(g.keepalive()) for g in gws]
    await asyncio.wait_for(asyncio.gather(*(c.wait() for c in created)), 60)
    print(f"READY {len(gws)}", flush=True)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    failed = asyncio.ensure_future(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
    while True:
        cmd = asyncio.ensure_future(stdin.readline())
        done, _ = await asyncio.wait([cmd, failed], return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()
        line = cmd.result()
        if not line:
            return
        if line.strip() == b"stats":
            print("STATS " + json.dumps({"revs": {str(k): v for k, v in stats.revs.items()},
                                         "keepalive": stats.keepalive}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--etcd", required=True)
    p.add_argument("--trust", required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=250)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main(p.parse_args()))
