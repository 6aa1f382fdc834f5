"""The issue's acceptance run: 3,000 URLs with the full failure mix (slow: generates its own corpus)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vilbert.pipeline.fetch import NetworkOptions, fetch_cc, read_failures
from vilbert.pipeline.synthetic import ServerOptions, generate_corpus, serve_in_background, write_cc_tsv

from .fetch_helpers import assert_complete, expected_outcome, loopback_options, saved_rows, url_path

DEADLINE_S = 5.0


@pytest.mark.slow
def test_three_thousand_urls_full_failure_mix(tmp_path: Path) -> None:
    corpus = generate_corpus(tmp_path / "corpus", 3000, seed=1)
    out = tmp_path / "out"
    with serve_in_background(corpus, ServerOptions(latency_ms=50, jitter_ms=50, max_runtime_s=900)) as server:
        tsv = write_cc_tsv(corpus, server.base_url, tmp_path / "cc.tsv")
        network = NetworkOptions(allow_private_networks=True, per_host=0, timeout_s=DEADLINE_S)
        options = loopback_options(rows_per_part=1000, network=network)
        start = time.monotonic()
        report = fetch_cc(tsv, out, options)
        elapsed = time.monotonic() - start
        attempts = server.attempts
        saved, failed = expected_outcome(tsv, server.plan)
        assert len(saved) > 2000 and {"opt-out", "timeout", "http-404", "truncated"} <= set(failed.values())
        failures = {f["line"]: f for f in read_failures(out).to_pylist()}
        by_path = {url_path(f["url"]): f for f in failures.values()}
        # A slow body is not retried in the run: every endless or stalled URL's last attempt got its
        # headers, then met the deadline. The server shares this process and its 2 cores with the
        # fetch, so on a busy CI machine an answer can come seconds late: an attempt whose deadline
        # came before the headers is retried (as it should be), which may happen to a few.
        slow = {p for p, o in server.plan.items() if o.kind in ("endless", "stall")}
        assert slow and all(by_path[p]["message"].startswith("body not complete") for p in slow)
        retried = [p for p in slow if attempts[p] > 1]
        seen = {p: (attempts[p], by_path[p]["attempts"], by_path[p]["seconds"]) for p in retried}
        assert len(retried) <= max(2, len(slow) // 10), f"slow URLs attempted again (server, client, s): {seen}"
        # The same lag can end a body read at the deadline: the fetch records such a URL as a
        # transient timeout, which a rerun retries; anything else, or more than a few, fails here.
        first = {r["line"] for r in saved_rows(out)}
        late = saved - first
        assert first <= saved and report["run"]["saved"] == len(first)
        assert all(failures[line]["reason"] == "timeout" and failures[line]["transient"] for line in late)
        assert len(late) <= len(saved) // 50, f"{len(late)} servable URLs timed out"
        if late:
            assert fetch_cc(tsv, out, options)["run"]["saved"] == len(late)
    assert_complete([out], saved, failed)
    timeouts = [f for f in read_failures(out).to_pylist() if f["reason"] == "timeout" and f["attempts"] == 1]
    # + event-loop lag: 3,000 URLs in flight on 2 busy cores measured up to 2.5 s late (load 10)
    assert timeouts and max(f["seconds"] for f in timeouts) <= DEADLINE_S + 3.0
    assert elapsed < 240, "the run ends by itself"
