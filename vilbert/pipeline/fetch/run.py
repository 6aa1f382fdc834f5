"""Orchestration: URL list -> (download, decode, resize, encode) -> image parts + failures + report.

One asyncio event loop runs `max_in_flight` worker coroutines that take rows from a bounded queue
(filled from the streamed list), download through one `Downloader`, and hand bodies to decode
threads (`DecodeThreads`: two more than cores, so every core works while the loop waits on the
network or holds the GIL). Finished rows go to the `PartWriter`, whose parts are written on an I/O
thread. The run ends by itself: every request has a deadline, and the queue ends with one stop
marker per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vilbert.cache.format import write_json_atomic
from vilbert.errors import FetchError, UsageError
from vilbert.pipeline.fetch.decode import decode_job, init_worker
from vilbert.pipeline.fetch.decode_threads import DecodeThreads
from vilbert.pipeline.fetch.inputs import BadLine, UrlRow, read_cc_tsv, read_url_table
from vilbert.pipeline.fetch.network import TRANSIENT_REASONS, Downloader, NetworkOptions
from vilbert.pipeline.fetch.proxies import redact_proxy
from vilbert.pipeline.fetch.reader import LineSet, count_fetched, done_lines, read_failures
from vilbert.pipeline.fetch.shards import FailedRow, PartWriter, SavedRow, write_table_atomic
from vilbert.pipeline.images import RESIZE_MODES

__all__ = ["WEB_MAX_PIXELS", "FetchOptions", "fetch_cc", "fetch_url_table", "fetch_rows"]

log = logging.getLogger(__name__)
Progress = Callable[[dict], None]
Decode = Callable[..., Awaitable]
"""`decode(fn, *args)`: run `fn(*args)` off the event loop and await its result."""
WEB_MAX_PIXELS = 40_000_000
"""Fetch refuses larger images unread (`too-large`): a 24 MP camera photo fits, and each decode holds
about 4 bytes per pixel per decode thread (PIL's own limit, 89 MP, costs ~1.2 GB per decode)."""


@dataclass(frozen=True, kw_only=True)
class FetchOptions:
    """What to make of the images, how to split the list, and how to talk to servers."""

    size: int = 224
    mode: str = "center-crop"
    quality: int = 90
    """JPEG quality of the saved 224x224 images (~15 KB each at 90)."""
    max_pixels: int = WEB_MAX_PIXELS
    decode_workers: int = 0
    """Decode threads (or processes); 0: two more threads than cores, or one process per core."""
    decode_in: str = "thread"
    """"thread" (default: the decoders release the GIL, and torch is imported once) or "process"."""
    rows_per_part: int = 1000
    seconds_per_part: float = 10.0
    """A part is written after this many rows or seconds: a crash loses at most that much work."""
    shard_index: int = 0
    num_shards: int = 1
    """This run fetches the lines with `line % num_shards == shard_index`."""
    retry_failed: bool = False
    """On a rerun, retry permanent failures too (transient ones are always retried)."""
    event_loop: str = "auto"
    """"auto" (uvloop when installed: less CPU per request than asyncio's loop), "uvloop" or "asyncio"."""
    network: NetworkOptions = field(default_factory=NetworkOptions)

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"mode={self.mode!r} is invalid; valid: {', '.join(RESIZE_MODES)}")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError(f"event_loop={self.event_loop!r} is invalid; valid: auto, uvloop, asyncio")
        if self.decode_in not in ("process", "thread"):
            raise ValueError(f"decode_in={self.decode_in!r} is invalid; valid: process, thread")
        checks = {
            "size": self.size >= 1,
            "quality": 1 <= self.quality <= 100,
            "num_shards": self.num_shards >= 1,
            "shard_index": 0 <= self.shard_index < self.num_shards,
            "rows_per_part": self.rows_per_part >= 1,
            "decode_workers": self.decode_workers >= 0,
            "seconds_per_part": self.seconds_per_part > 0,
            "max_pixels": self.max_pixels >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                valid = f"0 <= i < num_shards={self.num_shards}" if name == "shard_index" else "see --help"
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; valid: {valid}")


def fetch_cc(
    tsv: str | Path, out_dir: str | Path, options: FetchOptions | None = None, progress: Progress | None = None
) -> dict:
    """Fetch a Conceptual Captions TSV (`caption<TAB>url`, no header) into `out_dir`.

    Rerunning with the same arguments resumes; see `fetch_rows` for the return value.
    """
    source = {"input": str(Path(tsv).resolve()), "format": "cc"}
    return fetch_rows(lambda: read_cc_tsv(tsv), out_dir, options, source=source, progress=progress)


def fetch_url_table(
    path: str | Path,
    out_dir: str | Path,
    options: FetchOptions | None = None,
    *,
    fmt: str = "auto",
    url_col: str = "url",
    caption_col: str | None = "caption",
    progress: Progress | None = None,
) -> dict:
    """Fetch a TSV/CSV/JSONL/Parquet list of URLs (and captions) into `out_dir`."""
    rows = read_url_table(path, fmt=fmt, url_col=url_col, caption_col=caption_col)  # checks --format now
    source = {"input": str(Path(path).resolve()), "format": fmt, "url_col": url_col, "caption_col": caption_col}
    return fetch_rows(lambda: rows, out_dir, options, source=source, progress=progress)


def fetch_rows(
    rows: Callable[[], Iterable[UrlRow | BadLine]],
    out_dir: str | Path,
    options: FetchOptions | None = None,
    *,
    source: dict,
    progress: Progress | None = None,
) -> dict:
    """Fetch the rows `rows()` yields into `out_dir`, resuming what an earlier run left.

    Args:
        rows: Opens the list (called once, after the output directory is checked).
        out_dir: Output directory (created; reused by a rerun with the same options).
        options: See `FetchOptions`.
        source: What the list is (input path, format, columns), recorded and checked on rerun.
        progress: Called about twice a second with counts (see `_Stats.snapshot`).

    Returns:
        The report also written to `out_dir/fetch-report.json`.
    """
    options = _fit_open_files(options or FetchOptions())
    out = Path(out_dir)
    with _locked(out):
        _check_state(out, options, source)
        done = done_lines(out, retry_failed=options.retry_failed)
        writer = PartWriter(out, rows_per_part=options.rows_per_part, seconds_per_part=options.seconds_per_part)
        stats = _Stats(already_done=len(done))
        with _lean_gc(), _decode_pool(options) as decode:
            gc.freeze()  # torch and the decoders, imported by the pool just now, too
            _run_event_loop(_Run(options, writer, decode, stats, progress).main(rows(), done), options.event_loop)
        return _finish(out, options, source, stats)


FILES_BESIDES_SOCKETS = 256
"""Descriptors a fetch holds besides its sockets: output parts, the decode pool's pipes, libraries."""


def _fit_open_files(options: FetchOptions) -> FetchOptions:
    """Raise this process's soft open-file limit to what `max_in_flight` sockets need, up to the hard
    limit (as servers do: a soft limit of 1,024 is a common default); where the hard limit is lower,
    fetch with fewer requests in flight and say so, rather than fail them as "Too many open files"."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to read
        return options
    need = options.network.max_in_flight + FILES_BESIDES_SOCKETS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and soft < need:
        target = need if hard == unlimited else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == unlimited or soft >= need:
        return options
    fitted = max(1, soft - FILES_BESIDES_SOCKETS)
    log.warning(
        "the open-file limit (ulimit -n: %d, hard limit %s) allows %d requests in flight, not %d; "
        "raise it to fetch faster (see the README, 'Fetching at scale')",
        soft, "unlimited" if hard == unlimited else hard, fitted, options.network.max_in_flight,
    )  # fmt: skip
    return replace(options, network=replace(options.network, max_in_flight=fitted))


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError(f"cannot create output directory {out}: {err}") from err
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise FetchError(f"another fetch is writing to {out}; wait for it or use another --out") from err
        yield


_STATE_KEYS = ("size", "mode", "quality", "shard_index", "num_shards")


def _check_state(out: Path, options: FetchOptions, source: dict) -> None:
    """Record the options on the first run; refuse a rerun whose output would not match."""
    state_path = out / "fetch-state.json"
    state = {**{k: getattr(options, k) for k in _STATE_KEYS}, **source, "version": 1}
    if not state_path.exists():
        write_json_atomic(state_path, state)
        return
    old = _read_state(state_path)
    for key in (*_STATE_KEYS, "format", "url_col", "caption_col"):
        if old.get(key) != state.get(key):
            raise UsageError(
                f"{out} was fetched with {key}={old.get(key)!r}, this run has {state.get(key)!r}; "
                "rerun with the same options to resume, or use another --out"
            )
    if old.get("input") != state["input"]:
        log.warning("%s was started from %s; resuming from %s (same lines assumed)", out, old["input"], source["input"])


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FetchError(
            f"{path} is empty or corrupt ({err}); it records the options of the first run into {path.parent}. "
            "Delete it and rerun with the same options as that run (the saved parts are kept), or use another --out"
        ) from err


def _run_event_loop(main: Coroutine, kind: str) -> None:
    uvloop = None
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise UsageError("event_loop='uvloop' but uvloop is not installed; pip install uvloop") from None
    if uvloop is None:
        asyncio.run(main)
    elif sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:  # pragma: no cover - Python 3.10
        uvloop.install()
        asyncio.run(main)


@contextlib.contextmanager
def _lean_gc() -> Iterator[None]:
    """Fewer, cheaper garbage collections while the run lasts.

    Every request leaves short-lived objects behind, so the default thresholds run a collection every
    few images, and each older-generation one walks all of torch's and aiohttp's module objects.
    Freezing what exists (imports, caches) takes those out of every collection; a higher first
    threshold makes collections rarer, during torch's import too. Measured on 3,000 URLs: GC time
    0.61 s -> 0.19 s.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], 50_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@contextlib.contextmanager
