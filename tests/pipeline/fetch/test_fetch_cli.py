"""Resume and split: `vilbert fetch` killed with SIGKILL and rerun; a list split over three machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from vilbert.pipeline.fetch import fetch_cc, iter_fetched, read_failures
from vilbert.pipeline.fetch.shards import list_parts
from vilbert.pipeline.synthetic import serve_in_background, write_cc_tsv

from .fetch_helpers import DEADLINE_S, SERVER, assert_complete, expected_outcome, loopback_options, saved_rows


def fetch_command(tsv: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vilbert", "fetch", "cc", "--tsv", str(tsv), "--out", str(out),
            "--allow-private-networks", "--timeout", str(DEADLINE_S), *extra]  # fmt: skip


def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(corpus: Path, tmp_path: Path) -> None:
    slow = replace(SERVER, latency_ms=300)
    out = tmp_path / "out"
    with serve_in_background(corpus, slow) as server:
        tsv = write_cc_tsv(corpus, server.base_url, tmp_path / "cc.tsv")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(fetch_command(tsv, out, "--max-in-flight", "6", "--rows-per-part", "8"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        deadline = time.monotonic() + 90
        while len(list_parts(out, "images")) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        first = saved_rows(out)
        assert 0 < len(first) < 150, "killed mid-run"
        done = subprocess.run(fetch_command(tsv, out, "--max-in-flight", "64"), capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        saved, failed = expected_outcome(tsv, server.plan)
    assert_complete([out], saved, failed)
    report = json.loads((out / "fetch-report.json").read_text())
    assert report["run"]["skipped_already_done"] >= len(first)
    assert not list((out / "images").glob("*.tmp"))


def test_three_shards_cover_the_list_disjointly(corpus: Path, tmp_path: Path) -> None:
    # In-process (the CLI flags are the FetchOptions fields; see the usage-error test): three
    # subprocesses would triple the start-up cost of the default test run.
    with serve_in_background(corpus, SERVER) as server:
        tsv = write_cc_tsv(corpus, server.base_url, tmp_path / "cc.tsv")
        outs = [tmp_path / f"out-{i}" for i in range(3)]
        for i, out in enumerate(outs):
            fetch_cc(tsv, out, loopback_options(shard_index=i, num_shards=3))
        saved, failed = expected_outcome(tsv, server.plan)
    for i, out in enumerate(outs):
        assert all(r["line"] % 3 == i for r in saved_rows(out))
        assert all(line % 3 == i for line in read_failures(out).column("line").to_pylist())
    assert_complete(outs, saved, failed)
    merged = [line for batch in iter_fetched(outs) for line in batch.column("line").to_pylist()]
    assert merged == sorted(saved)


def test_usage_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("hi\thttp://example.com/a.jpg\n")
    done = subprocess.run(fetch_command(tsv, tmp_path / "out", "--shard-index", "3", "--num-shards", "3"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "shard_index=3" in done.stderr and "Traceback" not in done.stderr
