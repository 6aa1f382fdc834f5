"""fetch through a real forward proxy on 127.0.0.1: `--proxy`, `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, CONNECT for
https, proxy credentials, and the address policy, which with a proxy can judge only address literals."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from vilbert.errors import UsageError
from vilbert.pipeline.fetch import fetch_cc
from vilbert.pipeline.fetch.network import Downloader, NetworkOptions
from vilbert.pipeline.fetch.proxies import ProxyChoice, redact_proxy

from .fetch_helpers import loopback_options, saved_rows
from .proxy_support import ForwardProxy
from .tls_support import ImageServer, jpeg_bytes, make_certificates


def _get(url: str, **options):
    async def main():
        network = NetworkOptions(**{"allow_private_networks": True, "retries": 1, "backoff_s": 0.01,
                                    "timeout_s": 5, **options})  # fmt: skip
        async with Downloader(network) as downloader:
            return await downloader.get(url)

    return asyncio.run(main())


def test_http_through_proxy_option_and_http_proxy_variable(monkeypatch) -> None:
    with ImageServer() as server, ForwardProxy() as proxy:
        url = f"http://127.0.0.1:{server.port}/img-1.jpg"
        assert _get(url, proxy=proxy.url).body == jpeg_bytes(1)
        assert proxy.requests == [("GET", url)], "an absolute-URI request to the proxy"
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert _get(url).body == jpeg_bytes(1)
        assert len(proxy.requests) == 2 and server.hits["img-1.jpg"] == 2


def test_https_through_connect_from_https_proxy_variable(monkeypatch, tmp_path) -> None:
    certs = make_certificates(tmp_path / "certs")
    with ImageServer(certs.good) as server, ForwardProxy() as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)
        result = _get(f"https://localhost:{server.port}/img-2.jpg", ca_bundle=str(certs.ca))
        assert result.body == jpeg_bytes(2), (result.reason, result.message)
        assert proxy.requests == [("CONNECT", f"localhost:{server.port}")], "TLS end to end through a tunnel"


def test_no_proxy_goes_direct(monkeypatch) -> None:
    with ImageServer() as server, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
        assert _get(f"http://127.0.0.1:{server.port}/img-3.jpg").body == jpeg_bytes(3)
        assert _get(f"http://127.0.0.1:{server.port}/img-3.jpg", proxy=proxy.url).body == jpeg_bytes(3)
        assert proxy.requests == [] and server.hits["img-3.jpg"] == 2


def test_with_the_policy_on_the_proxy_resolves_names_and_literals_are_still_refused() -> None:
    with ImageServer() as server, ForwardProxy(hosts={"images.example": "127.0.0.1"}) as proxy:
        # A name: the proxy resolves it (here to loopback, which the policy would refuse if it could see it).
        # The proxy itself is on loopback: the user chose it, so the socket to it is allowed.
        named = f"http://images.example:{server.port}/img-4.jpg"
        result = _get(named, proxy=proxy.url, allow_private_networks=False)
        assert result.body == jpeg_bytes(4), (result.reason, result.message)
        # Literals are judged before anything is sent: never handed to the proxy, the proxy's own address included.
        literals = (f"http://127.0.0.1:{server.port}/img-4.jpg", "http://10.0.0.1/a.jpg",
                    f"http://[::ffff:127.0.0.1]:{server.port}/a.jpg", f"http://localhost:{proxy.port}/")  # fmt: skip
        for literal in literals:
            refused = _get(literal, proxy=proxy.url, allow_private_networks=False)
            assert refused.reason == "private-address", (literal, refused.reason, refused.message)
        assert proxy.requests == [("GET", named)]


def test_proxy_failures_are_proxy_errors() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]  # bound, never listening: connections are refused
        down = _get("http://images.example/a.jpg", proxy=f"http://127.0.0.1:{closed}")
    assert down.reason == "proxy-error" and down.transient and down.attempts == 2, (down.reason, down.message)
    with ImageServer() as server, ForwardProxy(credentials=("ann", "s3cret")) as proxy:
        url = f"http://127.0.0.1:{server.port}/img-5.jpg"
        refused = _get(url, proxy=proxy.url)
        assert refused.status == 407 and not refused.transient and refused.attempts == 1
        authorized = _get(url, proxy=f"http://ann:s3cret@127.0.0.1:{proxy.port}")
        assert authorized.body == jpeg_bytes(5), (authorized.reason, authorized.message)


def test_fetch_through_an_authenticated_proxy_saves_every_row_and_keeps_the_password_out(tmp_path) -> None:
    with ImageServer() as server, ForwardProxy(credentials=("ann", "s3cret")) as proxy:
        tsv = tmp_path / "list.tsv"
        tsv.write_text("".join(f"image {i}\thttp://127.0.0.1:{server.port}/img-{i}.jpg\n" for i in range(8)))
        network = NetworkOptions(allow_private_networks=True, timeout_s=5, proxy=f"http://ann:s3cret@{proxy.url[7:]}")
        report = fetch_cc(tsv, tmp_path / "out", loopback_options(network=network))
    assert report["run"]["saved"] == 8 and len(saved_rows(tmp_path / "out")) == 8
    assert len(proxy.requests) == 8 and sum(server.hits.values()) == 8
    text = (tmp_path / "out" / "fetch-report.json").read_text()
    assert "s3cret" not in text and json.loads(text)["options"]["network"]["proxy"].startswith("http://ann:***@")


def test_proxy_urls_are_checked_and_redacted() -> None:
    assert ProxyChoice.from_environment("127.0.0.1:3128").explicit.scheme == "http"  # curl's bare host:port
    for bad in ("socks5://127.0.0.1:1080", "http://:3128", "http://127.0.0.1:99999"):
        with pytest.raises(UsageError, match="--proxy"):
            ProxyChoice.from_environment(bad)
    with pytest.raises(UsageError, match="HTTPS_PROXY"):
        ProxyChoice.from_environment(None, {"HTTPS_PROXY": "ftp://proxy:21"})
    env = {"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2", "NO_PROXY": ".internal"}
    choice = ProxyChoice.from_environment(None, env)
    from yarl import URL

    assert choice.for_url(URL("http://a.example/x")) == URL("http://lower:2"), "lower case wins, as in curl"
    assert choice.for_url(URL("http://img.internal/x")) is None and choice.for_url(URL("https://a.example/")) is None
    assert redact_proxy("http://u:pw@h:1") == "http://u:***@h:1" and redact_proxy("http://h:1") == "http://h:1"


def test_cli_refuses_a_bad_proxy_before_fetching(tmp_path, capsys) -> None:
    from vilbert.cli.app import main

    tsv = tmp_path / "list.tsv"
    tsv.write_text("a\thttp://example.org/a.jpg\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch", "cc", "--tsv", str(tsv), "--out", str(tmp_path / "out"), "--proxy", "socks5://h:1"])
    assert exit_info.value.code == 2 and "--proxy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
