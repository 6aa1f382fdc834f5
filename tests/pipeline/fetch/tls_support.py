"""Certificates for loopback HTTPS tests, made with the `openssl` command line (no Python package needed).

`make_certificates(dir)` writes a test CA and three server certificates: one the CA signs for `localhost`
and 127.0.0.1 (good), one the CA signs for another host name (wrong host), and one signed by itself
(self-signed). Elliptic-curve keys, so making them costs milliseconds.
"""

from __future__ import annotations

import io
import shutil
import ssl
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from .fetch_helpers import BackgroundServer

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_LEAF_EXTENSIONS = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {names}
"""
_CA_EXTENSIONS = [
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-addext", "subjectKeyIdentifier=hash",
]  # fmt: skip


@dataclass(frozen=True)
class Certificates:
    ca: Path
    """The test CA's certificate: the bundle clients trust."""
    good: tuple[Path, Path]
    """(certificate, key) the CA signed for localhost and 127.0.0.1."""
    wrong_host: tuple[Path, Path]
    """(certificate, key) the CA signed for elsewhere.example only."""
    self_signed: tuple[Path, Path]
    """(certificate, key) for localhost and 127.0.0.1, signed by its own key."""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed_leaf(directory: Path, name: str, names: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(_LEAF_EXTENSIONS.format(names=names))
    _openssl("req", *_KEY, "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr.name, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", ext.name, "-out", cert.name, cwd=directory)  # fmt: skip
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    """A test CA and the server certificates described in the module docstring, under `directory`."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=vilbert test CA", *_CA_EXTENSIONS, cwd=directory)  # fmt: skip
    good = _signed_leaf(directory, "good", "DNS:localhost, IP:127.0.0.1")
    wrong = _signed_leaf(directory, "wrong", "DNS:elsewhere.example")
    _openssl("req", "-x509", *_KEY, "-keyout", "self.key", "-out", "self.pem", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", cwd=directory)  # fmt: skip
    return Certificates(directory / "ca.pem", good, wrong, (directory / "self.pem", directory / "self.key"))


def server_context(cert_and_key: tuple[Path, Path]) -> ssl.SSLContext:
    """A server-side TLS context presenting `cert_and_key`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_and_key[0]), str(cert_and_key[1]))
    return context


def jpeg_bytes(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64 + i, 48), (20 * i % 256, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


class ImageServer(BackgroundServer):
    """Serves `/img-N.jpg` (`jpeg_bytes(N)`) over https with the given certificate, or over http without one;
    counts the requests that got through."""

    def __init__(self, cert_and_key: tuple[Path, Path] | None = None) -> None:
        super().__init__()
        self.ssl_context = None if cert_and_key is None else server_context(cert_and_key)
        self.hits: Counter = Counter()

    def routes(self):
        return [("127.0.0.1", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] += 1
        return web.Response(body=jpeg_bytes(int(name.removeprefix("img-").removesuffix(".jpg"))))
