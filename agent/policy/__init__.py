"""The policy compiler: YAML files in, a checked Bundle of map entries out.

Pure Python with no kernel access, so `bulkhead policy validate` runs
anywhere and the unit tests need no root.

    from bulkhead.policy import load_policy, PolicyError
    try:
        bundle, warnings = load_policy(["policies/example.yaml"])
    except PolicyError as e:
        print(e)  # one "FILE:LINE: message" per problem

Modules: loader (YAML with line numbers), validate (every check, all errors
in one pass), model (the validated dataclasses, Diag, PolicyError), ports
(port specs and range decomposition), compiler (ids, precedence, LPM
entries), bundle (the serialized output).
"""
from __future__ import annotations

from bulkhead.core.gcpause import gc_paused
from bulkhead.policy.bundle import Bundle
from bulkhead.policy.compiler import compile_policy
from bulkhead.policy.model import Diag, Policy, PolicyError
from bulkhead.policy.validate import validate_files

__all__ = ["Bundle", "Diag", "Policy", "PolicyError", "compile_policy", "load_policy", "validate_files"]


def load_policy(paths: list[str], previous_vips: dict | None = None) -> tuple[Bundle, list[str]]:
    """Validate and compile the policy made of `paths`.

    Several files are merged: their gateways, segments, apps and rules lists are
    concatenated in the order given (ids follow that order); version and
    settings may appear in at most one of them. Returns the bundle and its
    warnings (non-fatal messages), which
    are also in bundle.warnings. `previous_vips` (the running bundle's `vips`) keeps published
    apps' service addresses where they were.
    Raises PolicyError carrying every problem found.
    """
    if isinstance(paths, str):
        paths = [paths]  # a lone path is an easy mistake; a str would iterate by character
    if not paths:
        raise PolicyError([Diag("<none>", 1, "no policy file given")])
    with gc_paused():  # millions of small objects, no cycles: see bulkhead.core.gcpause
        policy = validate_files(list(paths))
        bundle = compile_policy(policy, previous_vips)
    return bundle, list(bundle.warnings)
