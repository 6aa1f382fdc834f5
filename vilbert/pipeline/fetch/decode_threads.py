"""Decode threads that answer the event loop in batches: fetch's thread pool.

`loop.run_in_executor(ThreadPoolExecutor)` costs, per image, a `concurrent.futures.Future` with its
condition and callbacks, an asyncio future chained to it, and one wake-up of the loop (a write to
its self-pipe) per finished job. Here a job is a plain tuple on a `queue.SimpleQueue`; a thread puts
its result on a deque and wakes the loop only when no wake-up is already pending, so one call on the
loop sets the futures of every job that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["DecodeThreads"]


class DecodeThreads:
    """`workers` threads running `submit`ted calls for an asyncio event loop."""

    def __init__(self, workers: int, name: str = "vilbert-decode") -> None:
        if workers < 1:
            raise ValueError(f"workers={workers!r} is invalid; valid: >= 1")
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` on a thread; the future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def shutdown(self) -> None:
        """Drop the jobs not started yet (their loop has ended), let the running ones finish, join the threads."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                outcome = (fn(*args), None)
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine, as an executor does
                outcome = (None, err)
            self._finished.append((future, outcome))
            with self._lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody waits for the result
                with self._lock:
                    self._wake_pending = False

    def _deliver(self) -> None:
        """On the loop: set the futures of every job finished so far."""
        with self._lock:
            self._wake_pending = False  # cleared before draining: a result appended from now on wakes us again
        while self._finished:
            future, (value, err) = self._finished.popleft()
            if future.cancelled():
                continue
            if err is None:
                future.set_result(value)
            else:
                future.set_exception(err)
