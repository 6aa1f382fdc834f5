"""HTTPS as users need it, against real TLS servers on 127.0.0.1: the system's CAs by default, `SSL_CERT_FILE`
and `--ca-bundle` honoured, and every certificate a client must not trust failing as `tls-error`, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vilbert.pipeline.fetch import fetch_cc, read_failures
from vilbert.pipeline.fetch.network import Downloader, NetworkOptions

from .fetch_helpers import loopback_options, saved_rows
from .tls_support import Certificates, ImageServer, jpeg_bytes, make_certificates

IMAGES = 12


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def _no_inherited_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own SSL_CERT_* must not decide these tests (each sets what it means)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def _get(url: str, **options) -> object:
    async def main():
        network = NetworkOptions(allow_private_networks=True, retries=2, backoff_s=0.01, timeout_s=5, **options)
        async with Downloader(network) as downloader:
            return await downloader.get(url)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("which", "host", "trust_ca", "why"),
    [
        ("good", "127.0.0.1", False, "unable to get local issuer certificate"),  # system store: CA unknown
        ("wrong_host", "127.0.0.1", True, "IP address mismatch"),
        ("wrong_host", "localhost", True, "Hostname mismatch"),
        ("self_signed", "127.0.0.1", True, "self-signed certificate"),
    ],
)
def test_an_untrusted_certificate_is_a_tls_error_never_retried(certs, which, host, trust_ca, why) -> None:
    with ImageServer(getattr(certs, which)) as server:
        result = _get(f"https://{host}:{server.port}/img-1.jpg", ca_bundle=str(certs.ca) if trust_ca else None)
        assert result.reason == "tls-error", (result.reason, result.message)
        assert not result.transient and result.attempts == 1, "a certificate fails the same way every time"
        assert why in result.message and "--ca-bundle" in result.message
        assert not server.hits, "no request may go over a connection whose certificate failed"


def test_a_good_certificate_is_trusted_through_ca_bundle_or_ssl_cert_file(certs, monkeypatch) -> None:
    with ImageServer(certs.good) as server:
        for host in ("127.0.0.1", "localhost"):
            result = _get(f"https://{host}:{server.port}/img-3.jpg", ca_bundle=str(certs.ca))
            assert result.body == jpeg_bytes(3), (result.reason, result.message)
        monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))  # the system store, pointed at the test CA
        result = _get(f"https://127.0.0.1:{server.port}/img-4.jpg")
        assert result.body == jpeg_bytes(4), (result.reason, result.message)


def _tsv(path: Path, port: int) -> Path:
    path.write_text("".join(f"image {i}\thttps://127.0.0.1:{port}/img-{i}.jpg\n" for i in range(IMAGES)))
    return path


def test_fetch_saves_every_row_with_the_ca_bundle_and_none_without(certs, tmp_path) -> None:
    with ImageServer(certs.good) as server:
        tsv = _tsv(tmp_path / "list.tsv", server.port)
        report = fetch_cc(tsv, tmp_path / "trusted", loopback_options(network=_network(ca_bundle=str(certs.ca))))
        assert report["run"]["saved"] == IMAGES and report["run"]["failed"] == 0
        assert sorted(r["line"] for r in saved_rows(tmp_path / "trusted")) == list(range(1, IMAGES + 1))

        server.hits.clear()
        report = fetch_cc(tsv, tmp_path / "untrusted", loopback_options(network=_network()))
        assert report["run"]["failed_by_reason"] == {"tls-error": IMAGES}
        failures = read_failures(tmp_path / "untrusted").to_pylist()
        assert {(f["transient"], f["attempts"]) for f in failures} == {(False, 1)}
        assert report["total"]["retried_by_a_rerun"] == 0 and not server.hits


def _network(**kwargs) -> NetworkOptions:
    return NetworkOptions(allow_private_networks=True, timeout_s=5, backoff_s=0.01, **kwargs)


def test_cli_refuses_a_missing_or_bad_ca_bundle_before_fetching(tmp_path, capsys) -> None:
    from vilbert.cli.app import main

    tsv = tmp_path / "list.tsv"
    tsv.write_text("a\thttps://example.org/a.jpg\n")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    for bundle, says in ((tmp_path / "missing.pem", "no such file"), (not_pem, "not a PEM file")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fetch", "cc", "--tsv", str(tsv), "--out", str(tmp_path / "out"), "--ca-bundle", str(bundle)])
        assert exit_info.value.code == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
