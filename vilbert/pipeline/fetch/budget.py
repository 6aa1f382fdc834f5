"""The byte budget of response bodies held at once: from the first byte read until decoded.

Caps per response (`max_bytes`) and per run (`max_in_flight`) alone allow `512 * 16 MiB = 8 GiB` of
bodies at once; the budget bounds their sum. The downloader reserves twice a body's `Content-Length`
before reading it (its chunks, then for a moment their join; a body waiting for room holds nothing
meanwhile) or, without one, twice the bytes as they arrive; it keeps one body's worth once the body
is joined, and the run gives that back once the body is decoded. Not in the budget: aiohttp's read
buffer of each open connection (up to ~0.5 MiB, times `max_in_flight`) and the allocator's slack.
Waiting for room happens inside the request's deadline, so a starved read ends as a `timeout`
(transient: a rerun retries it), never a hang.
"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

__all__ = ["BodyBudget", "default_body_memory"]


def default_body_memory(max_bytes: int) -> int:
    """A quarter of the available memory (cgroup limit included), at most 1 GiB, at least one `max_bytes` read.

    Web images average ~100 KB, so 1 GiB holds thousands in flight; the cap keeps a run with a
    large `max_bytes` from holding `max_in_flight * max_bytes` (8 GiB by default) at once.
    """
    return max(min(_available_memory() // 4, 1 << 30), 2 * max_bytes)


def _available_memory() -> int:
    """MemAvailable, or what the cgroup (container, Slurm job) still allows if that is less."""
    available = 2 << 30  # unknown (not Linux): assume a small machine
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            current = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - current)
    except (OSError, ValueError):
        pass
    return max(available, 0)


class BodyBudget:
    """An asyncio byte budget: `take(n)` waits until `n` more bytes fit, `give(n)` returns them.

    Waiters are served in order. A reservation larger than the whole budget is granted when nothing
    else is held, so one body up to the byte cap always proceeds.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.held, self.peak = limit, 0, 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self._grant(n)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(n)  # granted just as the deadline cancelled the read
            else:
                self._wake()  # a large waiter leaving may let smaller ones through
            raise

    def give(self, n: int) -> None:
        self.held -= n
        self._wake()

    def _fits(self, n: int) -> bool:
        return self.held + n <= self.limit or self.held == 0

    def _grant(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def _wake(self) -> None:
        while self._waiters:
            n, waiter = self._waiters[0]
            if waiter.done():  # cancelled
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._grant(n)
            waiter.set_result(None)
