"""API-key authentication: keys by `Authorization: Bearer` or `X-API-Key`, hashes in config.

Resources say what they need with a `permission` attribute: a permission name, `PUBLIC`, or
`AUTHENTICATED` (any valid key). `AuthMiddleware.process_resource` checks it after routing and
before the responder runs, so nothing about the request (a bad pid, a bad target) is looked at
before the key. Paths that match no route go to a sink that checks for a key before its 404.

The key itself is never stored or logged: it is hashed with SHA-256 and compared, in constant
time, against every configured hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any

import falcon

from query.config import ApiKey, Auth

PUBLIC = "public"
AUTHENTICATED = "authenticated"
KEY_PREFIX = "pfq_"
# Needed on top of process:read for `?expand=environ` (also asked by `expand=all`).
ENVIRON_PERMISSION = "process:read-environ"
CHALLENGE = 'Bearer realm="procfleet-query"'


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """The SHA-256 hex digest the configuration stores for `key`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Authenticator:
    """Finds the configured key a request presents and checks its permissions."""

    def __init__(self, auth: Auth) -> None:
        self.enabled = auth.enabled
        self._keys = tuple((bytes.fromhex(k.sha256), k) for k in auth.api_keys)

    def identify(self, presented: str) -> ApiKey | None:
        """The configured key whose hash matches, comparing against all of them."""
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for expected, key in self._keys:  # no early exit: the time does not depend on which
            if hmac.compare_digest(digest, expected):
                found = key
        return found

    def accepts(self, req: falcon.Request) -> bool:
        """Whether the request presents a known key (any permission): what gets it past the
        basic auth of a web configuration file (procfleet/basicauth.py)."""
        try:
            return self.identify(_presented_key(req)) is not None
        except falcon.HTTPUnauthorized:
            return False

    def check(self, req: falcon.Request, permission: str) -> None:
        """Raise 401 or 403 unless the request's key grants `permission`."""
        if not self.enabled or permission == PUBLIC:
            return
        presented = _presented_key(req)
        key = self.identify(presented)
        if key is None:
            raise falcon.HTTPUnauthorized(title="invalid API key",
                                          description="the API key is not known",
                                          challenges=[CHALLENGE])
        req.context.api_key = key.name
        if permission != AUTHENTICATED and permission not in key.permissions:
            raise falcon.HTTPForbidden(
                title="forbidden",
                description=f"this API key may not use {req.method} {req.path}; "
                            f"it needs the {permission} permission")


def _presented_key(req: falcon.Request) -> str:
    authorization = req.get_header("Authorization")
    api_key = req.get_header("X-API-Key")
    bearer = None
    if authorization is not None and authorization.strip().lower().startswith("basic "):
        # Basic credentials are the web configuration's (checked by its middleware); the
        # key then comes in X-API-Key.
        authorization = None
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise falcon.HTTPUnauthorized(
                title="API key required",
                description="the Authorization header must be 'Bearer <key>'",
                challenges=[CHALLENGE])
        bearer = credentials.strip()
    if bearer is not None and api_key is not None and not hmac.compare_digest(
            bearer.encode("utf-8"), api_key.strip().encode("utf-8")):
        raise falcon.HTTPUnauthorized(
            title="API key required",
            description="Authorization and X-API-Key hold different keys; send one",
            challenges=[CHALLENGE])
    key = bearer if bearer is not None else (api_key.strip() if api_key is not None else "")
    if not key:
        raise falcon.HTTPUnauthorized(
            title="API key required",
            description="send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            challenges=[CHALLENGE])
    return key


class AuthMiddleware:
    """Checks each routed request against its resource's `permission` before anything else."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        permission = getattr(resource, "permission", AUTHENTICATED)
        self.authenticator.check(req, permission)


class NotFoundSink:
    """Answers paths that match no route: 401 without a valid key, else 404."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def __call__(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        self.authenticator.check(req, AUTHENTICATED)
        if _SLASHED_TARGET.match(req.path):
            # A %2F in the target is decoded before routing: it is a bad target, not a path.
            raise falcon.HTTPBadRequest(
                title="invalid target",
                description="a target may not contain '/': use a host name, _any, _all or "
                            "key:value selectors")
        if _SLASHED_PID.match(req.path):
            raise falcon.HTTPBadRequest(
                title="invalid pid", description="pid must be decimal digits, without '/'")
        raise falcon.HTTPNotFound(title="not found",
                                  description=f"no such endpoint: {req.path[:200]}")


_SLASHED_PID = re.compile(r"^/node/[^/]+/process/[^/]*/.*$")
_SLASHED_TARGET = re.compile(r"^/node/[^/]*/.+/process(/[^/]*)?$")
