"""Several lab gateways and one etcd: the fleet's demo and integration test.

    <p>-etcd   etcd on 198.18.250.1:2379 (on lo)
      fl0 198.18.200.1/30 ---- fleet 198.18.200.2/30  in gateway 0's <q0>-gw
      fl1 198.18.201.1/30 ---- fleet 198.18.201.2/30  in gateway 1's <q1>-gw
      ...

Every gateway is a whole lab Topology (its own gw, prod, dev and core namespaces, see
topology.py) with an agent of its own (own state dir, so own pins under
/sys/fs/bpf/bulkhead/<instance>). etcd sits in a namespace of its own with a /30 veth to each
gateway namespace, so each agent reaches it as it would across a WAN, and stopping it cuts every
gateway off at once. The fleet CLI (publish, status) runs in the etcd namespace.

Destination apps are looked up by address in every gateway, so two gateways' servers may not
share addresses in one policy: gateway i's payments listens on 198.19.0.(110+i) and its catalog
on 198.19.0.(120+i), added to its core namespace next to the usual .10/.20.

Only the CLI is used for the fleet (keygen, publish, status): lab may not import the fleet room.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from bulkhead.core.paths import REPO
from bulkhead.lab import topology
from bulkhead.lab.etcd import EtcdServer
from bulkhead.lab.runner import AgentRunner, bulkhead_argv
from bulkhead.lab.topology import Lab, NETNS_DIR, Topology

ETCD_V4 = "198.18.250.1"
LINK_IF = "fl0"  # in the gateway namespace; the etcd side is fl<i>


def payments_v4(i: int) -> str:
    return f"198.19.0.{110 + i}"


def catalog_v4(i: int) -> str:
    return f"198.19.0.{120 + i}"


PAYMENTS_PORT, CATALOG_PORT = 8443, 8080
DESTINATIONS = ("payments", "catalog")


def expected(index: int, variant: str) -> tuple[str, str]:
    """(allowed, rejected) destination of gateway `index` under policy `variant` (see policy_doc)."""
    flip = (index % 2 == 1) != (variant == "B")
    return DESTINATIONS[::-1] if flip else DESTINATIONS


@dataclasses.dataclass
class Gateway:
    name: str
    index: int
    topo: Topology
    agent: AgentRunner

    @property
    def payments(self) -> str:
        return payments_v4(self.index)

    @property
    def catalog(self) -> str:
        return catalog_v4(self.index)


class FleetLab(Lab):
    """`with FleetLab(["gw-a", "gw-b"]) as lab:` builds everything; exit (or destroy())
    removes agents, pins, namespaces, etcd and the work dir, also after a failure."""

    def __init__(self, names: list[str], kind: str = "bht", work_dir: str | os.PathLike | None = None):
        if len(names) > 50:
            raise ValueError("at most 50 gateways (198.18.200-249.0/30 links)")
        self.kind = kind
        self.work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bulkhead-fleet-"))
        self._own_work = work_dir is None
        self.work.mkdir(parents=True, exist_ok=True)
        self.etcd_ns = f"{kind}{os.getpid()}x{next(topology._counter)}-etcd"
        self.gateways: dict[str, Gateway] = {}
        for i, name in enumerate(names):
            topo = Topology(kind)
            self.gateways[name] = Gateway(name, i, topo, AgentRunner(topo, self.work / name))
        self.etcd = EtcdServer(name="bhfleet", client_addr=ETCD_V4, netns=self.etcd_ns)
        self.created = False

    # ------------------------------------------------------------- lifecycle  (_ip: Lab's)

    def create(self) -> "FleetLab":
        self.created = True
        if (NETNS_DIR / self.etcd_ns).exists():
            subprocess.run(["ip", "netns", "del", self.etcd_ns], capture_output=True)
        self._ip("netns", "add", self.etcd_ns)
        self._ip("-n", self.etcd_ns, "link", "set", "lo", "up")
        self._ip("-n", self.etcd_ns, "addr", "add", f"{ETCD_V4}/32", "dev", "lo")
        for gw in self.gateways.values():
            gw.topo.create()
            i, net = gw.index, f"198.18.{200 + gw.index}"
            self._ip("-n", self.etcd_ns, "link", "add", f"fl{i}", "type", "veth", "peer", "name", LINK_IF,
                     "netns", gw.topo.gw)
            self._ip("-n", self.etcd_ns, "addr", "add", f"{net}.1/30", "dev", f"fl{i}")
            self._ip("-n", gw.topo.gw, "addr", "add", f"{net}.2/30", "dev", LINK_IF)
            self._ip("-n", self.etcd_ns, "link", "set", f"fl{i}", "up")
            self._ip("-n", gw.topo.gw, "link", "set", LINK_IF, "up")
            self._ip("-n", gw.topo.gw, "route", "add", f"{ETCD_V4}/32", "via", f"{net}.1")
            core = gw.topo.ns["core"]
            for a in (gw.payments, gw.catalog):
                self._ip("-n", core, "addr", "add", f"{a}/24", "dev", topology.PEER_IF)
            gw.topo.serve("core", f"payments-{gw.name}", tcp=[f"{gw.payments}:{PAYMENTS_PORT}"])
            gw.topo.serve("core", f"catalog-{gw.name}", tcp=[f"{gw.catalog}:{CATALOG_PORT}"])
        self.etcd.start(self.work / "etcd")
        return self

    def destroy(self) -> None:
        """Agents down (pins, plumbing), namespaces, etcd, work dir. Idempotent, never raises."""
        for gw in self.gateways.values():
            gw.agent.cleanup()
        for gw in self.gateways.values():
            gw.topo.destroy()
        try:
            self.etcd.stop()
        except Exception:
            pass
        if (NETNS_DIR / self.etcd_ns).exists():
            subprocess.run(["ip", "netns", "del", self.etcd_ns], capture_output=True)
        if self._own_work:
            shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------ the fleet
    @property
    def url(self) -> str:
        return self.etcd.url

    def etcd_cmd(self, argv: list[str]) -> list[str]:
        """A command in the etcd namespace (where the operator's CLI runs here)."""
        return ["nsenter", f"--net={NETNS_DIR / self.etcd_ns}", *argv]

    def fleet(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`bulkhead fleet ARGS... --etcd URL` (keygen takes no --etcd)."""
        argv = [*bulkhead_argv(), "fleet", *args]
        if args and args[0] != "keygen":
            argv += ["--etcd", self.url]
        return subprocess.run(self.etcd_cmd(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=str(REPO))

    def keygen(self, name: str) -> Path:
        key = self.work / "keys" / name
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        p = self.fleet("keygen", "--key", str(key))
        if p.returncode != 0:
            raise RuntimeError(f"fleet keygen: exit {p.returncode}: {p.stderr.strip()}")
        return key

    def publish(self, policy: str | os.PathLike, key: str | os.PathLike) -> int:
        """Publish; returns the revision. Raises with the CLI's output on failure."""
        p = self.fleet("publish", str(policy), "--key", str(key))
        words = p.stdout.split()
        if p.returncode != 0 or len(words) < 2 or words[0] != "revision":
            raise RuntimeError(f"fleet publish: exit {p.returncode}: {p.stdout.strip()} {p.stderr.strip()}")
        return int(words[1])

    def status(self) -> dict:
        p = self.fleet("status", "--json")
        if p.returncode != 0:
            raise RuntimeError(f"fleet status: exit {p.returncode}: {p.stderr.strip()}")
        return json.loads(p.stdout)

    def wait(self, revision: int, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.fleet("status", "--wait", str(revision), "--timeout", str(timeout), timeout=timeout + 30)

    def start_agent(self, name: str, trust: str | os.PathLike, args: tuple[str, ...] = (),
                    env: dict[str, str] | None = None) -> int:
        """`agent run --etcd URL --gateway NAME --trust FILE` in the gateway's namespace; waits
        for its ready line (so for its first verified policy) and returns the generation."""
        return self.gateways[name].agent.start_fleet(self.url, name, trust, args=args, env=env)

    # ------------------------------------------------------------ the policy
    def policy_doc(self, variant: str) -> dict:
        """One policy for every gateway: each has its own prod and core segments and apps (NAME-web,
        NAME-payments, NAME-catalog). Variant A: gateway 0 (2, ...) lets web reach payments and
        rejects it at catalog, gateway 1 (3, ...) the other way round; variant B swaps them. So a
        gateway that enforces another's half, or the wrong revision, shows in its traffic."""
        doc = {"version": 1, "settings": {"default_action": "deny"},
               "gateways": [{"name": n} for n in self.gateways], "segments": [], "apps": [], "rules": []}
        for gw in self.gateways.values():
            n = gw.name
            doc["segments"] += [{"name": f"{n}-prod", "gateway": n, "interfaces": ["bh-prod"]},
                                {"name": f"{n}-core", "gateway": n, "interfaces": ["bh-core"]}]
            doc["apps"] += [
                {"name": f"{n}-web", "segment": f"{n}-prod", "addresses": ["198.18.1.0/24"]},
                {"name": f"{n}-payments", "segment": f"{n}-core", "addresses": [f"{gw.payments}/32"],
                 "ports": [f"tcp/{PAYMENTS_PORT}"]},
                {"name": f"{n}-catalog", "segment": f"{n}-core", "addresses": [f"{gw.catalog}/32"],
                 "ports": [f"tcp/{CATALOG_PORT}"]},
            ]
            allowed, rejected = expected(gw.index, variant)
            doc["rules"] += [{"name": f"{n}-web-{allowed}", "from": f"{n}-web", "to": f"{n}-{allowed}",
                              "action": "allow"},
                             {"name": f"{n}-web-{rejected}", "from": f"{n}-web", "to": f"{n}-{rejected}",
                              "action": "reject"}]
        return doc

    def write_policy(self, variant: str) -> Path:
        path = self.work / f"policy-{variant}.yaml"
        path.write_text(yaml.safe_dump(self.policy_doc(variant), sort_keys=False))
        return path

    def want(self, variant: str) -> dict[str, dict[str, str]]:
        """What traffic() must return under `variant`: connected to the allowed, refused (RST) by
        the rejected destination."""
        out = {}
        for gw in self.gateways.values():
            allowed, rejected = expected(gw.index, variant)
            out[gw.name] = {allowed: "connected", rejected: "refused"}
        return out

    def traffic(self, timeout: float = 1.0) -> dict[str, dict[str, str]]:
        """{gateway: {"payments": result, "catalog": result}}: a TCP connection (greeting and echo)
        from each gateway's prod client to its own payments and catalog."""
        out = {}
        for gw in self.gateways.values():
            out[gw.name] = {
                "payments": gw.topo.tcp("prod", gw.payments, PAYMENTS_PORT, timeout=timeout, send=b"hi\n").result,
                "catalog": gw.topo.tcp("prod", gw.catalog, CATALOG_PORT, timeout=timeout, send=b"hi\n").result,
            }
        return out
