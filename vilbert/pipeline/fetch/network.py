"""The HTTP side of fetch: one aiohttp session, deadlines, retries, byte caps and destination checks.

`Downloader.get(url)` never raises for anything the network or the server does: it returns a
`Download` that holds either the body or a failure `reason` (a short, stable label counted in the
report), the HTTP status, a message, and whether the failure is transient (worth retrying later).

Policy:
- **Deadline**: `timeout_s` bounds one attempt as a whole - connect, every redirect hop, headers and
  the full body - not each socket read, so a trickling or stalled body cannot hold a slot longer.
  A deadline hit before the headers arrived is retried; one hit while reading the body is not (it
  would cost another full deadline) but is recorded as transient, so a rerun retries it.
- **Retries**: timeouts, connection errors, DNS errors, 5xx, 408 and 429 are transient and retried up to
  `retries` times with exponential backoff and full jitter; 429/503 honour `Retry-After` (up to
  `max_retry_after_s`). 404 and every other answer are permanent and never retried. A name that
  does not exist (`dns-error`, "no such host") is left for a rerun instead of retried in the run.
- **Safety**: http and https only; redirects are followed by hand so every hop is checked. Unless
  `allow_private_networks`, only globally routable addresses are connected to (`addresses.py`: the
  policy, wrapped IPv4 forms and metadata services); anything else is `private-address`, naming the
  address. The URL is judged as yarl normalised it (what aiohttp connects to, never the raw text): a
  literal in any spelling before the request, a name in the connector's resolver on every address
  it resolves to (so DNS rebinding cannot slip through), and every socket again on the address it
  connects to (the connector's socket factory).
- **TLS**: certificates and host names are verified against the system's CA store (`SSL_CERT_FILE`
  and `SSL_CERT_DIR` honoured) or `ca_bundle`. A certificate the client cannot trust (self-signed,
  unknown CA, another host's name, expired) or a failed handshake is `tls-error`: permanent, never
  retried, since the same certificate fails the same way.
- **Proxies**: `proxy`, else `HTTPS_PROXY`/`HTTP_PROXY`, minus `NO_PROXY` (`proxies.py`). The proxy
  resolves names, so the policy judges only address literals (before anything is sent) and allows
  the sockets to the proxy itself. A proxy that cannot be reached or refuses is `proxy-error`.
- **Memory**: the bytes of bodies held at once (read, or waiting to be decoded until the caller's
  `release`) stay within `max_body_memory` (`BodyBudget`); a read waits for room inside its deadline.
- **Opt-out**: an `X-Robots-Tag` header naming one of `opt_out_tokens` (default `noai`,
  `noimageai`) means the image is not saved (`opt-out`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import os
import random
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from time import time as wall_time

import aiohttp
from yarl import URL

import vilbert
from vilbert.errors import FetchError, UsageError
from vilbert.pipeline.fetch.addresses import (
    AddressPolicy,
    CheckingResolver,
    RefusedAddress,
    checking_socket_factory,
    host_address,
)
from vilbert.pipeline.fetch.budget import BodyBudget, default_body_memory
from vilbert.pipeline.fetch.proxies import ProxyChoice, redact_proxy

__all__ = [
    "NetworkOptions",
    "Download",
    "Downloader",
    "DEFAULT_USER_AGENT",
    "TRANSIENT_REASONS",
    "tls_context",
    "classify_client_error",
]

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

    max_in_flight: int = 1024
    """Requests open at once: enough to hide 300 ms of latency at several hundred images/s (512 was not:
    docs/results.md, appendix C). Fewer where the open-file limit cannot be raised to fit
    (`run._fit_open_files`)."""
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
    ca_bundle: str | None = None
    """A PEM file of the CA certificates to trust for https, instead of the system's store (like curl's
    --cacert); None: the system's store, or the file/directory in `SSL_CERT_FILE`/`SSL_CERT_DIR` when set."""
    proxy: str | None = None
    """A forward proxy for every request (`http://[user:password@]host:port`); None: `HTTPS_PROXY` /
    `HTTP_PROXY` from the environment, if set. `NO_PROXY` applies either way (`proxies.py`)."""
    max_body_memory: int = 0
    """Bytes of bodies held at once, being read or waiting to be decoded; 0: `default_body_memory`."""

    def __post_init__(self) -> None:
        if self.max_body_memory < 0:
            raise ValueError(f"max_body_memory={self.max_body_memory!r} is invalid; valid: >= 0 (0: automatic)")
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
    held: int = 0
    """Bytes of the body budget this result holds until `Downloader.release`."""


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


def _refusal(refused: RefusedAddress) -> _Failure:
    shown = refused.host if refused.host == refused.address else f"{refused.host} ({refused.address})"
    return _Failure(
        "private-address",
        f"refused {shown}: {refused.why}; pass --allow-private-networks to fetch from private networks",
    )


