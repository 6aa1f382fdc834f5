"""`vilbert preprocess --resume` killed with SIGKILL at random points, ten times, then finished: the
cache holds every usable row once, byte for byte what an uninterrupted run writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vilbert.cache import MANIFEST_NAME, CacheReader, verify_cache
from vilbert.pipeline.text import train_wordpiece

from .test_preprocess import WORDS, _jpeg, shard_digests, write_fetch_output

ROOT = Path(__file__).resolve().parents[2]
ROWS = 6000


def committed_shards(out: Path) -> int:
    return len(list(out.glob("*/shard-*.arrow")))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_sigkills_then_resume_leave_no_duplicate_and_no_missing_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rows, usable = [], set()
    for i in range(ROWS):
        caption = "" if i % 211 == 3 else " ".join(rng.choice(WORDS, 5))
        broken = i % 97 == 11
        rows.append((caption, b"\xff\xd8\xff\xe0 broken" if broken else _jpeg(rng)))
        if caption and not broken:
            usable.add(i)
    source = tmp_path / "fetched"
    write_fetch_output(source, rows, part_rows=500)
    tokenizer = tmp_path / "tokenizer.json"
    train_wordpiece([c for c, _ in rows[:500]], vocab_size=60).save(str(tokenizer))
    command = [sys.executable, "-m", "vilbert", "preprocess", str(source), "--tokenizer", str(tokenizer),
               "--image-size", "32", "--pixel-dtype", "uint8", "--max-len", "8", "--shard-mb", "0.05",
               "--workers", "2"]  # fmt: skip

    started = time.perf_counter()
    clean = subprocess.run([*command, "--to-mmap", str(tmp_path / "clean")], capture_output=True, text=True, cwd=ROOT)
    clean_s = time.perf_counter() - started
    assert clean.returncode == 0, clean.stderr[-2000:]

    out, chooser = tmp_path / "killed", random.Random(18)
    for round_ in range(10):
        before = committed_shards(out)
        extra = ["--resume"] if round_ else []
        log = tmp_path / f"round-{round_}.log"  # a file, not a pipe: a full pipe would stall the run
        with open(log, "wb") as stderr:
            process = subprocess.Popen([*command, "--to-mmap", str(out), *extra], cwd=ROOT, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
            while process.poll() is None and committed_shards(out) <= before:  # progress in this round first
                time.sleep(0.01)
            # Then a random point (decoding, writing, committing), soon enough that ten rounds cannot finish
            # the run on a fast machine: the whole clean run (start-up included) took `clean_s`.
            time.sleep(chooser.uniform(0.0, clean_s / 25))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.returncode == -signal.SIGKILL, (
            f"round {round_} ended by itself (exit code {process.returncode}) before the kill: "
            f"{log.read_text(errors='replace')[-2000:]}"
        )
        assert not (out / "train" / MANIFEST_NAME).exists()

    finished = subprocess.run([*command, "--to-mmap", str(out), "--resume"], capture_output=True, text=True, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    keys = []
    for split in ("train", "test"):
        reader = CacheReader(out / split)
        keys += reader.keys(np.arange(len(reader)))
        assert verify_cache(out / split).ok
        assert shard_digests(out / split) == shard_digests(tmp_path / "clean" / split)
    assert len(keys) == len(set(keys)), "a row written twice"
    assert sorted(int(k.split("-")[0]) for k in keys) == sorted(i + 1 for i in usable), "a row missing"
