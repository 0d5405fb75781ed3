"""Reusable L7 verifier test matrix (issue 4).

- origin.py:   the origin server (script or in-process), logs every request it sees
- material.py: keys, certificates, JWTs and the test policy, generated per session
- policy.yaml: the policy template (key paths filled in by material.py)
- cases.py:    the cases, each a function of a `target` (see cases.py for the protocol)
- loopback.py: the loopback harness (engine in-process, origins on 127.0.0.1)

tests/integration/test_verifier_loopback.py runs every case on loopback; a gateway
harness runs the same cases.CASES with its own target.
"""
