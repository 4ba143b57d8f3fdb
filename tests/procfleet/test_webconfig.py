"""--web.config.file: the exporter-toolkit's format, what maps onto Python's ssl and what is
refused (every problem at once, by key path), and basic auth as middleware of both apps."""

from __future__ import annotations

import ssl
from pathlib import Path

import falcon.testing
import pytest
from tls_fixtures import PASSWORD, USER, TLSSet, password_hash, web_config_text

from exporter import config as exporter_config
from exporter.app import create_app as create_exporter_app
from exporter.config import Config as ExporterConfig
from procfleet.basicauth import BCRYPT_MAX_BYTES, Credentials, parse_basic
from procfleet.configcheck import ConfigError
from procfleet.testing import basic_auth_header
from procfleet.webconfig import WebConfig, load, parse
from query import config as query_config
from query.app import create_app as create_query_app
from query.auth import key_hash


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


# -- loading --------------------------------------------------------------------------------

def test_a_node_exporter_file_loads_with_relative_paths(tls_set: TLSSet, tmp_path: Path) -> None:
    # The toolkit's docs/web-config.yml, with the file names relative to the file.
    for files in (tls_set.server, tls_set.ca):
        for name in (files.cert, files.key):
            (tmp_path / name.name).write_bytes(name.read_bytes())
    digest = password_hash()
    web = load(write(tmp_path, f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: VerifyClientCertIfGiven
  client_ca_file: {tls_set.ca.cert.name}
  min_version: TLS12
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  prefer_server_cipher_suites: true
  curve_preferences: [CurveP256]
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
    Content-Security-Policy: ""
basic_auth_users:
  {USER}: {digest}
"""))
    assert web.tls is not None and web.tls.cert_file == str(tmp_path / "server.crt")
    assert web.scheme == "https"
    assert isinstance(web.tls_context, ssl.SSLContext)
    assert web.tls_context.verify_mode == ssl.CERT_OPTIONAL
    assert web.tls_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert dict(web.headers) == {"X-Frame-Options": "deny"}  # blank: unset, as the toolkit
    assert dict(web.users) == {USER: digest}


def test_an_empty_file_serves_plain_http_without_auth(tmp_path: Path) -> None:
    web = load(write(tmp_path, ""))
    assert web.tls is None and web.tls_context is None and not web.users
    assert web.scheme == "http"


def test_every_problem_is_reported_at_once_with_its_key(tls_set: TLSSet,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load(write(tmp_path, f"""
tls_server_config:
  cert_file: {tls_set.server.cert}
  key_file: {tmp_path}/missing.key
  cert: "-----BEGIN CERTIFICATE-----"
  client_auth_type: RequireAnyClientCert
  min_version: TLS14
  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]
  curve_preferences: [X25519, CurveP256]
  client_allowed_sans: [scraper.test]
http_server_config:
  headers: {{X-Powered-By: me, X-Frame-Options: allow}}
  http3: true
basic_auth_users:
  alice: not-a-hash
  "bad:name": {password_hash()}
rate_limit: {{interval: 1s, burst: 20}}
lisen: x
"""))
    problems = raised.value.problems
    text = "\n".join(problems)
    for expected in (
        "tls_server_config.key_file: no such file",
        "tls_server_config.cert: inline certificates are not supported",
        "tls_server_config.client_auth_type: RequireAnyClientCert",
        "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13",
        "tls_server_config.cipher_suites[0]: unknown or insecure cipher suite",
        "tls_server_config.curve_preferences: list one curve",
        "tls_server_config.client_allowed_sans: needs client_auth_type",
        "http_server_config.headers.X-Powered-By: this header cannot be configured",
        "http_server_config.headers.X-Frame-Options: must be one of deny, sameorigin",
        "http_server_config.http3: unknown key",
        "basic_auth_users.alice: must be a bcrypt hash",
        "basic_auth_users (user 2 at line 16): a user name must be",
        "rate_limit: is not supported",
        "lisen: unknown key",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert "not-a-hash" not in text  # a hash (or what stands for one) is never echoed


def test_a_key_that_does_not_match_its_certificate_is_named(tls_set: TLSSet,
                                                            tmp_path: Path) -> None:
    text = web_config_text(None) + (f"tls_server_config:\n  cert_file: {tls_set.server.cert}\n"
                                    f"  key_file: {tls_set.client.key}\n")
    with pytest.raises(ConfigError) as raised:
        load(write(tmp_path, text))
    assert raised.value.problems[0].startswith("tls_server_config: cannot use the certificate")
    assert "KEY_VALUES_MISMATCH" in raised.value.problems[0]


def test_a_client_ca_needs_an_auth_type_and_verification_needs_a_ca(tls_set: TLSSet) -> None:
    base = {"cert_file": str(tls_set.server.cert), "key_file": str(tls_set.server.key)}
    with pytest.raises(ConfigError, match="client_auth_type: is required with a client CA"):
        parse({"tls_server_config": {**base, "client_ca_file": str(tls_set.ca.cert)}})
    with pytest.raises(ConfigError, match="client_ca_file: is required with client_auth_type"):
        parse({"tls_server_config": {**base, "client_auth_type": "RequireAndVerifyClientCert"}})
    with pytest.raises(ConfigError, match="cert_file: is required"):
        parse({"tls_server_config": {"key_file": str(tls_set.server.key)}})


# -- credentials ----------------------------------------------------------------------------

def test_credentials_check_bcrypt_and_cache_only_successes() -> None:
    credentials = Credentials({USER: password_hash()})
    assert credentials.check(USER, PASSWORD.encode())
    assert credentials.check(USER, PASSWORD.encode())
    assert credentials.bcrypt_checks == 1  # the second came from the cache
    assert not credentials.check(USER, b"wrong")
    assert not credentials.check(USER, b"wrong")
    assert credentials.bcrypt_checks == 3  # failures are checked every time
    assert len(credentials) == 1


def test_an_unknown_user_costs_a_bcrypt_check_too() -> None:
    credentials = Credentials({USER: password_hash()})
    assert not credentials.check("mallory", PASSWORD.encode())
    assert credentials.bcrypt_checks == 1  # the time does not tell which names exist


def test_the_cache_is_bounded_in_entries_oldest_first() -> None:
    users = {f"user{i}": password_hash(f"pw{i}") for i in range(3)}
    credentials = Credentials(users, cache_size=2)
    for i in range(3):
        assert credentials.check(f"user{i}", f"pw{i}".encode())
    assert len(credentials) == 2
    checks = credentials.bcrypt_checks
    assert credentials.check("user2", b"pw2") and credentials.bcrypt_checks == checks
    assert credentials.check("user0", b"pw0") and credentials.bcrypt_checks == checks + 1


def test_a_cached_success_expires() -> None:
    credentials = Credentials({USER: password_hash()}, cache_seconds=0.0)
    assert credentials.check(USER, PASSWORD.encode())
    assert credentials.check(USER, PASSWORD.encode())
    assert credentials.bcrypt_checks == 2


def test_passwords_past_72_bytes_compare_as_go_does() -> None:
    # Go's bcrypt reads 72 bytes of a password; a hash made there must match here.
    long = b"x" * BCRYPT_MAX_BYTES
    credentials = Credentials({USER: password_hash(long.decode())})
    assert credentials.check(USER, long + b"anything after")
    assert not credentials.check(USER, long[:-1])


@pytest.mark.parametrize("header, expected", [
    ("Basic YWxpY2U6c2VjcmV0", ("alice", b"secret")),
    ("basic   YWxpY2U6OnM=", ("alice", b":s")),  # a colon in the password is the password's
    ("Basic YWxpY2U=", None),  # no colon
    ("Basic !!!", None),
    ("Bearer YWxpY2U6c2VjcmV0", None),
    (None, None),
])
def test_parse_basic(header: str | None, expected: tuple[str, bytes] | None) -> None:
    assert parse_basic(header) == expected


# -- middleware in both apps ----------------------------------------------------------------

def web_with_user() -> WebConfig:
    return parse({"basic_auth_users": {USER: password_hash()},
                  "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}}})


def exporter_client(token: str | None = None) -> falcon.testing.TestClient:
    config = ExporterConfig() if token is None else exporter_config.from_mapping(
        {"auth": {"token_sha256": key_hash(token)}})
    return falcon.testing.TestClient(create_exporter_app(config, web=web_with_user()))


GOOD = basic_auth_header(USER, PASSWORD)
WRONG = basic_auth_header(USER, "wrong")


@pytest.mark.parametrize("path", ["/", "/healthz", "/metrics", "/process/1", "/nowhere"])
def test_exporter_basic_auth_guards_every_path(path: str) -> None:
    client = exporter_client()
    for headers in ({}, WRONG, {"Authorization": "Bearer nothing"}):
        answer = client.simulate_get(path, headers=headers)
        assert answer.status_code == 401, (path, headers)
        assert answer.headers["WWW-Authenticate"].startswith('Basic realm="procfleet"')
        assert answer.json["code"] == 401
        assert answer.headers["X-Content-Type-Options"] == "nosniff"  # errors get them too
    answer = client.simulate_get(path, headers=GOOD)
    assert answer.status_code != 401
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_exporter_token_passes_the_gate_and_still_guards_what_it_guards() -> None:
    client = exporter_client(token="s3cret-token")
    bearer = {"Authorization": "Bearer s3cret-token"}
    assert client.simulate_get("/metrics", headers=bearer).status_code == 200
    assert client.simulate_get("/healthz", headers=bearer).status_code == 200
    # Basic alone opens what the token does not guard, and nothing it guards.
    assert client.simulate_get("/healthz", headers=GOOD).status_code == 200
    assert client.simulate_get("/metrics", headers=GOOD).status_code == 401
    assert client.simulate_get("/healthz").status_code == 401


def query_client() -> tuple[falcon.testing.TestClient, str]:
    key = "pfq_test-key-for-basic-auth"
    config = query_config.parse({
        "auth": {"enabled": True, "api_keys": [
            {"name": "grafana", "sha256": key_hash(key), "permissions": ["node:read"]}]},
        "exporters": [{"hostname": "web-01", "url": "http://127.0.0.1:9"}]})
    return falcon.testing.TestClient(create_query_app(config, web=web_with_user())), key


def test_query_basic_auth_guards_even_public_paths_and_keys_still_apply() -> None:
    client, key = query_client()
    assert client.simulate_get("/healthz").status_code == 401
    assert client.simulate_get("/healthz", headers=WRONG).status_code == 401
    assert client.simulate_get("/healthz", headers=GOOD).status_code == 200
    # A basic-auth user alone is not an API key: /node needs node:read.
    assert client.simulate_get("/node", headers=GOOD).status_code == 401
    assert client.simulate_get("/node", headers={**GOOD, "X-API-Key": key}).status_code == 200
    # The key alone gets past the gate, as clients of today send it.
    assert client.simulate_get("/node", headers={"X-API-Key": key}).status_code == 200
    assert client.simulate_get(
        "/node", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.simulate_get("/node", headers={"X-API-Key": "pfq_unknown"}).status_code == 401
