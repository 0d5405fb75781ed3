"""The floor every room stands on: shared names and numbers, paths, the control wire.

Imports nothing else from bulkhead.
"""
