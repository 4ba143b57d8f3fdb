"""procfleet query service: find processes across a fleet of exporters (see app.py for routes)."""
