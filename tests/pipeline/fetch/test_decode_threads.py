"""Fetch's decode threads: results, errors, batched wake-ups, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vilbert.pipeline.fetch.decode_threads import DecodeThreads


def _named(i: int) -> tuple[int, str]:
    return i, threading.current_thread().name


def test_every_result_reaches_its_own_future() -> None:
    threads = DecodeThreads(3)
    try:

        async def main() -> list[tuple[int, str]]:
            return await asyncio.gather(*[threads.submit(_named, i) for i in range(500)])

        results = asyncio.run(main())
    finally:
        threads.shutdown()
    assert [i for i, _ in results] == list(range(500))
    assert {name for _, name in results} <= {f"vilbert-decode_{i}" for i in range(3)}


def test_an_exception_reaches_the_awaiting_coroutine_and_the_threads_go_on() -> None:
    def job(i: int) -> int:
        if i % 2:
            raise ValueError(f"bad {i}")
        return i

    threads = DecodeThreads(2)
    try:

        async def main() -> list:
            return await asyncio.gather(*[threads.submit(job, i) for i in range(20)], return_exceptions=True)

        results = asyncio.run(main())
    finally:
        threads.shutdown()
    assert results[::2] == list(range(0, 20, 2))
    assert [str(err) for err in results[1::2]] == [f"bad {i}" for i in range(1, 20, 2)]


def test_results_finished_together_wake_the_loop_once() -> None:
    threads = DecodeThreads(4)
    release = threading.Event()
    calls = []
    try:

        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            original = loop.call_soon_threadsafe

            def counted(callback, *args):
                calls.append(callback)
                return original(callback, *args)

            loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
            futures = [threads.submit(lambda i: release.wait() and i, i) for i in range(4)]
            # Hold the loop while all four finish: their results wait in one batch.
            release.set()
            time.sleep(0.3)
            return await asyncio.gather(*futures)

        assert asyncio.run(main()) == [0, 1, 2, 3]
    finally:
        threads.shutdown()
    assert len(calls) == 1, f"{len(calls)} wake-ups for 4 results finished while the loop was busy"


def test_a_cancelled_wait_leaves_the_others_their_results() -> None:
    threads = DecodeThreads(1)
    gate = threading.Event()
    try:

        async def main() -> int:
            slow = threads.submit(gate.wait, 5)
            later = threads.submit(lambda: 7)
            slow.cancel()
            gate.set()
            return await later

        assert asyncio.run(main()) == 7
    finally:
        threads.shutdown()


def test_shutdown_drops_jobs_not_started_and_joins_the_threads() -> None:
    threads = DecodeThreads(1)
    gate, ran = threading.Event(), []

    async def main() -> None:
        threads.submit(gate.wait, 5)
        for i in range(10):
            threads.submit(ran.append, i)

    asyncio.run(main())  # the loop ends with the jobs queued (as a run stopped by an error does)
    stopper = threading.Timer(0.2, gate.set)
    stopper.start()
    start = time.monotonic()
    threads.shutdown()
    assert ran == [] and time.monotonic() - start < 3
    assert not any(t.name.startswith("vilbert-decode") and t.is_alive() for t in threading.enumerate())


def test_no_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="workers=0"):
        DecodeThreads(0)