def _decode_pool(options: FetchOptions) -> Iterator[Decode]:
    """`decode(fn, *args) -> awaitable`, run on decode threads (`DecodeThreads`) or processes."""
    cores = os.cpu_count() or 1
    # Threads: two beyond the cores, so a core stays busy while a thread waits for the GIL (its Python
    # glue between decode, resize and encode) that the event loop holds. Measured on 2 cores, 4,000
    # URLs at 0 ms latency, back to back: 4 threads saved more images per second than 2, at less CPU
    # per image (benchmarks/RESULTS.md). Each thread holds at most one decoded image (`max_pixels`).
    workers = options.decode_workers or (cores + 2 if options.decode_in == "thread" else cores)
    if options.decode_in == "thread":
        # Import torch before the first request: an import running beside the event loop holds the GIL
        # for seconds, and the loop's requests would miss their deadlines. `init_worker` sets torch's
        # process-wide thread count to 1 (the pool is the parallelism); it is restored afterwards, or a
        # caller that fetches and then trains in the same process (the demo) would train on one thread.
        import torch

        restore_threads = functools.partial(torch.set_num_threads, torch.get_num_threads())
        init_worker()
        threads = DecodeThreads(workers)
        try:
            yield threads.submit
        finally:
            threads.shutdown()
            restore_threads()
        return
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker)
    for _ in range(workers):  # start the workers (and their imports) while the first downloads run
        pool.submit(init_worker)
    try:
        yield lambda fn, *args: asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Stats:
    already_done: int = 0
    read: int = 0
    in_shard: int = 0
    skipped_done: int = 0
    saved: int = 0
    failed: int = 0
    in_flight: int = 0
    bytes_downloaded: int = 0
    bytes_saved: int = 0
    body_budget: int = 0
    body_peak: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    malformed: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict:
        elapsed = time.monotonic() - self.started
        done = self.saved + self.failed
        return {
            "elapsed_s": elapsed,
            "read": self.read,
            "done": done,
            "saved": self.saved,
            "failed": self.failed,
            "skipped_done": self.skipped_done,
            "in_flight": self.in_flight,
            "by_reason": dict(self.by_reason),
            "images_per_s": self.saved / elapsed if elapsed > 0 else 0.0,
            "success_rate": self.saved / done if done else 0.0,
            "bytes_downloaded": self.bytes_downloaded,
        }


