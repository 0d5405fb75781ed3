"""Errors of the data path room (its own module so loader and probe need not import each other)."""


class DatapathError(RuntimeError):
    """Loading, attaching or writing the data path failed: exit code 1."""
