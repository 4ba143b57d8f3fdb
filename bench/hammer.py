"""Load for the hostile benchmarks and tests: N clients asking one path as fast as they can.

    python bench/hammer.py URL --clients 64 --seconds 5 [--max-requests 200000]

Each client is a thread with its own keep-alive connection (reopened when the server closes
it). Bounded in time and in count. Prints one JSON line: requests, answers by status, and the
error details seen by kind (numbers as #, the 20 commonest).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

_NUMBER = re.compile(r"[0-9]+([.:TZ-][0-9Z]+)*")


def hammer(url: str, *, clients: int, seconds: float, max_requests: int) -> dict:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    until = time.monotonic() + seconds
    statuses: Counter[int] = Counter()
    details: Counter[str] = Counter()
    lock = threading.Lock()
    budget = [max_requests]

    def client() -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < until:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                conn.request("GET", target)
                response = conn.getresponse()
                body = response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except OSError as exc:
                status, body = 0, str(exc).encode()
                if conn is not None:
                    conn.close()
                conn = None
            detail = ""
            if status != 200:
                try:
                    detail = str(json.loads(body).get("details", ""))
                except ValueError:
                    detail = body[:100].decode("latin-1")
            with lock:
                statuses[status] += 1
                if detail:
                    # One bucket per kind of detail: numbers and times as #.
                    details[_NUMBER.sub("#", detail)[:160]] += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    return {"requests": sum(statuses.values()), "statuses": dict(statuses),
            "details": dict(details.most_common(20))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    options = parser.parse_args()
    print(json.dumps(hammer(options.url, clients=options.clients, seconds=options.seconds,
                            max_requests=options.max_requests)), flush=True)


if __name__ == "__main__":
    main()
