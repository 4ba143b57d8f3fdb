"""Certificates made at test time (openssl CLI) for the TLS tests of both services."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from procfleet.testing import CertFiles, make_ca, make_cert

USER, PASSWORD = "alice", "correct horse"


@dataclass(frozen=True)
class TLSSet:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost, a client certificate
    it signed, and a second CA that signed nothing the services use."""

    dir: Path
    ca: CertFiles
    server: CertFiles
    client: CertFiles
    other_ca: CertFiles


@pytest.fixture(scope="session")
def tls_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSet]:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory / "ca", "procfleet test CA")
    yield TLSSet(dir=directory, ca=ca,
                 server=make_cert(ca, directory / "server", "server"),
                 client=make_cert(ca, directory / "client", "scraper",
                                  dns=("scraper.test",), ips=()),
                 other_ca=make_ca(directory / "other", "other CA"))


def password_hash(password: str = PASSWORD, cost: int = 4) -> str:
    """A bcrypt hash as htpasswd makes them ($2b$ here; $2y$ from htpasswd reads the same)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode("ascii")


def web_config_text(tls: TLSSet | None, *, users: dict[str, str] | None = None,
                    extra_tls: str = "", extra: str = "") -> str:
    """A --web.config.file in the exporter-toolkit's format."""
    lines = []
    if tls is not None:
        lines += ["tls_server_config:", f"  cert_file: {tls.server.cert}",
                  f"  key_file: {tls.server.key}"]
        lines += [f"  {line}" for line in extra_tls.splitlines() if line]
    if users:
        lines.append("basic_auth_users:")
        lines += [f"  {user}: {digest}" for user, digest in users.items()]
    return "\n".join(lines) + "\n" + extra
