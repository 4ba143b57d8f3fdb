"""Basic auth and response headers of a web configuration file, as falcon middleware.

How it combines with a service's own credentials (the exporter's bearer token, the query
service's API keys), in both services alike:

* With `basic_auth_users`, every path needs credentials, `/healthz` and `/` included, as
  with node_exporter. A request gets past with a configured user's password, or with the
  service's own credential (`accepts`), so clients that use a token today keep working.
* Past that, the service's own authorization applies unchanged: where a path needs a token
  or a key, a basic-auth user alone gets a 401. Adding users never opens anything.
  (On the query service the key then goes in `X-API-Key`, since `Authorization` holds the
  basic credentials.)

bcrypt is slow on purpose (~50-250 ms at cost 10-12), so checks run one at a time (as in the
exporter-toolkit: a flood of guesses uses one core, not all of them), and a password that
checked out is remembered as sha256(user, password) for CACHE_SECONDS in at most CACHE_SIZE
entries. Failures are not cached: guesses evicting good entries would slow everyone down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import bcrypt
import falcon

from procfleet.webconfig import WebConfig

log = logging.getLogger(__name__)

CACHE_SIZE = 1024
CACHE_SECONDS = 60.0
# How long a request waits for its turn at bcrypt before a 503: the request deadline of a
# worker thread, not forever.
CHECK_WAIT_SECONDS = 10.0
# bcrypt reads at most 72 bytes of a password; Go's CompareHashAndPassword (the toolkit)
# ignores the rest, so a hash made there matches here with the same long password.
BCRYPT_MAX_BYTES = 72
# A user that does not exist costs a bcrypt check all the same, so the time taken does not
# say which names exist. The hash of a random password, cost 10 as htpasswd makes them.
_DUMMY_HASH = b"$2b$10$pNjC66PkRf/CT4r681bGlOXd5u8/gdw9MMa3uctATSBoiGhHdIfxS"
REALM = "procfleet"


class Credentials:
    """Checks user and password against bcrypt hashes, with a bounded cache of successes."""

    def __init__(self, users: Mapping[str, str], *, cache_size: int = CACHE_SIZE,
                 cache_seconds: float = CACHE_SECONDS,
                 wait_seconds: float = CHECK_WAIT_SECONDS) -> None:
        self._users = {user: digest.encode("ascii") for user, digest in users.items()}
        self._cache: OrderedDict[bytes, float] = OrderedDict()  # key -> expiry (monotonic)
        self._cache_size = cache_size
        self._cache_seconds = cache_seconds
        self._wait_seconds = wait_seconds
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self.bcrypt_checks = 0  # how many times bcrypt ran (tests and metrics)

    def __len__(self) -> int:
        return len(self._cache)

    def check(self, user: str, password: bytes) -> bool:
        """True when `user` exists and `password` matches its hash.

        TimeoutError when other checks kept bcrypt busy for longer than `wait_seconds`.
        """
        digest = self._users.get(user)
        key = _cache_key(user, password, digest)
        now = time.monotonic()
        with self._cache_lock:
            expiry = self._cache.get(key)
            if expiry is not None:
                if expiry > now:
                    return True
                del self._cache[key]
        if not self._bcrypt_lock.acquire(timeout=self._wait_seconds):
            raise TimeoutError("password checks are busy")
        try:
            self.bcrypt_checks += 1
            matched = bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], digest or _DUMMY_HASH)
        except ValueError:  # a hash bcrypt cannot read: load() lets none through
            matched = False
        finally:
            self._bcrypt_lock.release()
        ok = matched and digest is not None
        if ok:
            with self._cache_lock:
                self._cache[key] = time.monotonic() + self._cache_seconds
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)  # the oldest
        return ok


def _cache_key(user: str, password: bytes, digest: bytes | None) -> bytes:
    # The hash is part of the key so a cached success never outlives a changed password.
    # Lengths first: no (user, password) pair can be spelled as another.
    hasher = hashlib.sha256()
    for part in (user.encode("utf-8"), password, digest or b""):
        hasher.update(len(part).to_bytes(4, "big"))
        hasher.update(part)
    return hasher.digest()


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) from an `Authorization: Basic ...` header, else None."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class BasicAuth:
    """Middleware: every request needs a configured user's password, or `accepts(req)`.

    `accepts` is the service's own check of its own credential (a bearer token, an API key);
    None when the service has none configured.
    """

    def __init__(self, credentials: Credentials, *,
                 accepts: Callable[[falcon.Request], bool] | None = None,
                 own_scheme: str | None = None) -> None:
        self.credentials = credentials
        self._accepts = accepts
        self._challenges = [f'Basic realm="{REALM}"'] + ([own_scheme] if own_scheme else [])

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        presented = parse_basic(req.get_header("Authorization"))
        if presented is not None:
            try:
                ok = self.credentials.check(*presented)
            except TimeoutError:
                raise falcon.HTTPServiceUnavailable(
                    title="service unavailable",
                    description="too many password checks at once; retry",
                    retry_after=1) from None
            if ok:
                req.context.basic_auth_user = presented[0]
                return
        elif self._accepts is not None and self._accepts(req):
            return
        raise falcon.HTTPUnauthorized(
            title="unauthorized",
            description="this service needs basic auth credentials"
                        + (" or its token" if self._accepts is not None else ""),
            challenges=self._challenges)


class ResponseHeaders:
    """Middleware: the file's `http_server_config.headers` on every answer, errors too."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        for name, value in self._headers.items():
            resp.set_header(name, value)


WebMiddleware = BasicAuth | ResponseHeaders


def web_middleware(web: WebConfig | None, *,
                   accepts: Callable[[falcon.Request], bool] | None = None,
                   own_scheme: str | None = None,
                   bearer_sha256: str | None = None) -> list[WebMiddleware]:
    """The middleware a web configuration asks for (none without a file).

    The service's own credential is `accepts(req)`, or a bearer token whose SHA-256 hex
    digest is `bearer_sha256` (the exporter's).
    """
    if web is None:
        return []
    if bearer_sha256 is not None:
        digest = bytes.fromhex(bearer_sha256)
        accepts, own_scheme = (lambda req: bearer_matches(req, digest)), "Bearer"
    middleware: list[WebMiddleware] = []
    if web.headers:
        middleware.append(ResponseHeaders(web.headers))
    if web.users:
        middleware.append(BasicAuth(Credentials(web.users), accepts=accepts,
                                    own_scheme=own_scheme))
    return middleware


def bearer_matches(req: falcon.Request, digest: bytes) -> bool:
    """Whether `Authorization: Bearer <token>` holds the token whose SHA-256 is `digest`."""
    scheme, _, token = (req.get_header("Authorization") or "").strip().partition(" ")
    presented = hashlib.sha256(token.strip().encode()).digest()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, digest)
