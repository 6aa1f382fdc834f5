"""Helpers for fetch tests: options for a fast loopback run, reading parts back, loopback servers."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
from aiohttp import web

from vilbert.pipeline.fetch import FetchOptions, NetworkOptions, read_failures
from vilbert.pipeline.fetch.shards import list_parts
from vilbert.pipeline.synthetic import ServerOptions

CORPUS_SIZE = 240
"""Six blocks of 40: every file variant, and with failure_rate 0.3 every failure kind, several times."""
SERVER = ServerOptions(failure_rate=0.3, slow_first_byte_s=0.5, retry_after_s=1, max_runtime_s=600)
DEADLINE_S = 2.0


def loopback_options(**kwargs) -> FetchOptions:
    network = NetworkOptions(allow_private_networks=True, timeout_s=DEADLINE_S, backoff_s=0.05, connect_timeout_s=2.0)
    return FetchOptions(**{"rows_per_part": 40, "network": network, **kwargs})


def saved_rows(*out_dirs: Path) -> list[dict]:
    """Every row of every complete image part, without the JPEG bytes (duplicates kept)."""
    rows = []
    for out in out_dirs:
        for _, path in list_parts(out, "images"):
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all().drop_columns(["jpeg"])
            rows += table.to_pylist()
    return rows


def url_path(url: str) -> str:
    return urlsplit(url).path


def expected_outcome(tsv: Path, plan: dict) -> tuple[set[int], dict[int, str]]:
    """Lines a correct fetch saves, and the reason of every other line."""
    saved, failed = set(), {}
    for number, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        outcome = plan[url_path(line.split("\t")[1])]
        if outcome.expect_saved:
            saved.add(number)
        else:
            failed[number] = outcome.reason
    return saved, failed


def assert_complete(outs: list[Path], saved: set[int], failed: dict[int, str]) -> None:
    lines = [r["line"] for r in saved_rows(*outs)]
    assert len(lines) == len(set(lines)), "a row saved twice"
    assert set(lines) == saved, f"missing {sorted(saved - set(lines))[:10]}, extra {sorted(set(lines) - saved)[:10]}"
    reasons = {f["line"]: f["reason"] for out in outs for f in read_failures(out).to_pylist()}
    assert reasons == failed


class BackgroundServer:
    """aiohttp apps served on loopback from a thread with its own event loop; a context manager.

    Subclasses give `routes()`: (host, handler) pairs, each served at `/{name}` on a free port
    (`self.ports[host]`). Handlers may wait on `self.stopping` (set when the server stops).
    """

    ssl_context = None
    """A server-side `ssl.SSLContext` to serve https instead of http (set before entering)."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def routes(self) -> list[tuple[str, object]]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        """The port on 127.0.0.1."""
        return self.ports["127.0.0.1"]

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        runners = []
        for host, handler in self.routes():
            app = web.Application()
            app.router.add_get("/{name:.*}", handler)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, host, 0, ssl_context=self.ssl_context).start()
            self.ports[host] = runner.addresses[0][1]
            runners.append(runner)
        self._ready.set()
        await self.stopping.wait()
        for runner in runners:
            await runner.cleanup()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self.stopping.set)
        self._thread.join(5)
