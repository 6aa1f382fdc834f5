"""Logs for batch jobs: with output to a pipe, whole lines (never a path broken across two), one
timestamp format, and a progress line at a steady interval."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from vilbert.pipeline.preprocess import REPORT_NAME
from vilbert.pipeline.text import train_wordpiece

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (DEBUG|INFO|WARNING|ERROR|CRITICAL) +vilbert[\w.]*: ")
INTERVAL_S = 0.1  # short: a 3,000-image preprocess can finish in a second on a quiet machine


def run_in_a_pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VILBERT_PROGRESS_EVERY": str(INTERVAL_S), "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", "vilbert", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def assert_whole_log_lines(stderr: str) -> list[tuple[datetime, str]]:
    """Every stderr line is one log line in the one format; returns (time, message) pairs."""
    lines = []
    for line in stderr.splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a whole log line: {line!r}\n{stderr}"
        lines.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"), line[match.end() :]))
    return lines


def assert_steady_progress(lines: list[tuple[datetime, str]], label: str) -> list[str]:
    progress = [(t, m) for t, m in lines if m.startswith(f"{label}: ")]
    assert len(progress) >= 3, f"expected progress lines from {label}: {lines}"
    gaps = [(b - a).total_seconds() for (a, _), (b, _) in zip(progress, progress[1:], strict=False)]
    # A line comes when the interval has passed (at the next update, or from the heartbeat where a
    # single step may outlast it); timestamps have 1 s resolution.
    assert max(gaps) <= INTERVAL_S + 2, gaps
    return [m for _, m in progress]


def _images_with_a_long_path(root: Path, n: int) -> tuple[Path, Path]:
    deep = root / ("a-directory-with-a-name-long-enough-that-an-80-column-console-would-wrap-it" * 2)
    (deep / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(deep / "img" / f"{i:05d}.jpg", quality=80)
        rows.append(f"img/{i:05d}.jpg\ta red circle number {i}\n")
    listing = deep / "listing.tsv"
    listing.write_text("".join(rows))
    return deep, listing


def test_preprocess_in_a_pipe_logs_whole_lines_and_steady_progress(tmp_path: Path) -> None:
    data, listing = _images_with_a_long_path(tmp_path, 3000)
    tokenizer = tmp_path / "tokenizer.json"
    train_wordpiece(["a red circle number"] * 3, vocab_size=40).save(str(tokenizer))
    out = data / "cache"
    result = run_in_a_pipe(
        "preprocess", str(data), "--format", "folder", "--listing", str(listing), "--tokenizer", str(tokenizer),
        "--out", str(out), "--image-size", "32", "--workers", "1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = assert_whole_log_lines(result.stderr)
    messages = assert_steady_progress(lines, "preprocess")
    assert re.match(r"preprocess: [\d,]+/3,000 \(\d+%\) items, [\d.,]+ items/s, .*ETA \d+:\d\d:\d\d", messages[0])
    assert messages[-1].startswith("preprocess: 3,000/3,000 (100%) items") and "done in" in messages[-1]
    assert str(out / REPORT_NAME) in result.stdout, "the report's path is printed on one line"
    for line in (result.stdout + result.stderr).splitlines():
        if "a-directory-with" in line or "would-wrap-it" in line:
            assert str(data) in line, f"a path broken across lines: {line!r}"


def test_pretrain_in_a_pipe_logs_whole_lines_and_steady_progress(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / ("a-run-directory-with-a-name-long-enough-that-an-80-column-console-would-wrap-it" * 2)
    overrides = ["data.max_len=32", "pretrain.batch_size=8", "pretrain.epochs=6", "pretrain.log_every=5",
                 "pretrain.checkpoint_every=0"]  # fmt: skip
    settings = ["--preset", "tiny", "--device", "cpu", *(arg for o in overrides for arg in ("--set", o))]
    result = run_in_a_pipe("pretrain", "--data", str(tiny_cache), "--out", str(run), *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = assert_whole_log_lines(result.stderr)
    messages = assert_steady_progress(lines, "pretrain")
    eta = r"pretrain: [\d,]+/[\d,]+ \(\d+%\) steps, [\d.,]+ steps/s, .*ETA \d+:\d\d:\d\d"
    assert any(re.match(eta, m) for m in messages), messages
    assert "done in" in messages[-1]
    checkpoint = next(line for line in result.stdout.splitlines() if line.startswith("completed"))
    assert str(run / "checkpoints") in checkpoint, "the checkpoint's path is printed on one line"
    for line in (result.stdout + result.stderr).splitlines():
        if "a-run-directory" in line or "would-wrap-it" in line:
            assert str(run) in line, f"a path broken across lines: {line!r}"
