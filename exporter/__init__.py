"""procfleet's per-host exporter: Prometheus process metrics and JSON PID lookups."""
