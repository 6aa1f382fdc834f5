"""A loopback image server with a planned, deterministic mix of failures, for testing and benchmarking
downloaders against everything the web does to them.

`plan_outcomes` decides, for every URL path of a corpus (its images and the missing ones named in
`cc.tsv`), what the server does and what a correct client ends with. The server (`serve_in_background`
or `vilbert synth serve`) then does exactly that. A correct client: retries transient failures (5xx
other than a persistent 503, 429 after `Retry-After`, connection resets) at least twice, follows
redirects, applies a total per-request deadline longer than `slow_first_byte_s` (so slow first bytes
succeed, but never-ending and stalled bodies time out), checks that the body is complete and is an
image, and honours `X-Robots-Tag: noai`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from vilbert.errors import UsageError

__all__ = [
    "FAILURE_KINDS",
    "ServerOptions",
    "Outcome",
    "ServerHandle",
    "plan_outcomes",
    "serve_in_background",
    "load_corpus_files",
    "copy_path",
]

log = logging.getLogger(__name__)

# kind -> (expect_saved, reason a correct client reports when not saved), for every kind the plan uses.
_EXPECTED: dict[str, tuple[bool, str | None]] = {
    "ok": (True, None),
    "missing": (False, "http-404"),  # a URL in cc.tsv whose image never existed
    "not-found": (False, "http-404"),  # an existing image the server answers 404 for
    "server-error-then-ok": (True, None),  # 500 for the first 1-2 attempts, then the image
    "rate-limited": (True, None),  # 429 with Retry-After for the first attempt, then the image
    "unavailable": (False, "http-503"),  # 503 on every attempt
    "reset": (False, "connection-reset"),  # the TCP connection is reset (RST) on every attempt
    "truncated": (False, "truncated"),  # Content-Length says more than is sent, then close
    "html": (False, "not-an-image"),  # 200 text/html
    "slow-first-byte": (True, None),  # headers after `slow_first_byte_s`, then the image
    "endless": (False, "timeout"),  # headers, then a trickle of bytes until the client hangs up
    "stall": (False, "timeout"),  # headers (with Content-Length), then nothing
    "redirect": (True, None),  # 302 to /_direct/images/<file>, which serves the image
    "noai": (False, "opt-out"),  # the image, with X-Robots-Tag: noai
}
# Failure kinds in the order the plan deals them out: one of each first, then by weight.
FAILURE_KINDS: tuple[str, ...] = tuple(k for k in _EXPECTED if k not in ("ok", "missing"))
_WEIGHTS = {"server-error-then-ok": 3, "redirect": 3, "slow-first-byte": 1, "endless": 1, "stall": 1}
_FIRST_STATUS = {"ok": 200, "missing": 404, "not-found": 404, "server-error-then-ok": 500,
                 "rate-limited": 429, "unavailable": 503, "reset": None, "truncated": 200, "html": 200,
                 "slow-first-byte": 200, "endless": 200, "stall": 200, "redirect": 302, "noai": 200}  # fmt: skip
_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
_DIRECT = "/_direct"
_HTML = b"<!doctype html><html><head><title>Photo</title></head><body><p>Nice photo!</p></body></html>\n"


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """How the test server behaves."""

    latency_ms: float = 0.0
    """Delay before every response."""
    jitter_ms: float = 0.0
    """Extra delay, uniform in [0, jitter_ms], fixed per (path, attempt)."""
    failure_rate: float = 0.25
    """Fraction of the existing images with a planned failure (0 disables; missing URLs stay 404)."""
    seed: int = 0
    """Chooses which URLs fail and how."""
    slow_first_byte_s: float = 2.0
    """Delay before the headers of `slow-first-byte` URLs: below a sane client deadline."""
    retry_after_s: int = 1
    """The Retry-After header of `rate-limited` answers."""
    max_runtime_s: float | None = 3600.0
    """The server stops by itself after this long (None: never)."""
    kinds: tuple[str, ...] = FAILURE_KINDS
    """The failure kinds to deal out (e.g. leave out endless/stall for a throughput benchmark)."""
    copies: int = 1
    """Also serve every path as /copy/<k><path> for k in 1..copies-1, each with its own outcome: a
    benchmark gets copies x the URLs without copies x the images (see `write_cc_tsv(copies=)`)."""

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "slow_first_byte_s", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {self.failure_rate}")
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        if self.max_runtime_s is not None and self.max_runtime_s <= 0:
            raise ValueError(f"max_runtime_s must be > 0 or None, got {self.max_runtime_s}")
        unknown = [k for k in self.kinds if k not in FAILURE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds {list(self.kinds)}: unknown or empty; valid: {', '.join(FAILURE_KINDS)}")


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the server does for one URL path, and what a correct client ends with."""

    path: str
    """The URL path, e.g. "/images/000042.jpg"."""
    kind: str
    """One of "ok", "missing" or `FAILURE_KINDS`."""
    expect_saved: bool
    """Whether a correct client (see the module docstring) saves the image."""
    reason: str | None
    """When not saved, why: http-404, http-503, connection-reset, truncated, not-an-image, timeout,
    opt-out."""
    first_status: int | None
    """The HTTP status of the first attempt (None for a connection reset)."""
    failures_before_ok: int = 0
    """For transient kinds, how many attempts fail before the image is served."""
    file: str | None = None
    """The image file behind the path (None for missing ones)."""


