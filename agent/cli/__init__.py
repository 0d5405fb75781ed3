"""The click commands (`bulkhead ...`), their rendering, and `bulkhead top`."""
