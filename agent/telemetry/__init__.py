"""What the gateway saw: the flow log, the Prometheus exporter, hop latency."""