class _Run:
    """One run's event-loop side: producer, workers, periodic flush and progress."""

    def __init__(
        self, options: FetchOptions, writer: PartWriter, decode: Decode, stats: _Stats, progress: Progress | None
    ) -> None:
        self.options, self.writer, self.decode, self.stats, self.progress = options, writer, decode, stats, progress
        self.io = ThreadPoolExecutor(1, thread_name_prefix="vilbert-parts")  # one thread: parts in order
        self.writes: list[Future] = []

    async def main(self, rows: Iterable[UrlRow | BadLine], done: LineSet) -> None:
        n_workers = self.options.network.max_in_flight
        queue: asyncio.Queue = asyncio.Queue(maxsize=n_workers)
        ticker = asyncio.create_task(self._tick())
        try:
            async with Downloader(self.options.network) as downloader:
                self.stats.body_budget = downloader.budget.limit
                workers = [asyncio.create_task(self._worker(queue, downloader)) for _ in range(n_workers)]
                await self._produce(rows, done, queue, n_workers)
                await asyncio.gather(*workers)
                self.stats.body_peak = downloader.budget.peak
        finally:
            ticker.cancel()
            self._flush()
            self.io.shutdown(wait=True)
            self._check_writes()

    async def _produce(
        self, rows: Iterable[UrlRow | BadLine], done: LineSet, queue: asyncio.Queue, n_workers: int
    ) -> None:
        stats, shards, index = self.stats, self.options.num_shards, self.options.shard_index
        for count, row in enumerate(rows, start=1):
            stats.read += 1
            if row.line % shards != index:
                continue
            stats.in_shard += 1
            if row.line in done:
                stats.skipped_done += 1
            elif isinstance(row, BadLine):
                stats.malformed.append(row.line)
                self._fail(row.line, row.text, "malformed-line", None, row.message, False, 0, 0.0)
            else:
                await queue.put(row)
            if count % 4096 == 0:
                await asyncio.sleep(0)  # let workers run while a long skipped stretch is read
        for _ in range(n_workers):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue, downloader: Downloader) -> None:
        opts = self.options
        while (row := await queue.get()) is not None:
            self.stats.in_flight += 1
            got = None
            try:
                got = await downloader.get(row.url)
                if got.body is None:
                    self._fail(
                        row.line, row.url, got.reason, got.status, got.message, got.transient, got.attempts, got.seconds
                    )
                    continue
                self.stats.bytes_downloaded += len(got.body)
                try:
                    job = (got.body, opts.size, opts.mode, opts.quality, opts.max_pixels)
                    result = await self.decode(decode_job, *job)
                except Exception as err:  # a decoder crash must cost one image, not the run
                    result = ("fail", "decode-error", f"{type(err).__name__}: {err}")
                downloader.release(got)  # the body is decoded: its bytes go back to the budget
                if result[0] == "ok":
                    self._save(row, result, got.attempts)
                else:
                    self._fail(row.line, row.url, result[1], 200, result[2], False, got.attempts, got.seconds)
            finally:
                self.stats.in_flight -= 1
                if got is not None and got.held:
                    downloader.release(got)  # cancelled while decoding

    def _save(self, row: UrlRow, result: tuple, attempts: int) -> None:
        _, jpeg, width, height, orig_width, orig_height = result
        self.writer.add_saved(SavedRow(row.line, row.url, row.caption, jpeg, width, height, orig_width, orig_height))
        self.stats.saved += 1
        self.stats.bytes_saved += len(jpeg)
        if self.writer.due():
            self._flush()

    def _fail(
        self,
        line: int,
        url: str,
        reason: str | None,
        status: int | None,
        message: str,
        transient: bool,
        attempts: int,
        seconds: float,
    ) -> None:
        reason = reason or "error"
        self.writer.add_failed(FailedRow(line, url, reason, status, message, transient, attempts, seconds))
        self.stats.failed += 1
        self.stats.by_reason[reason] += 1
        if status is not None:
            self.stats.by_status[str(status)] += 1
        if self.writer.due():
            self._flush()

    def _flush(self) -> None:
        batch = self.writer.take()
        if batch is not None:
            self.writes.append(self.io.submit(self.writer.write, batch))

    def _check_writes(self) -> None:
        pending = []
        for future in self.writes:
            if not future.done():
                pending.append(future)
            elif future.exception() is not None:
                err = future.exception()
                raise FetchError(f"cannot write a part to {self.writer.out_dir}: {err}") from err
        self.writes = pending

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.writer.due():
                self._flush()
            self._check_writes()
            if self.progress is not None:
                self.progress(self.stats.snapshot())


