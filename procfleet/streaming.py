"""What the query service's streamed answers and the CLI that reads them must agree on
(docs/api.md#streaming): the media type, and the head that says how many result lines come."""

from __future__ import annotations

NDJSON = "application/x-ndjson"
# The streamed answer's header: the number of exporters targeted, one result line each.
TARGETED_HEADER = "X-Procfleet-Targeted"
