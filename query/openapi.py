"""The OpenAPI 3 document of the query service (`openapi.json` beside this module)."""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

import procfleet


@functools.cache
def _load() -> dict[str, Any]:
    text = resources.files("query").joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    document["info"]["version"] = procfleet.__version__
    return document


def document() -> dict[str, Any]:
    """A fresh copy of the document, with this release's version."""
    return copy.deepcopy(_load())
