"""`bulkhead demo --fleet` (`make demo-fleet`): two gateways following one published policy.

Builds two lab gateways and one etcd (lab/fleetlab.py: each gateway a whole topology with its
own client and server namespaces and its own agent; etcd in a namespace of its own, a veth to
each gateway), generates a signing key, publishes policy A, starts an agent per gateway with
`agent run --etcd URL --gateway NAME --trust KEY.pub`, waits for both to acknowledge
(`fleet status --wait`), sends traffic through both, publishes policy B, shows both follow, and
prints `bulkhead fleet status`. Everything is removed afterwards, also on Ctrl-C, SIGTERM or an
error. Exits 1 if any result differs from what the policy says.
"""
from __future__ import annotations

import sys
import time

from bulkhead.lab.demo import print_rows, run_demo, verdict
from bulkhead.lab.fleetlab import CATALOG_PORT, PAYMENTS_PORT, FleetLab, expected
from bulkhead.lab.topology import CLIENT_V4, reap_stale

GATEWAYS = ["gw-east", "gw-west"]
WHY = {"connected": "allow", "refused": "reject (TCP RST)"}


def show(lab: FleetLab, variant: str, revision: int) -> int:
    """Traffic through every gateway next to what revision `revision` (policy `variant`) says."""
    got, want = lab.traffic(), lab.want(variant)
    rows = [("GATEWAY", "FROM", "TO", "RESULT", "EXPECTED", "MATCH", "RULE")]
    bad = 0
    for gw in lab.gateways.values():
        for dest, port, addr in (("payments", PAYMENTS_PORT, gw.payments), ("catalog", CATALOG_PORT, gw.catalog)):
            ok = got[gw.name][dest] == want[gw.name][dest]
            bad += not ok
            rows.append((gw.name, f"{gw.name}-web {CLIENT_V4}", f"{gw.name}-{dest} {addr}:{port}",
                         got[gw.name][dest], want[gw.name][dest], "ok" if ok else "MISMATCH",
                         f"{gw.name}-web-{dest}: {WHY[want[gw.name][dest]]}"))
    print(f"\ntraffic under revision {revision} (policy {variant}):")
    print_rows(rows)
    return bad


def publish_and_wait(lab: FleetLab, variant: str, key) -> int:
    path = lab.write_policy(variant)
    t0 = time.monotonic()
    rev = lab.publish(path, key)
    p = lab.wait(rev, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"fleet status --wait {rev}: {p.stdout.strip()} {p.stderr.strip()}")
    print(f"$ bulkhead fleet publish {path.name} --etcd {lab.url} --key fleet.key\nrevision {rev}")
    print(f"every live gateway applied revision {rev}: {time.monotonic() - t0:.2f} s for publish and "
          "`fleet status --wait` (two CLI runs included)")
    return rev


def describe(lab: FleetLab, variant: str) -> str:
    parts = []
    for gw in lab.gateways.values():
        allowed, rejected = expected(gw.index, variant)
        parts.append(f"{gw.name}: web -> {allowed} allowed, -> {rejected} rejected")
    return "; ".join(parts)


def main() -> int:
    reap_stale(("bhdemo",))
    lab = FleetLab(GATEWAYS, kind="bhdemo")

    def body() -> int:
        t0 = time.monotonic()
        print(f"building two gateways ({', '.join(GATEWAYS)}), each with its own client and server "
              f"namespaces, and etcd in {lab.etcd_ns} ...", flush=True)
        lab.create()
        print(f"etcd at {lab.url}, reached from each gateway over its own veth")
        key = lab.keygen("fleet.key")
        print("$ bulkhead fleet keygen --key fleet.key   # fleet.key (0600) and fleet.key.pub\n")
        print(f"policy A: {describe(lab, 'A')}")
        rev_a = lab.publish(lab.write_policy("A"), key)
        print(f"$ bulkhead fleet publish policy-A.yaml --etcd {lab.url} --key fleet.key\nrevision {rev_a}")
        print("starting an agent per gateway: bulkhead agent run --etcd URL --gateway NAME "
              "--trust fleet.key.pub (compiles the XDP program) ...", flush=True)
        for name in lab.gateways:
            lab.start_agent(name, f"{key}.pub")
        p = lab.wait(rev_a, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"fleet status --wait {rev_a}: {p.stdout.strip()} {p.stderr.strip()}")
        print(f"both gateways applied revision {rev_a} after {time.monotonic() - t0:.1f} s")
        bad = show(lab, "A", rev_a)
        print(f"\npolicy B: {describe(lab, 'B')}")
        rev_b = publish_and_wait(lab, "B", key)
        bad += show(lab, "B", rev_b)
        print(f"\n$ bulkhead fleet status --etcd {lab.url}")
        print(lab.fleet("status").stdout.rstrip())
        return verdict(bad, "the published policy", "both gateways follow the one published policy")

    def logs() -> list[tuple[str, str]]:
        return [(f"{gw.name} agent", gw.agent.log()) for gw in lab.gateways.values()]

    return run_demo("fleet demo", body, logs, lab.destroy, "cleaning up: agents down, namespaces, etcd ...")


if __name__ == "__main__":
    sys.exit(main())
