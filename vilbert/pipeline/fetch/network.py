"""The HTTP side of fetch: one aiohttp session, deadlines, retries, byte caps and destination checks.

`Downloader.get(url)` never raises for anything the network or the server does: it returns a
`Download` that holds either the body or a failure `reason` (a short, stable label counted in the
report), the HTTP status, a message, and whether the failure is transient (worth retrying later).

Policy:
- **Deadline**: `timeout_s` bounds one attempt as a whole - connect, every redirect hop, headers and
  the full body - not each socket read, so a trickling or stalled body cannot hold a slot longer.
  A deadline hit before the headers arrived is retried; one hit while reading the body is not (it
  would cost another full deadline) but is recorded as transient, so a rerun retries it.
- **Retries**: timeouts, connection errors, 5xx, 408 and 429 are transient and retried up to
  `retries` times with exponential backoff and full jitter; 429/503 honour `Retry-After` (up to
  `max_retry_after_s`). 404 and every other answer are permanent and never retried.
- **Safety**: http and https only; redirects are followed by hand so every hop is checked; unless
  `allow_private_networks`, a destination that is or resolves to a loopback, private, link-local,
  multicast, reserved or unspecified address is refused (`private-address`); every address a name
  resolves to is checked, in the resolver the connector uses, so DNS rebinding cannot slip through.
- **Opt-out**: an `X-Robots-Tag` header naming one of `opt_out_tokens` (default `noai`,
  `noimageai`) means the image is not saved (`opt-out`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket
import sys
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time as wall_time
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

import vilbert

__all__ = ["NetworkOptions", "Download", "Downloader", "DEFAULT_USER_AGENT", "TRANSIENT_REASONS"]

DEFAULT_USER_AGENT = (
    f"vilbert-fetch/{vilbert.__version__} (image-text dataset download for research; "
    "honours X-Robots-Tag noai/noimageai)"
)
_REDIRECTS = (301, 302, 303, 307, 308)
TRANSIENT_REASONS = frozenset({"timeout", "connection-error", "connection-reset", "dns-error", "truncated"})
"""Failure reasons (besides `http-5xx`, `http-408`, `http-429`) a rerun retries."""


@dataclass(frozen=True, kw_only=True)
class NetworkOptions:
    """How fetch talks to servers."""

    max_in_flight: int = 512
    """Requests open at once: enough to hide 300+ ms of latency at several hundred images/s."""
    per_host: int = 32
    """Requests open at once to one host: polite, and still fast on big CDNs. 0: no limit."""
    timeout_s: float = 10.0
    """Deadline of one attempt as a whole: connect, redirects, headers and body."""
    connect_timeout_s: float = 5.0
    retries: int = 2
    """Extra attempts for transient failures (so up to 3 attempts)."""
    backoff_s: float = 0.5
    """First backoff; doubles per attempt, with full jitter."""
    max_retry_after_s: float = 60.0
    """A longer `Retry-After` is not waited for: the URL fails (transient) and a rerun retries it."""
    max_bytes: int = 16 * 1024 * 1024
    """Larger bodies are cut off and fail as `too-many-bytes`."""
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    allow_private_networks: bool = False
    """Fetch from loopback/private/link-local addresses too (tests, local mirrors)."""
    opt_out_tokens: tuple[str, ...] = ("noai", "noimageai")
    """X-Robots-Tag directives that mean "do not use for AI"; empty to ignore the header."""
    dns_cache_ttl_s: int = 300

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; valid: >= 1")
        for name in ("per_host", "retries", "max_redirects", "backoff_s", "max_retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; valid: >= 0")
        for name in ("timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; valid: > 0")
        object.__setattr__(self, "opt_out_tokens", tuple(t.lower() for t in self.opt_out_tokens))


@dataclass(slots=True)
class Download:
    """The result of one URL: `body` on success, else `reason` (and `status` for HTTP answers)."""

    url: str
    body: bytes | None = None
    reason: str | None = None
    status: int | None = None
    message: str = ""
    transient: bool = False
    attempts: int = 0
    seconds: float = 0.0
    """Time spent on the URL: its attempts and the waits between them (not waiting for a busy host)."""


class _Failure(Exception):
    """Ends an attempt with a reason; raised and caught inside this module only."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        transient: bool = False,
        retry: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason, self.status, self.transient = reason, status, transient
        self.retry = transient if retry is None else retry
        self.retry_after = retry_after


