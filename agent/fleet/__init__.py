"""The fleet: one signed policy for every gateway, distributed through etcd.

Modules: keys (Ed25519 signing keys), envelope (the signed, revisioned bundle), store (etcd
through its JSON gateway: key layout, leases, watches), publish (`bulkhead fleet publish`),
status (`bulkhead fleet status`), follower (the agent side: watch, verify, apply, acknowledge,
keep the last verified bundle). See docs/fleet.md.
"""
