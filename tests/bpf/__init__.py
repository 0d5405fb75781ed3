"""BPF_PROG_TEST_RUN tests of bpf/bulkhead.c.

A package so the test modules can share the topology and helpers of
conftest.py with a relative import (`from .conftest import ...`) instead of
copying addresses between files.
"""
