"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit's file format.

The same file a node_exporter reads works here (docs/web-configuration.md of
prometheus/exporter-toolkit):

    tls_server_config:
      cert_file: server.crt                 # relative paths: from the file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
      client_ca_file: clients-ca.crt        # or client_ca: <inline PEM>
      client_allowed_sans: [scraper.example.net]
      min_version: TLS12                    # TLS10 .. TLS13
      max_version: TLS13
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # Go's names; TLS <= 1.2 only
      prefer_server_cipher_suites: true
      curve_preferences: [X25519]           # one curve: Python's ssl sets no list
    http_server_config:
      http2: true                           # accepted; answers are HTTP/1.1 either way
      headers: {X-Frame-Options: deny, Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      alice: $2y$10$...                     # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

What Python's ssl module cannot do is refused with a problem naming the key, never ignored:
inline `cert`/`key` (load_cert_chain reads files), client_auth_type RequestClientCert and
RequireAnyClientCert (a client certificate is either verified or not asked for), several
curves, `rate_limit`. Unlike the toolkit, the file is read once at start, not on every
request: a certificate that changes on disk takes a restart.

This module needs no web framework: the services' middleware is in procfleet.basicauth.
"""

from __future__ import annotations

import argparse
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from procfleet.configcheck import LocatedMapping, Problems, read_yaml

_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
_TLS_KEYS = {"cert_file", "key_file", "cert", "key", "client_auth_type", "client_ca_file",
             "client_ca", "client_allowed_sans", "min_version", "max_version", "cipher_suites",
             "prefer_server_cipher_suites", "curve_preferences"}
_HTTP_KEYS = {"http2", "headers"}
# What the toolkit refuses to configure, and the values it allows (None: any).
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_UNSUPPORTED = {
    "rate_limit": "is not supported by procfleet (its request deadline and connection limit "
                  "bound what a client can hold); remove it or rate-limit in a proxy",
    "cert": "inline certificates are not supported (Python's ssl loads them from files); "
            "use cert_file",
    "key": "inline keys are not supported (Python's ssl loads them from files); use key_file",
}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's names of the suites crypto/tls.CipherSuites() lists, as OpenSSL calls them. TLS 1.3
# suites are listed by Go too but cannot be chosen there (nor here): accepted, not applied.
CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}
# A bcrypt hash as htpasswd, Go and pyca/bcrypt write it: $2a$, $2b$ or $2y$, a two-digit
# cost, 22 characters of salt and 31 of hash.
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# RFC 7617: a user-id holds no colon and no control characters.
_USER = re.compile(r"[^:\x00-\x1f\x7f]{1,256}")
_SHOWN_USER = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True)
class ServerTLS:
    """`tls_server_config:`, with paths made absolute."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_ca: str | None = field(default=None, repr=False)  # inline PEM
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve: str | None = None  # Go's name

    def context(self) -> ssl.SSLContext:
        """A server SSLContext; ssl.SSLError or OSError when a file cannot be used."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = VERSIONS[self.min_version]
        context.maximum_version = VERSIONS[self.max_version]
        context.load_cert_chain(self.cert_file, self.key_file)
        context.verify_mode = CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=self.client_ca_file)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca)
        suites = [CIPHER_SUITES[name] for name in self.cipher_suites if CIPHER_SUITES[name]]
        if suites:
            context.set_ciphers(":".join(suites))
        if self.prefer_server_cipher_suites:
            context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        else:
            context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.curve is not None:
            context.set_ecdh_curve(CURVES[self.curve])
        # HTTP/1.1 only: a client offering h2 (Prometheus does) settles on http/1.1.
        context.set_alpn_protocols(["http/1.1"])
        return context

    def san_allowed(self, peer: Mapping[str, Any] | None) -> bool:
        """Whether a verified client certificate (`getpeercert()`) names an allowed SAN."""
        if not self.client_allowed_sans:
            return True
        if not peer:
            return False
        names = {str(value) for _, value in peer.get("subjectAltName", ())}
        return any(allowed in names for allowed in self.client_allowed_sans)


@dataclass(frozen=True)
class WebConfig:
    """A loaded web configuration file: TLS (with its context), users and extra headers."""

    tls: ServerTLS | None = None
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "none"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


def add_web_config_flag(parser: argparse.ArgumentParser) -> None:
    """`--web.config.file FILE`, as both services take it (as `args.web_config_file`)."""
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                        help="TLS and basic auth in the Prometheus exporter-toolkit's format "
                             "(the file a node_exporter reads; see docs/api.md)")


def load(path: str | Path) -> WebConfig:
    """Read and check a web configuration file; ConfigError lists every problem by key path.

    Certificates and keys are loaded here, so a missing or mismatched file is reported at
    start with the key that names it.
    """
    source = str(path)
    data = read_yaml(path)
    return parse(data, source=source, base_dir=Path(path).parent)


def parse(data: Any, *, source: str = "<web config>", base_dir: Path | None = None
          ) -> WebConfig:
    """Build a WebConfig from parsed YAML (ConfigError on any problem)."""
    problems = Problems()
    data = problems.top_mapping(data, source)
    _refuse_unsupported(problems, data, "")
    problems.unknown_keys({k: v for k, v in data.items() if k not in _UNSUPPORTED},
                          _TOP_KEYS, "")
    tls = _tls(problems, data.get("tls_server_config"), base_dir)
    headers = _http(problems, data.get("http_server_config"))
    users = _users(problems, data.get("basic_auth_users"))
    context = None
    if tls is not None and not problems.items:
        try:
            context = tls.context()
        except (ssl.SSLError, OSError) as exc:
            problems.add("tls_server_config", f"cannot use the certificate, key or CA files: "
                         f"{_ssl_reason(exc)} (cert_file {tls.cert_file}, key_file "
                         f"{tls.key_file}, client_ca_file {tls.client_ca_file})")
    problems.raise_if_any(source)
    return WebConfig(tls=tls, tls_context=context, users=MappingProxyType(users),
                     headers=MappingProxyType(headers), source=source)


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return str(exc)


def _refuse_unsupported(problems: Problems, data: Mapping[str, Any], path: str) -> None:
    for key, why in _UNSUPPORTED.items():
        if key in data and (key == "rate_limit") == (path == ""):
            problems.add(f"{path}.{key}" if path else key, why)


def _path(problems: Problems, data: Mapping[str, Any], key: str, path: str,
          base_dir: Path | None) -> str | None:
    value: str | None = problems.typed(data, key, str, None, path)
    if value is None:
        return None
    if not value.strip():
        problems.add(f"{path}.{key}", "must be a file name, got an empty string")
        return None
    if base_dir is not None and not Path(value).is_absolute():
        value = str(base_dir / value)
    if not Path(value).is_file():
        problems.add(f"{path}.{key}", f"no such file: {value}")
        return None
    return value


def _tls(problems: Problems, raw: Any, base_dir: Path | None) -> ServerTLS | None:
    path = "tls_server_config"
    data = problems.mapping(raw, path)
    if not data:
        return None
    _refuse_unsupported(problems, data, path)
    problems.unknown_keys(data, _TLS_KEYS, path)
    cert_file = _path(problems, data, "cert_file", path, base_dir)
    key_file = _path(problems, data, "key_file", path, base_dir)
    for key, value in (("cert_file", cert_file), ("key_file", key_file)):
        if value is None and key not in data:
            problems.add(f"{path}.{key}", "is required to serve TLS")
    auth = problems.typed(data, "client_auth_type", str, "NoClientCert", path)
    if auth in _UNVERIFIED_CLIENT_AUTH:
        problems.add(f"{path}.client_auth_type",
                     f"{auth} (a client certificate asked for but not verified) is not "
                     "supported; use RequireAndVerifyClientCert or VerifyClientCertIfGiven")
        auth = "NoClientCert"
    elif auth not in CLIENT_AUTH:
        problems.add(f"{path}.client_auth_type", f"must be one of {', '.join(CLIENT_AUTH)}, "
                     f"got {auth[:60]!r}")
        auth = "NoClientCert"
    ca_file = _path(problems, data, "client_ca_file", path, base_dir)
    ca_text = problems.typed(data, "client_ca", str, None, path)
    if ca_file is not None and ca_text is not None:
        problems.add(f"{path}.client_ca", "give client_ca or client_ca_file, not both")
    has_ca = ca_file is not None or ca_text is not None or "client_ca_file" in data
    if has_ca and auth == "NoClientCert" and "client_auth_type" not in data:
        problems.add(f"{path}.client_auth_type", "is required with a client CA (as in the "
                     "exporter-toolkit): RequireAndVerifyClientCert or VerifyClientCertIfGiven")
    elif auth != "NoClientCert" and not has_ca:
        problems.add(f"{path}.client_ca_file", f"is required with client_auth_type {auth}: "
                     "the CA that signs the clients' certificates")
    sans = _strings(problems, data, "client_allowed_sans", path)
    if sans and auth == "NoClientCert":
        problems.add(f"{path}.client_allowed_sans", "needs client_auth_type "
                     "RequireAndVerifyClientCert or VerifyClientCertIfGiven")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        versions[key] = problems.one_of(data, key, tuple(VERSIONS), default, path)
    if VERSIONS[versions["min_version"]] > VERSIONS[versions["max_version"]]:
        problems.add(f"{path}.min_version", f"{versions['min_version']} is above max_version "
                     f"{versions['max_version']}")
    suites = _strings(problems, data, "cipher_suites", path)
    for j, suite in enumerate(suites):
        if suite not in CIPHER_SUITES:
            problems.add(f"{path}.cipher_suites[{j}]", f"unknown or insecure cipher suite "
                         f"{suite[:80]!r} (Go's names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
    prefer = problems.typed(data, "prefer_server_cipher_suites", bool, True, path)
    curves = _strings(problems, data, "curve_preferences", path)
    for j, curve in enumerate(curves):
        if curve not in CURVES:
            problems.add(f"{path}.curve_preferences[{j}]", f"unknown curve {curve[:40]!r} "
                         f"(expected one of: {', '.join(CURVES)})")
    if len(curves) > 1:
        problems.add(f"{path}.curve_preferences", "list one curve: Python's ssl module sets "
                     "one, not an order of preference")
    if cert_file is None or key_file is None:
        return None
    return ServerTLS(
        cert_file=cert_file, key_file=key_file, client_auth_type=auth, client_ca_file=ca_file,
        client_ca=ca_text, client_allowed_sans=tuple(sans),
        min_version=versions["min_version"], max_version=versions["max_version"],
        cipher_suites=tuple(s for s in suites if s in CIPHER_SUITES),
        prefer_server_cipher_suites=prefer,
        curve=curves[0] if len(curves) == 1 and curves[0] in CURVES else None)


def _strings(problems: Problems, data: Mapping[str, Any], key: str, path: str) -> list[str]:
    values = problems.typed(data, key, list, [], path)
    kept = []
    for j, value in enumerate(values):
        if not isinstance(value, str) or not value:
            problems.add(f"{path}.{key}[{j}]", "must be a non-empty string")
        else:
            kept.append(value)
    return kept


def _http(problems: Problems, raw: Any) -> dict[str, str]:
    path = "http_server_config"
    data = problems.mapping(raw, path)
    problems.unknown_keys(data, _HTTP_KEYS, path)
    problems.typed(data, "http2", bool, True, path)
    headers = problems.mapping(data.get("headers"), f"{path}.headers")
    kept: dict[str, str] = {}
    for name, value in headers.items():
        where = f"{path}.headers.{name}" if isinstance(name, str) else f"{path}.headers"
        if name not in _HEADERS:
            problems.add(where, f"this header cannot be configured (expected one of: "
                         f"{', '.join(_HEADERS)})")
            continue
        if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
            problems.add(where, "must be a string on one line")
            continue
        allowed = _HEADERS[name]
        if allowed is not None and value not in allowed:
            problems.add(where, f"must be one of {', '.join(allowed)}, got {value[:40]!r}")
            continue
        if value:  # blank: unset, as in the toolkit
            kept[name] = value
    return kept


def _users(problems: Problems, raw: Any) -> dict[str, str]:
    path = "basic_auth_users"
    data = problems.mapping(raw, path)
    users: dict[str, str] = {}
    for index, (user, digest) in enumerate(data.items()):
        if isinstance(user, str) and _SHOWN_USER.fullmatch(user):
            where = f"{path}.{user}"
        else:  # a name is not a secret, but odd bytes are not echoed to a terminal either
            at = data.position(user) if isinstance(data, LocatedMapping) else None
            where = f"{path} (user {index + 1}{f' at line {at[0]}' if at else ''})"
        if not isinstance(user, str) or not _USER.fullmatch(user):
            problems.add(where, "a user name must be 1 to 256 characters without ':' or "
                         "control characters")
            continue
        # The hash is never quoted back: it is enough to guess the password offline.
        match = _BCRYPT.fullmatch(digest) if isinstance(digest, str) else None
        if match is None:
            problems.add(where, "must be a bcrypt hash ($2y$10$ and 53 characters; make one "
                         "with htpasswd -nBC 10 \"\" | tr -d ':\\n')")
            continue
        if not 4 <= int(match.group(1)) <= 31:
            problems.add(where, f"bcrypt cost must be 4 to 31, got {match.group(1)}")
            continue
        users[user] = digest
    return users
