"""bulkhead: application segmentation for Linux gateways, enforced with eBPF/XDP.

Installed as the package `bulkhead` from this folder (pyproject maps it). The rooms, and which
may import which, are drawn in docs/architecture.md and held by tests/unit/test_layout.py:

    cli -> daemon -> {telemetry, verifier, lab} -> {policy, datapath} -> l7 -> core
"""
