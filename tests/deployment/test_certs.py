"""scripts/make_certs.sh: a CA and a SuperLink certificate that strict TLS clients accept for the listed names."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def make(out: Path, *names: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "make_certs.sh"
    return subprocess.run(["bash", str(script), str(out), *names], capture_output=True, text=True)


def handshake(certs: Path, server_hostname: str) -> None:
    """A TLS handshake over a socket pair: server with server.crt/key, client trusting only ca.crt, strict."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            c.sendall(b"x")
    finally:
        thread.join(10)


def test_certificates_are_valid_for_loopback_and_the_given_names(tmp_path):
    out = tmp_path / "certs"
    proc = make(out, "superlink.example.org", "10.1.2.3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert (out / "server.key").stat().st_mode & 0o077 == 0 and (out / "ca.key").stat().st_mode & 0o077 == 0
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    for san in ("IP Address:127.0.0.1", "DNS:localhost", "DNS:superlink.example.org", "IP Address:10.1.2.3"):
        assert san in text
    for name in ("127.0.0.1", "localhost", "superlink.example.org", "10.1.2.3"):
        handshake(out, name)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|doesn't match"):
        handshake(out, "other.example.org")


def test_existing_certificates_are_not_overwritten(tmp_path):
    out = tmp_path / "certs"
    assert make(out).returncode == 0
    before = (out / "ca.key").read_bytes()
    proc = make(out)
    assert proc.returncode == 1 and "exists" in proc.stderr
    assert (out / "ca.key").read_bytes() == before
