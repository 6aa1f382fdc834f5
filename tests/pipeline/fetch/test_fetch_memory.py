"""The body budget: unit behaviour, and a real fetch of many large bodies whose peak RSS stays
under the budget (with a control run that holds them all and shows the measurement sees them)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from vilbert.pipeline.fetch.budget import BodyBudget, default_body_memory

from .fetch_helpers import BackgroundServer

MIB = 1 << 20


def test_budget_grants_in_order_and_waits_for_room() -> None:
    async def main() -> list[str]:
        budget, events = BodyBudget(10), []

        async def take(name: str, n: int) -> None:
            await budget.take(n)
            events.append(f"{name}+{n}")

        await budget.take(6)
        waiting = [asyncio.create_task(take("a", 5)), asyncio.create_task(take("b", 1))]
        await asyncio.sleep(0)
        assert events == [] and budget.held == 6  # b fits, but a came first: in order
        budget.give(6)
        await asyncio.gather(*waiting)
        events.append(f"held={budget.held}")
        budget.give(6)
        await budget.take(25)  # larger than the whole budget: granted when nothing else is held
        events.append(f"peak={budget.peak}")
        return events

    assert asyncio.run(main()) == ["a+5", "b+1", "held=6", "peak=25"]


def test_a_cancelled_waiter_holds_nothing_and_lets_the_next_through() -> None:
    async def main() -> int:
        budget = BodyBudget(10)
        await budget.take(8)
        big = asyncio.create_task(budget.take(9))
        small = asyncio.create_task(budget.take(2))
        await asyncio.sleep(0)
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)
        await asyncio.wait_for(small, 5)  # freed by the cancellation, not by a give
        return budget.held

    assert asyncio.run(main()) == 10


def test_default_budget_reads_a_body_of_the_cap_and_is_at_most_a_gibibyte() -> None:
    assert 2 * 16 * MIB <= default_body_memory(16 * MIB) <= max(1 << 30, 32 * MIB)
    assert default_body_memory(2 << 30) == 4 << 30


# --------------------------------------------------------------------------- peak RSS of a real run

BODIES, BODY = 32, 8 * MIB

# Runs fetch in a fresh process: imports and the decode pool first, then the peak RSS is reset
# (/proc/self/clear_refs 5) so what is measured is the run's own growth.
FETCH_SCRIPT = """
import json, sys
from vilbert.pipeline.fetch import FetchOptions, NetworkOptions, fetch_cc

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

tsv, out, budget, empty = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
network = NetworkOptions(allow_private_networks=True, max_in_flight=64, per_host=0, timeout_s=120, retries=0,
                         max_body_memory=budget)
options = FetchOptions(network=network, decode_workers=2)
fetch_cc(empty, out + "-warm-up", options)  # torch, the decoders and aiohttp imported before the measurement
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status("VmRSS:")
report = fetch_cc(tsv, out, options)
print(json.dumps({"growth": status("VmHWM:") - baseline, "run": report["run"]}))
"""


class BodyServer(BackgroundServer):
    """Serves `/N` as `BODY` bytes of zeros with a Content-Length on 127.0.0.1; counts bodies open at
    once. With `hold_last_byte`, every body waits one byte short until all of them got that far."""

    def __init__(self, hold_last_byte: bool) -> None:
        super().__init__()
        self.hold_last_byte = hold_last_byte
        self.open = self.max_open = self.waiting = 0
        self._all_waiting = asyncio.Event()

    def routes(self) -> list[tuple[str, object]]:
        return [("127.0.0.1", self._body)]

    async def _body(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(BODY)})
        await response.prepare(request)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        chunk = bytes(MIB)
        for start in range(0, BODY - 1, MIB):
            await response.write(chunk[: min(MIB, BODY - 1 - start)])
        if self.hold_last_byte:
            self.waiting += 1
            if self.waiting == BODIES:
                self._all_waiting.set()
            await self._all_waiting.wait()
        await response.write(b"\0")
        await response.write_eof()
        self.open -= 1
        return response


@pytest.fixture
def fetch_in_a_process(tmp_path: Path) -> Iterator:
    def run(server: BodyServer, budget: int, name: str) -> dict:
        tsv = tmp_path / f"{name}.tsv"
        tsv.write_text("".join(f"body {i}\thttp://127.0.0.1:{server.port}/{i}\n" for i in range(BODIES)))
        empty = tmp_path / "empty.tsv"
        empty.write_text("")
        done = subprocess.run(
            [sys.executable, "-c", FETCH_SCRIPT, str(tsv), str(tmp_path / name), str(budget), str(empty)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    yield run


def test_peak_rss_of_many_large_bodies_in_flight_stays_under_the_budget(fetch_in_a_process) -> None:
    budget = 4 * BODY  # 32 MiB (two bodies being read: each counts twice until joined), against 256 MiB
    with BodyServer(hold_last_byte=False) as server:
        result = fetch_in_a_process(server, budget, "budgeted")
    run = result["run"]
    assert run["failed_by_reason"] == {"not-an-image": BODIES}, run  # every body was read in full
    assert run["bytes_downloaded"] == BODIES * BODY
    assert run["body_memory_budget"] == budget and run["body_memory_peak"] <= budget
    assert server.max_open > budget // BODY, "more bodies were open at the server than fit the budget"
    # Beyond the budget: aiohttp's read buffers (up to ~0.5 MiB per open connection) and allocator slack.
    allowance = BODIES * MIB
    assert result["growth"] < budget + allowance, f"peak RSS grew {result['growth'] / MIB:.0f} MiB"

    with BodyServer(hold_last_byte=True) as server:  # the control: nothing bounds what is held
        control = fetch_in_a_process(server, 1 << 30, "unbounded")
    assert control["run"]["failed_by_reason"] == {"not-an-image": BODIES}
    assert control["growth"] > (BODIES - 2) * BODY, "the measurement sees bodies held at once"