class Downloader:
    """One aiohttp session for a whole run; use as `async with Downloader(options) as d`.

    Args:
        options: How to talk to servers.
        policy: The address policy (default `AddressPolicy()`); unused with `allow_private_networks`.
    """

    def __init__(self, options: NetworkOptions, policy: AddressPolicy | None = None) -> None:
        self.options = options
        self.policy = None if options.allow_private_networks else (policy or AddressPolicy())
        self.proxies = ProxyChoice.from_environment(options.proxy)
        self.budget = BodyBudget(options.max_body_memory or default_body_memory(options.max_bytes))
        self._session: aiohttp.ClientSession | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def __aenter__(self) -> Downloader:
        opts, policy = self.options, self.policy
        if policy is not None and self.proxies.proxies():
            policy = await _allowing_proxies(policy, self.proxies.proxies())
        connector = aiohttp.TCPConnector(
            limit=opts.max_in_flight,
            limit_per_host=0,  # per-host waiting happens before the deadline starts (see get)
            ttl_dns_cache=opts.dns_cache_ttl_s,
            ssl=tls_context(opts.ca_bundle),
            resolver=None if policy is None else CheckingResolver(policy),
            socket_factory=None if policy is None else checking_socket_factory(policy),
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
        """Fetch `url` with retries; never raises for network or server behaviour.

        A body holds `result.held` bytes of the budget until `release(result)`.
        """
        result = Download(url)
        await self._attempts(url, result)
        return result

    def release(self, result: Download) -> None:
        """Drop `result`'s body and give its bytes back to the budget (call once it is decoded)."""
        result.body = None
        self.budget.give(result.held)
        result.held = 0

    async def _attempts(self, url: str, result: Download) -> None:
        for attempt in range(self.options.retries + 1):
            result.attempts = attempt + 1
            state = _AttemptState()
            try:
                async with self._host_slot(url):  # waiting for a busy host does not count as time spent
                    started = time.monotonic()
                    try:
                        result.body = await _with_deadline(self._attempt(url, state), self.options.timeout_s)
                    finally:
                        result.seconds += time.monotonic() - started
                result.reason = result.status = None
                result.message, result.transient, result.held = "", False, state.held
                return
            except _Failure as failure:
                _record(result, failure)
                retry, retry_after = failure.retry, failure.retry_after
            except asyncio.TimeoutError:
                _record(result, _Failure("timeout", _deadline_message(state, self.options.timeout_s), transient=True))
                retry, retry_after = not state.reading, None
            except BaseException:
                self.budget.give(state.held)
                raise
            self.budget.give(state.held)
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
        try:
            host = URL(url).raw_host or ""
        except (ValueError, TypeError):
            host = ""  # a bad URL fails in _attempt
        slot = self._hosts.get(host)
        if slot is None:
            if len(self._hosts) > 100_000:  # forget idle hosts so a huge list cannot grow this forever
                self._hosts = {h: s for h, s in self._hosts.items() if s.locked()}
            slot = self._hosts[host] = asyncio.Semaphore(self.options.per_host)
        return slot

    async def _attempt(self, url: str, state: _AttemptState) -> bytes:
        """One attempt, following redirects; returns the body or raises `_Failure`."""
        assert self._session is not None, "use Downloader as an async context manager"
        current = self._checked_url(url)
        for _hop in range(self.options.max_redirects + 1):
            try:
                proxy = self.proxies.for_url(current)
                async with self._session.get(current, allow_redirects=False, proxy=proxy) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        current = self._checked_url(response.headers["Location"], base=current)
                        continue
                    return await self._read(response, state)
            except aiohttp.ClientError as err:
                raise classify_client_error(err) from err
        raise _Failure("too-many-redirects", f"more than {self.options.max_redirects} redirects, last {current}")

    def _checked_url(self, text: str, base: URL | None = None) -> URL:
        """The URL as aiohttp will use it (yarl's normalisation), checked; a redirect joins `base`."""
        try:
            url = URL(text) if base is None else base.join(URL(text))
            host, scheme = url.raw_host, url.scheme
            url.port  # noqa: B018 - raises ValueError for a bad port
        except (ValueError, TypeError) as err:
            raise _Failure("bad-url", f"cannot parse URL {text!r}: {err}") from err
        if scheme not in ("http", "https"):
            raise _Failure("unsupported-scheme", f"scheme {scheme!r} of {text!r}; only http and https")
        if not host:
            raise _Failure("bad-url", f"no host in URL {text!r}")
        if self.policy is not None and (address := host_address(host)) is not None:
            why = self.policy.refusal(address)
            if why is not None:
                raise _refusal(RefusedAddress(host, str(address), why))
        return url

    async def _read(self, response: aiohttp.ClientResponse, state: _AttemptState) -> bytes:
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
        cap, length = self.options.max_bytes, response.content_length
        if length is not None and length > cap:
            raise _Failure("too-many-bytes", f"Content-Length {length} > cap {cap}", status=status)
        state.reading = True
        # Twice the body while it is read: its chunks, then for a moment also their join. Reserved
        # whole when the length is known (a body waiting for the budget holds nothing meanwhile),
        # else as the bytes arrive.
        if length is not None:
            await self.budget.take(2 * length)
            state.held = 2 * length
        chunks, size = [], 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > cap:
                raise _Failure("too-many-bytes", f"body exceeds the cap of {cap} bytes", status=status)
            if 2 * size > state.held:
                await self.budget.take(2 * size - state.held)
                state.held = 2 * size
            chunks.append(chunk)
            state.received = size
        body = b"".join(chunks)
        del chunks
        self.budget.give(state.held - size)  # the chunks are gone: the body alone is held until release
        state.held = size
        return body


@dataclass(slots=True)
class _AttemptState:
    reading: bool = False
    """Headers are in: a deadline now means a slow body (not retried in the run)."""
    held: int = 0
    """Bytes of the body budget this attempt holds."""
    received: int = 0
    """Bytes of the body read so far."""


def _deadline_message(state: _AttemptState, seconds: float) -> str:
    """What a deadline cut: the wait for an answer (retried) or a slow body (left to a rerun)."""
    if state.reading:
        return f"body not complete within {seconds:g} s ({state.received} bytes read)"
    return f"no answer within {seconds:g} s"


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


async def _allowing_proxies(policy: AddressPolicy, proxies: tuple[URL, ...]) -> AddressPolicy:
    """`policy` that also allows the sockets to the proxies: the user chose them, and a proxy usually sits on
    a private network. Their names are resolved once, here.

    Raises:
        FetchError: A proxy name that does not resolve.
    """
    loop, networks = asyncio.get_running_loop(), []
    for proxy in proxies:
        try:
            infos = await loop.getaddrinfo(proxy.raw_host, proxy.port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise FetchError(f"cannot resolve the proxy {redact_proxy(str(proxy))}: {err}") from None
        networks += [ipaddress.ip_network(info[4][0].split("%", 1)[0]) for info in infos]
    return dataclasses.replace(policy, exempt=(*policy.exempt, *networks))


def tls_context(ca_bundle: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The TLS settings of every https request: certificates and host names verified (TLS 1.2+), against
    `ca_bundle` when given, else the system's CA store (which OpenSSL takes from `SSL_CERT_FILE` /
    `SSL_CERT_DIR` when they are set).

    Raises:
        UsageError: `ca_bundle` is missing or holds no PEM certificate.
    """
    if ca_bundle is None:
        return ssl.create_default_context()
    path = Path(ca_bundle)
    if not path.is_file():
        raise UsageError(f"--ca-bundle {path}: no such file (a PEM file of CA certificates)")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError) as err:
        raise UsageError(f"--ca-bundle {path}: not a PEM file of CA certificates ({err})") from None


def _tls_failure(err: aiohttp.ClientSSLError) -> _Failure:
    """A certificate the client cannot trust, or a handshake that failed: permanent until someone changes
    the server or the trusted CAs, so never retried."""
    where = f"{err.host}:{err.port}"
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        cert_error = err.certificate_error
        why = getattr(cert_error, "verify_message", "") or str(cert_error)
        return _Failure(
            "tls-error",
            f"certificate of {where} rejected: {why}; if a private CA signed it, pass --ca-bundle FILE "
            "(or set SSL_CERT_FILE)",
        )
    return _Failure("tls-error", f"TLS handshake with {where} failed: {err.os_error}")


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _dns_failure(err: aiohttp.ClientConnectorDNSError) -> _Failure:
    """A name that does not resolve. "No such name" (NXDOMAIN, no address) answers the same within a run, so
    it is not retried in the run, but a rerun tries again (domains come back); a temporary failure (an
    overloaded or unreachable resolver, the usual trouble of large runs) is retried with backoff."""
    if getattr(err.os_error, "errno", None) in _NO_SUCH_NAME:
        return _Failure("dns-error", f"no such host {err.host}: {err.os_error}", transient=True, retry=False)
    return _Failure("dns-error", f"cannot resolve {err.host}: {err.os_error}", transient=True)


def classify_client_error(err: aiohttp.ClientError) -> _Failure:
    """Name what aiohttp raised; connection trouble is transient, protocol nonsense is not. The result has
    `reason`, `transient` and `retry` (whether the run retries it)."""
    if isinstance(err, aiohttp.ClientConnectorError) and isinstance(err.os_error, RefusedAddress):
        return _refusal(err.os_error)  # by the resolver (a name) or the socket factory (any socket)
    if isinstance(err, aiohttp.ClientSSLError):
        return _tls_failure(err)
    if isinstance(err, aiohttp.ClientProxyConnectionError):
        return _Failure("proxy-error", f"cannot connect to the proxy: {err.os_error}", transient=True)
    if isinstance(err, aiohttp.ClientHttpProxyError):
        return _Failure(
            "proxy-error", f"the proxy answered HTTP {err.status} {err.message}", status=err.status,
            transient=err.status >= 500 or err.status in (408, 429),
        )  # fmt: skip
    if isinstance(err, aiohttp.ClientConnectorDNSError):
        return _dns_failure(err)
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