def _forbidden_address(address: str) -> str | None:
    """Why `address` may not be fetched from by default, or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


def _refusal(host: str, address: str, kind: str) -> _Failure:
    shown = host if host == address else f"{host} ({address})"
    return _Failure(
        "private-address",
        f"refused {shown}: a {kind} address; pass --allow-private-networks to fetch from private networks",
    )


class _CheckingResolver(AbstractResolver):
    """The default resolver, refusing names with any loopback/private/... address."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            kind = _forbidden_address(info["host"])
            if kind is not None:
                raise _RefusedAddress(_refusal(host, info["host"], kind))
        return infos

    async def close(self) -> None:
        await self._inner.close()


class _RefusedAddress(OSError):
    """An OSError so aiohttp wraps it (in ClientConnectorDNSError) instead of crashing."""

    def __init__(self, failure: _Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class Downloader:
    """One aiohttp session for a whole run; use as `async with Downloader(options) as d`."""

    def __init__(self, options: NetworkOptions) -> None:
        self.options = options
        self._session: aiohttp.ClientSession | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def __aenter__(self) -> Downloader:
        opts = self.options
        connector = aiohttp.TCPConnector(
            limit=opts.max_in_flight,
            limit_per_host=0,  # per-host waiting happens before the deadline starts (see get)
            ttl_dns_cache=opts.dns_cache_ttl_s,
            resolver=None if opts.allow_private_networks else _CheckingResolver(),
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=opts.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": opts.user_agent, "Accept": "image/*,*/*;q=0.5"},
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, url: str) -> Download:
        """Fetch `url` with retries; never raises for network or server behaviour."""
        result = Download(url)
        await self._attempts(url, result)
        return result

    async def _attempts(self, url: str, result: Download) -> None:
        for attempt in range(self.options.retries + 1):
            result.attempts = attempt + 1
            reading = [False]  # set once headers are in: a deadline then means a slow body
            try:
                async with self._host_slot(url):  # waiting for a busy host does not count as time spent
                    started = time.monotonic()
                    try:
                        result.body = await _with_deadline(self._attempt(url, reading), self.options.timeout_s)
                    finally:
                        result.seconds += time.monotonic() - started
                result.reason = result.status = None
                result.message, result.transient = "", False
                return
            except _Failure as failure:
                _record(result, failure)
                retry, retry_after = failure.retry, failure.retry_after
            except asyncio.TimeoutError:
                _record(
                    result,
                    _Failure("timeout", f"no complete answer within {self.options.timeout_s:g} s", transient=True),
                )
                retry, retry_after = not reading[0], None
            if not retry or attempt == self.options.retries:
                break
            delay = self._backoff(attempt, retry_after)
            if delay is None:
                break
            await asyncio.sleep(delay)
            result.seconds += delay

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        if retry_after is not None:
            return retry_after if retry_after <= self.options.max_retry_after_s else None
        return random.uniform(0, self.options.backoff_s * 2**attempt)

    def _host_slot(self, url: str) -> asyncio.Semaphore | _NoLimit:
        if not self.options.per_host:
            return _NO_LIMIT
        host = urlsplit(url).hostname or ""
        slot = self._hosts.get(host)
        if slot is None:
            if len(self._hosts) > 100_000:  # forget idle hosts so a huge list cannot grow this forever
                self._hosts = {h: s for h, s in self._hosts.items() if s.locked()}
            slot = self._hosts[host] = asyncio.Semaphore(self.options.per_host)
        return slot

    async def _attempt(self, url: str, reading: list[bool]) -> bytes:
        """One attempt, following redirects; returns the body or raises `_Failure`."""
        assert self._session is not None, "use Downloader as an async context manager"
        current = url
        for _hop in range(self.options.max_redirects + 1):
            self._check_url(current)
            try:
                async with self._session.get(current, allow_redirects=False) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        current = urljoin(current, response.headers["Location"])
                        continue
                    return await self._read(response, reading)
            except aiohttp.ClientError as err:
                raise _classify(err) from err
        raise _Failure("too-many-redirects", f"more than {self.options.max_redirects} redirects, last {current}")

    def _check_url(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as err:
            raise _Failure("bad-url", f"cannot parse URL {url!r}: {err}") from err
        if parts.scheme not in ("http", "https"):
            raise _Failure("unsupported-scheme", f"scheme {parts.scheme!r} of {url!r}; only http and https")
        if not host:
            raise _Failure("bad-url", f"no host in URL {url!r}")
        if not self.options.allow_private_networks:
            kind = _forbidden_address(host)
            if kind is not None:
                raise _refusal(host, host, kind)

    async def _read(self, response: aiohttp.ClientResponse, reading: list[bool]) -> bytes:
        status = response.status
        if status != 200:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            transient = status >= 500 or status in (408, 429)
            raise _Failure(
                f"http-{status}",
                f"HTTP {status} {response.reason or ''}".strip(),
                status=status,
                transient=transient,
                retry_after=retry_after if status in (429, 503) else None,
            )
        robots = response.headers.getall("X-Robots-Tag", [])
        if self.options.opt_out_tokens and _opts_out(robots, self.options.opt_out_tokens):
            raise _Failure("opt-out", f"X-Robots-Tag: {', '.join(robots)}", status=status)
        length = response.content_length
        if length is not None and length > self.options.max_bytes:
            raise _Failure("too-many-bytes", f"Content-Length {length} > cap {self.options.max_bytes}", status=status)
        reading[0] = True
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > self.options.max_bytes:
                raise _Failure(
                    "too-many-bytes", f"body exceeds the cap of {self.options.max_bytes} bytes", status=status
                )
        return bytes(body)


async def _with_deadline(coro, seconds: float):
    """`coro` under a deadline; `asyncio.timeout` (no extra task per request) where it exists."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


class _NoLimit:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


def _record(result: Download, failure: _Failure) -> None:
    result.body = None
    result.reason, result.status = failure.reason, failure.status
    result.message, result.transient = str(failure), failure.transient


def _classify(err: aiohttp.ClientError) -> _Failure:
    """Name what aiohttp raised; connection trouble is transient, protocol nonsense is not."""
    if isinstance(err, aiohttp.ClientConnectorDNSError):
        if isinstance(err.os_error, _RefusedAddress):
            return err.os_error.failure
        return _Failure("dns-error", f"cannot resolve {err.host}: {err.os_error}", transient=True)
    if isinstance(err, aiohttp.ClientPayloadError):
        return _Failure("truncated", f"incomplete body: {err}", transient=True)
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return _Failure("connection-reset", "the server closed the connection without answering", transient=True)
    if isinstance(err, aiohttp.ServerTimeoutError):
        return _Failure("timeout", f"connect timed out: {err}", transient=True)
    if isinstance(err, aiohttp.ClientOSError):
        if err.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
            return _Failure("connection-reset", f"connection reset: {err}", transient=True)
        return _Failure("connection-error", f"cannot connect: {err}", transient=True)
    if isinstance(err, aiohttp.InvalidURL):
        return _Failure("bad-url", f"invalid URL: {err}")
    if isinstance(err, aiohttp.ClientResponseError):
        return _Failure("protocol-error", f"malformed HTTP answer: {err.message}", status=err.status or None)
    return _Failure("connection-error", f"{type(err).__name__}: {err}", transient=True)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - wall_time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _opts_out(headers: list[str], tokens: tuple[str, ...]) -> bool:
    """X-Robots-Tag values are comma-separated directives, optionally prefixed by a user agent."""
    for header in headers:
        for directive in header.lower().split(","):
            if directive.strip().rsplit(":", 1)[-1].strip() in tokens:
                return True
    return False