def _finish(out: Path, options: FetchOptions, source: dict, stats: _Stats) -> dict:
    """Write the consolidated failures table and the report; return the report."""
    failures = read_failures(out)
    write_table_atomic(failures, out / "failures.arrow")
    elapsed = time.monotonic() - stats.started
    reasons = Counter(failures.column("reason").to_pylist())
    transient = [
        r for r in reasons if r in TRANSIENT_REASONS or r in ("http-408", "http-429") or r.startswith("http-5")
    ]
    report = {
        "source": source,
        "out": str(out),
        "options": {
            **{k: v for k, v in asdict(options).items() if k != "network"},
            "network": {**asdict(options.network), "proxy": redact_proxy(options.network.proxy)},
        },
        "run": {
            "lines_read": stats.read,
            "lines_in_shard": stats.in_shard,
            "skipped_already_done": stats.skipped_done,
            "attempted": stats.saved + stats.failed,
            "saved": stats.saved,
            "failed": stats.failed,
            "failed_by_reason": dict(sorted(stats.by_reason.items())),
            "failed_by_http_status": dict(sorted(stats.by_status.items())),
            "malformed_lines": stats.malformed[:1000],
            "bytes_downloaded": stats.bytes_downloaded,
            "bytes_saved": stats.bytes_saved,
            "body_memory_budget": stats.body_budget,
            "body_memory_peak": stats.body_peak,
            "duration_s": round(elapsed, 3),
            "images_per_s": round(stats.saved / elapsed, 2) if elapsed > 0 else 0.0,
            "urls_per_s": round((stats.saved + stats.failed) / elapsed, 2) if elapsed > 0 else 0.0,
        },
        "total": {
            "saved": count_fetched(out),
            "failed": failures.num_rows,
            "failed_by_reason": dict(sorted(reasons.items())),
            "retried_by_a_rerun": sum(reasons[r] for r in transient),
        },
    }
    write_json_atomic(out / "fetch-report.json", report)
    return report