def load_corpus_files(corpus_dir: str | Path) -> tuple[dict[str, bytes], list[str]]:
    """The corpus's images as {url path: bytes}, and the URL paths of `cc.tsv` (in order)."""
    root = Path(corpus_dir)
    if not (root / "corpus.jsonl").is_file() or not (root / "images").is_dir():
        raise UsageError(f"{root} is not a synthetic corpus (no corpus.jsonl and images/); "
                         "make one with `vilbert synth corpus --n N --out DIR`")  # fmt: skip
    files = {f"/images/{p.name}": p.read_bytes() for p in sorted((root / "images").iterdir()) if p.is_file()}
    tsv = root / "cc.tsv"
    paths = []
    if tsv.is_file():
        for line in tsv.read_text(encoding="utf-8").splitlines():
            paths.append(urlsplit(line.rsplit("\t", 1)[-1]).path)
    return files, paths


def plan_outcomes(corpus_dir: str | Path, options: ServerOptions | None = None) -> dict[str, Outcome]:
    """Per URL path (every image, plus the missing paths of `cc.tsv`), what happens to it."""
    files, tsv_paths = load_corpus_files(corpus_dir)
    return _plan(sorted(files), tsv_paths, options or ServerOptions())


def copy_path(path: str, copy: int) -> str:
    """The URL path of copy `copy` (0: the path itself) of a corpus path."""
    return path if copy == 0 else f"/copy/{copy}{path}"


def _plan(existing: list[str], tsv_paths: list[str], options: ServerOptions) -> dict[str, Outcome]:
    copies = range(options.copies)
    existing = [copy_path(p, k) for k in copies for p in existing]
    tsv_paths = [copy_path(p, k) for k in copies for p in tsv_paths]
    ranked = sorted(existing, key=lambda p: _hash(options.seed, "rank", p))
    n_fail = round(options.failure_rate * len(ranked))
    deck = _deck(options.kinds)
    plan = {}
    for i, path in enumerate(ranked):
        kind = deck[i % len(deck)] if i < n_fail else "ok"
        failures = 0
        if kind == "server-error-then-ok":
            failures = 1 + _hash(options.seed, "failures", path) % 2
        elif kind == "rate-limited":
            failures = 1
        plan[path] = _outcome(path, kind, failures, path.rsplit("/", 1)[-1])
    for path in tsv_paths:
        if path not in plan:
            plan[path] = _outcome(path, "missing", 0, None)
    return dict(sorted(plan.items()))


def _deck(kinds: tuple[str, ...]) -> list[str]:
    """One of each kind, then the heavier-weighted ones again (default weight 2)."""
    deck = list(kinds)
    for round_ in (2, 3):
        deck += [k for k in kinds if _WEIGHTS.get(k, 2) >= round_]
    return deck


def _outcome(path: str, kind: str, failures: int, file: str | None) -> Outcome:
    saved, reason = _EXPECTED[kind]
    return Outcome(path=path, kind=kind, expect_saved=saved, reason=reason,
                   first_status=_FIRST_STATUS[kind], failures_before_ok=failures, file=file)  # fmt: skip


