"""A `bulkhead agent run` in a lab topology's gateway namespace, and the CLI around it."""
from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bulkhead.core.paths import REPO
from bulkhead.lab.topology import NETNS_DIR, Topology


def bulkhead_argv() -> list[str]:
    """How to run the `bulkhead` CLI of this checkout with this interpreter."""
    script = Path(sys.executable).parent / "bulkhead"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from bulkhead.cli.main import main; sys.exit(main())"]


def fleet_args(etcd: str, gateway: str, trust: str | os.PathLike) -> tuple[str, ...]:
    """The `agent run` options that make it follow the fleet instead of a --policy file."""
    return ("--etcd", etcd, "--gateway", gateway, "--trust", str(trust))


# Seconds an agent may take to compile, load and attach before a start counts as failed. bcc's
# compile is most of it: seconds here, minutes under qemu TCG on a busy host (the VM harness sets
# BULKHEAD_AGENT_START_TIMEOUT).
START_TIMEOUT = float(os.environ.get("BULKHEAD_AGENT_START_TIMEOUT", "120"))


class AgentRunner:
    """A `bulkhead agent run` in the topology's gateway namespace, and the CLI around it.

    The agent is started with nsenter (Topology.gw_cmd) so its pins live in the
    root bpffs and survive restarts. CLI calls that act on the gateway's
    interfaces (down) run in the gateway namespace too; the others only need
    the control socket under state_dir.
    """

    def __init__(self, topo: Topology, state_dir: str | os.PathLike):
        self.topo = topo
        self.state_dir = str(state_dir)
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(self.state_dir) / "agent.log"

    def start(self, policy: str | os.PathLike | None, timeout: float | None = None, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> int:
        """Start the agent (`args`: more `agent run` options, `env`: more environment) and wait for
        `bulkhead agent ready generation=N`; returns N. policy None: `args` says where the policy
        comes from (fleet_args). timeout None: START_TIMEOUT (the compile dominates it)."""
        timeout = START_TIMEOUT if timeout is None else timeout
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        source = ["--policy", str(policy)] if policy is not None else []
        try:
            self.proc = self.topo.spawn("gw", [*bulkhead_argv(), "agent", "run", *source,
                                               "--state-dir", self.state_dir, *args],
                                        stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(REPO),
                                        env={**os.environ, **env} if env else None)
        finally:
            log.close()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        said = []  # what the agent printed (a policy error goes to stdout)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            said.append(line)
            m = re.match(r"bulkhead agent ready generation=(\d+)", line)
            if m:
                # Keep draining stdout so a chatty agent can never block on a full pipe.
                threading.Thread(target=lambda f=self.proc.stdout: [None for _ in f], daemon=True).start()
                return int(m.group(1))
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"agent did not become ready; stdout:\n{''.join(said[-20:])}log:\n{self.log()}")

    def start_fleet(self, etcd: str, gateway: str, trust: str | os.PathLike, timeout: float | None = None,
                    args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> int:
        """`bulkhead agent run --etcd ETCD --gateway GATEWAY --trust TRUST` (the fleet's policy)."""
        return self.start(None, timeout, (*fleet_args(etcd, gateway, trust), *args), env=env)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the agent (it leaves enforcement in place) and wait for it to exit."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)  # nsenter execs the agent: this pid is the agent
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        if self.proc in self.topo.procs:
            self.topo.procs.remove(self.proc)
        self.proc = None
        return rc

    def cli(self, *args: str, gw: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [*bulkhead_argv(), *args, "--state-dir", self.state_dir]
        if gw:
            argv = self.topo.gw_cmd(argv)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))

    def apply(self, policy: str | os.PathLike) -> subprocess.CompletedProcess:
        return self.cli("policy", "apply", str(policy))

    def status(self) -> dict:
        import json

        p = self.cli("status", "--json")
        if p.returncode != 0:
            raise RuntimeError(f"bulkhead status: exit {p.returncode}: {p.stderr}")
        return json.loads(p.stdout)

    def counters(self) -> dict[str, int]:
        return {k: v["packets"] for k, v in self.status()["counters"].items()}

    def down(self) -> subprocess.CompletedProcess:
        return self.cli("down", gw=True)

    def cleanup(self) -> None:
        """down (in the gateway netns), then make sure the process and pins are gone. Never raises."""
        try:
            if self.topo.created and (NETNS_DIR / self.topo.gw).exists():
                self.down()
        except Exception:
            pass
        try:
            self.stop(signal.SIGKILL if self.running() else signal.SIGTERM, timeout=5)
        except Exception:
            pass
        try:
            from bulkhead.datapath import loader

            # Also when pin_dir is absent: an agent killed in its first load leaves only
            # tmp-<instance>-<pid>, which remove_pins takes too.
            loader.remove_pins(loader.pin_dir_for(self.state_dir))
            from bulkhead.datapath.plumbing import RECORD_DIR

            for rec in RECORD_DIR.glob(f"*-{loader.instance_name(self.state_dir)}.json"):
                rec.unlink(missing_ok=True)
        except Exception:
            pass
