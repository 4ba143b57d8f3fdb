"""Pieces shared by the exporter and the query service: web errors, serving, logs, config."""

__version__ = "0.1.0"