def _hash(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big")


class _Server:
    """The aiohttp application and its per-path state; lives on one event loop."""

    def __init__(self, files: dict[str, bytes], plan: dict[str, Outcome], options: ServerOptions):
        self.files, self.plan, self.options = files, plan, options
        self.attempts: dict[str, int] = {}
        self.attempts_lock = threading.Lock()  # `ServerHandle.attempts` copies from another thread
        self.stopping = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(_DIRECT + "/"):
            return self._image(path[len(_DIRECT) :])
        outcome = self.plan.get(path)
        if outcome is None:
            return web.Response(status=404, text="not in the corpus\n")
        with self.attempts_lock:
            attempt = self.attempts.get(path, 0)
            self.attempts[path] = attempt + 1
        await self._latency(path, attempt)
        return await self._answer(request, outcome, attempt)

    async def _answer(self, request: web.Request, outcome: Outcome, attempt: int) -> web.StreamResponse:
        kind, path = outcome.kind, outcome.path
        if kind in ("missing", "not-found"):
            return web.Response(status=404, text="not found\n")
        if kind == "server-error-then-ok" and attempt < outcome.failures_before_ok:
            return web.Response(status=500, text="internal server error\n")
        if kind == "rate-limited" and attempt < outcome.failures_before_ok:
            headers = {"Retry-After": str(self.options.retry_after_s)}
            return web.Response(status=429, text="too many requests\n", headers=headers)
        if kind == "unavailable":
            return web.Response(status=503, text="service unavailable\n")
        if kind == "reset":
            return self._reset(request)
        if kind == "html":
            return web.Response(body=_HTML, content_type="text/html")
        if kind == "redirect":
            raise web.HTTPFound(location=f"{_DIRECT}/images/{outcome.file}")
        if kind in ("truncated", "endless", "stall"):
            return await self._broken_body(request, kind, path)
        if kind == "slow-first-byte":
            await self._sleep(self.options.slow_first_byte_s)
        response = self._image(path)
        if kind == "noai":
            response.headers["X-Robots-Tag"] = "noai"
        return response

    def _image(self, path: str) -> web.Response:
        data = self.files.get("/images/" + path.rsplit("/", 1)[-1])
        if data is None:
            return web.Response(status=404, text="not found\n")
        return web.Response(body=data, headers={"Content-Type": _content_type(path)})

    def _reset(self, request: web.Request) -> web.Response:
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=500)  # never reaches the client

    async def _broken_body(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        data = self.files["/images/" + path.rsplit("/", 1)[-1]]
        response = web.StreamResponse(headers={"Content-Type": _content_type(path)})
        if kind != "endless":
            response.content_length = len(data)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            if kind == "truncated":
                await response.write(data[: len(data) // 2])
                if request.transport is not None:
                    request.transport.close()  # flushes what was written, then FIN
                return response
            await response.write(data[:512] if kind == "endless" else b"")
            while not self.stopping.is_set() and not _closed(request):
                await self._sleep(0.05)
                if kind == "endless" and not _closed(request):
                    await response.write(b"\0" * 64)
        return response

    async def _latency(self, path: str, attempt: int) -> None:
        delay = self.options.latency_ms
        if self.options.jitter_ms:
            fraction = _hash(self.options.seed, "jitter", path, str(attempt)) % 10_000 / 10_000
            delay += fraction * self.options.jitter_ms
        if delay > 0:
            await self._sleep(delay / 1000)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when the server stops."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


def _closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _content_type(path: str) -> str:
    return _CONTENT_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


class ServerHandle:
    """A server running in a background thread with its own event loop (see `serve_in_background`)."""

    def __init__(
        self,
        corpus_dir: str | Path,
        options: ServerOptions,
        port: int = 0,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        ssl_context: ssl.SSLContext | None = None,
    ):
        files, tsv_paths = load_corpus_files(corpus_dir)
        self.options = options
        self.hosts, self.ssl_context = hosts, ssl_context
        self.plan: dict[str, Outcome] = _plan(sorted(files), tsv_paths, options)
        self._files, self._requested_port = files, port
        self.port = 0
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="synth-server", daemon=True)

    @property
    def base_url(self) -> str:
        """e.g. "http://127.0.0.1:43817" (no trailing slash; https with an `ssl_context`; the first host)."""
        return f"{'https' if self.ssl_context else 'http'}://{self.hosts[0]}:{self.port}"

    @property
    def attempts(self) -> dict[str, int]:
        """Requests received so far per planned URL path."""
        server = self._server
        if server is None:
            return {}
        with server.attempts_lock:
            return dict(server.attempts)

    def start(self, timeout: float = 30.0) -> ServerHandle:
        """Start serving; returns once the socket is listening."""
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise UsageError(f"the synthetic server could not start on 127.0.0.1:{self._requested_port}: "
                             f"{self._error or 'timed out'}")  # fmt: skip
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight endless or stalled responses are cut) and join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not self._done.is_set():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (max runtime, or `stop`); True if it did."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # reported to start(); the thread must not die silently
            self._error = err
            log.debug("synthetic server failed: %s", err)
        finally:
            self._done.set()
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = _Server(self._files, self.plan, self.options)
        self._server = server
        runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            # Every host on one port (the first one's, when the port is chosen by the system).
            for host in self.hosts:
                port = self.port or self._requested_port
                await web.TCPSite(runner, host, port, ssl_context=self.ssl_context).start()
                self.port = runner.addresses[0][1]
            self._ready.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.options.max_runtime_s)
        finally:
            server.stopping.set()
            await runner.cleanup()


@contextlib.contextmanager
def serve_in_background(
    corpus_dir: str | Path,
    options: ServerOptions | None = None,
    port: int = 0,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[ServerHandle]:
    """Serve `corpus_dir` on 127.0.0.1:`port` (0: a free port) while the block runs.

    `hosts` are the loopback addresses listened on (all on the same port: several hosts for a
    client, without any name resolution); `ssl_context` (a server context) serves HTTPS instead.

    Example:
        with serve_in_background(corpus, ServerOptions(failure_rate=0.3)) as server:
            write_cc_tsv(corpus, server.base_url, tmp / "cc.tsv")
            ...  # fetch, then compare with server.plan
    """
    handle = ServerHandle(corpus_dir, options or ServerOptions(), port, hosts=hosts, ssl_context=ssl_context).start()
    try:
        yield handle
    finally:
        handle.stop()
