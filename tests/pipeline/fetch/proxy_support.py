"""A real forward proxy on 127.0.0.1 for fetch tests: plain HTTP requests in absolute-URI form and CONNECT
tunnels (for https), on asyncio streams in a thread of its own.

Like a real proxy it resolves target names itself: `hosts` maps names to addresses (offline, nothing
else resolves), so a test can show a name the client never resolved. With `credentials`, a request
without the matching `Proxy-Authorization: Basic` header gets 407.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from urllib.parse import urlsplit


class ForwardProxy:
    """`with ForwardProxy() as proxy:` serves at `proxy.url`; `proxy.requests` lists (method, target)."""

    def __init__(self, hosts: dict[str, str] | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.hosts = hosts or {}
        self.credentials = credentials
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True when the client connection may carry another."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, _version = request_line.split(" ", 2)
        headers = dict(line.split(":", 1) for line in header_lines)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        self.requests.append((method, target))
        if not self._authorized(headers):
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
                         b"Content-Length: 0\r\n\r\n")  # fmt: skip
            await writer.drain()
            return True
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(self._resolve(host), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _pipe_both(reader, writer, upstream_reader, upstream_writer)
            return False
        await self._forward(method, target, headers, reader, writer)
        return False

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return headers.get("proxy-authorization") == f"Basic {expected}"

    def _resolve(self, host: str) -> str:
        return self.hosts.get(host, host)

    async def _forward(self, method, target, headers, reader, writer) -> None:
        parts = urlsplit(target)
        upstream_reader, upstream_writer = await asyncio.open_connection(self._resolve(parts.hostname),
                                                                         parts.port or 80)  # fmt: skip
        path = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
        kept = {k: v for k, v in headers.items() if not k.startswith("proxy-") and k != "connection"}
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in kept.items()), "Connection: close", "", ""]
        upstream_writer.write("\r\n".join(lines).encode("latin-1"))
        await upstream_writer.drain()
        with contextlib.suppress(ConnectionError):
            while chunk := await upstream_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        upstream_writer.close()


async def _pipe_both(a_reader, a_writer, b_reader, b_writer) -> None:
    async def pipe(reader, writer):
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    await asyncio.gather(pipe(a_reader, b_writer), pipe(b_reader, a_writer))
