"""The schemathesis fuzz loop that both services' reliability tests run over HTTP.

Kept apart from procfleet.testing because it needs the `test` extra (schemathesis,
hypothesis, requests); like it, no service imports it (tests/procfleet/test_layers.py checks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi import checks as oas

CASES = 500  # per operation and generation mode
SCHEMA_CHECKS = [oas.status_code_conformance, oas.content_type_conformance,
                 oas.response_schema_conformance, oas.response_headers_conformance]

# Generate only: no example database and a fixed seed (CI sees the same cases every run), and
# failures are collected and listed rather than shrunk, so one run shows every kind of bad answer.
FUZZ_SETTINGS = settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck), print_blob=False,
                         phases=[Phase.explicit, Phase.generate])

# (case, its generated headers, with credentials?, requests sent so far) -> extra headers for
# this call; it may also rewrite case.headers.
Authorize = Callable[[schemathesis.Case, dict[str, Any], bool, int], dict[str, str] | None]


@dataclass
class FuzzRun:
    """What one operation's fuzzing sent and saw."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.sent} requests, statuses {dict(sorted(self.statuses.items()))}"


def fuzz_operation(strategy: st.SearchStrategy[schemathesis.Case], *, base_url: str,
                   authorize: Authorize, protected: bool, negative: bool,
                   refused: Collection[int], timeout: float) -> FuzzRun:
    """Send every generated case twice, with credentials and without; collect bad answers.

    Bad: not as the document says (plus, for negative cases, invalid data accepted), any 5xx,
    a protected path answered without credentials, or valid credentials `refused`.
    """
    run = FuzzRun()
    checks = list(SCHEMA_CHECKS)
    if negative:
        checks.append(oas.negative_data_rejection)

    with requests.Session() as session:

        @FUZZ_SETTINGS
        @given(case=strategy)
        def send(case: schemathesis.Case) -> None:
            generated = dict(case.headers or {})
            for with_credentials in (True, False):
                extra = authorize(case, generated, with_credentials, run.sent)
                response = case.call(base_url=base_url, session=session, headers=extra,
                                     timeout=timeout)
                run.sent += 1
                run.statuses[response.status_code] += 1
                where = (f"{case.method} {case.formatted_path} query={case.query!r} "
                         f"credentials={with_credentials} -> {response.status_code}")
                try:
                    case.validate_response(response, checks=checks)
                except (AssertionError, BaseExceptionGroup) as exc:
                    run.failures.append(f"{where}: {exc}")
                if response.status_code >= 500:
                    run.failures.append(f"{where}: server error {response.text[:200]}")
                if not with_credentials and protected and response.status_code != 401:
                    run.failures.append(f"{where}: answered without credentials")
                if with_credentials and response.status_code in refused:
                    run.failures.append(f"{where}: refused valid credentials")

        send()
    return run
