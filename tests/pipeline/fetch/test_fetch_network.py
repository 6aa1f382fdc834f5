"""The downloader against a real aiohttp server on 127.0.0.1: safety, deadlines, retries, caps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from aiohttp import web

from vilbert.pipeline.fetch.network import DEFAULT_USER_AGENT, Download, Downloader, NetworkOptions

from .fetch_helpers import BackgroundServer

JPEG = b"\xff\xd8\xff" + b"x" * 1000


class TinyServer(BackgroundServer):
    """A few routes with known behaviour on 127.0.0.1; counts requests."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter = Counter()
        self.user_agents: list[str] = []

    def routes(self) -> list[tuple[str, object]]:
        return [("127.0.0.1", self.handle)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        self.user_agents.append(request.headers.get("User-Agent", ""))
        if name == "ok":
            return web.Response(body=JPEG)
        if name == "missing":
            return web.Response(status=404)
        if name == "flaky":  # 500 twice, then fine
            return web.Response(status=500) if self.hits[name] <= 2 else web.Response(body=JPEG)
        if name == "busy":  # 429 once with Retry-After: 1
            return (
                web.Response(status=429, headers={"Retry-After": "1"})
                if self.hits[name] == 1
                else web.Response(body=JPEG)
            )
        if name == "huge":
            return web.Response(body=b"\xff\xd8\xff" + b"x" * 5000)
        if name == "robots":
            return web.Response(body=JPEG, headers={"X-Robots-Tag": "noindex, otherbot: noimageai"})
        if name == "loop":
            raise web.HTTPFound(location="/loop")
        if name == "to-ok":
            raise web.HTTPFound(location="ok")
        if name == "stall":  # headers, then nothing
            response = web.StreamResponse(headers={"Content-Length": "100000"})
            await response.prepare(request)
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self.stopping.wait()
            return response
        if name == "mute":  # never answers: no headers
            with contextlib.suppress(asyncio.CancelledError):
                await self.stopping.wait()
            return web.Response(status=500)
        if name == "trickle":  # a body that never ends, one byte at a time
            response = web.StreamResponse()
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                while not self.stopping.is_set():
                    await response.write(b"x")
                    await asyncio.sleep(0.05)
            return response
        return web.Response(status=400)

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{name}"


@pytest.fixture(scope="module")
def server() -> Iterator[TinyServer]:
    with TinyServer() as s:
        yield s


def get(url: str, **kwargs) -> tuple[Download, float]:
    options = NetworkOptions(**{"allow_private_networks": True, "backoff_s": 0.01, "timeout_s": 2.0, **kwargs})

    async def main() -> Download:
        async with Downloader(options) as downloader:
            return await downloader.get(url)

    start = time.monotonic()
    result = asyncio.run(main())
    return result, time.monotonic() - start


def test_ok_sends_the_user_agent(server: TinyServer) -> None:
    result, _ = get(server.url("ok"))
    assert result.body == JPEG and result.reason is None and result.attempts == 1
    assert server.user_agents[-1] == DEFAULT_USER_AGENT and "vilbert-fetch" in DEFAULT_USER_AGENT


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"])
def test_private_destinations_are_refused_by_default(server: TinyServer, host: str) -> None:
    before = sum(server.hits.values())
    result, _ = get(server.url("ok", host), allow_private_networks=False)
    assert result.reason == "private-address" and not result.transient
    assert "--allow-private-networks" in result.message and (
        "loopback" in result.message or "unspecified" in result.message
    )
    assert sum(server.hits.values()) == before, "nothing may reach the server"


def test_redirects_are_followed_and_checked_per_hop(server: TinyServer) -> None:
    result, _ = get(server.url("to-ok"))
    assert result.body == JPEG
    result, _ = get(server.url("loop"), max_redirects=3)
    assert result.reason == "too-many-redirects"


def test_unsupported_scheme() -> None:
    result, _ = get("ftp://example.com/a.jpg")
    assert result.reason == "unsupported-scheme" and not result.transient


def test_404_is_permanent_and_never_retried(server: TinyServer) -> None:
    result, _ = get(server.url("missing"), retries=3)
    assert (result.reason, result.status, result.attempts, result.transient) == ("http-404", 404, 1, False)
    assert server.hits["missing"] == 1


def test_5xx_is_retried_with_backoff(server: TinyServer) -> None:
    result, _ = get(server.url("flaky"), retries=2)
    assert result.body == JPEG and result.attempts == 3 and server.hits["flaky"] == 3


def test_429_honours_retry_after(server: TinyServer) -> None:
    result, elapsed = get(server.url("busy"))
    assert result.body == JPEG and result.attempts == 2 and elapsed >= 0.95


def test_byte_cap(server: TinyServer) -> None:
    result, _ = get(server.url("huge"), max_bytes=4096)
    assert result.reason == "too-many-bytes" and not result.transient


def test_opt_out_header_is_configurable(server: TinyServer) -> None:
    result, _ = get(server.url("robots"))
    assert result.reason == "opt-out" and "noimageai" in result.message
    result, _ = get(server.url("robots"), opt_out_tokens=())
    assert result.body == JPEG


@pytest.mark.parametrize("name", ["stall", "trickle"])
def test_body_deadline_costs_one_deadline(server: TinyServer, name: str) -> None:
    result, elapsed = get(server.url(name), timeout_s=1.0, retries=3)
    assert result.reason == "timeout" and result.transient, "a rerun retries it"
    assert result.attempts == 1 and server.hits[name] == 1, "a slow body is not retried within the run"
    assert result.message.startswith("body not complete within 1 s (")
    assert 0.9 <= elapsed < 2.0


def test_a_deadline_before_the_headers_is_retried(server: TinyServer) -> None:
    result, elapsed = get(server.url("mute"), timeout_s=0.5, retries=1)
    assert result.reason == "timeout" and result.transient and result.message == "no answer within 0.5 s"
    assert result.attempts == 2 and server.hits["mute"] == 2
    assert 1.0 <= elapsed < 2.5


def test_connection_refused_is_transient() -> None:
    result, _ = get("http://127.0.0.1:9/x.jpg", retries=1)
    assert result.reason == "connection-error" and result.transient and result.attempts == 2
