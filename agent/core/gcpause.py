"""Pause Python's cyclic garbage collector around building or reading big object graphs.

A 100k-rule policy is millions of small containers, none of them cyclic garbage; every 700
allocations the collector walks the young ones, and the older generations over and over: that
was 70% of Bundle.unpack and a third of load_policy. Reference counting still frees everything.
"""
from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """Nested and threaded uses are counted: the collector comes back when the last one ends,
    and only if it was on when the first began."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
