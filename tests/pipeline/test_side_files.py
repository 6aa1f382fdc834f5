"""Side files of fetch and preprocess: durable before what they describe, one clear error when corrupt."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vilbert.errors import DataError, FetchError
from vilbert.pipeline._preprocess_io import SkipLog
from vilbert.pipeline.fetch import fetch_cc
from vilbert.pipeline.preprocess import SKIPS_NAME, PreprocessOptions, preprocess
from vilbert.pipeline.sources import FetchSource, assign_splits
from vilbert.pipeline.text import train_wordpiece

from .test_preprocess import WORDS, _jpeg, shard_digests, write_fetch_output

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """120 fetch-output rows at 32x32, every 13th undecodable."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(120):
        caption = " ".join(rng.choice(WORDS, 4))
        rows.append((caption, b"\xff\xd8\xff\xe0 broken" if i % 13 == 5 else _jpeg(rng)))
    out = tmp_path_factory.mktemp("dirty") / "fetched"
    write_fetch_output(out, rows)
    return {"dir": out, "tokenizer": train_wordpiece([c for c, _ in rows], vocab_size=60)}


def options(**kwargs) -> PreprocessOptions:
    base = {"image_size": 32, "max_len": 8, "chunk_size": 8, "workers": 0, "target_shard_bytes": 30_000}
    return PreprocessOptions(**{**base, **kwargs})


def crash_after(chunks: int):
    calls = []

    def progress(state: dict) -> None:
        calls.append(state)
        if len(calls) == chunks:
            raise RuntimeError("simulated crash")

    return progress


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every fsync (by path) and every skip-log append (split, ordinal), in order, from any thread."""
    events: list[tuple[str, ...]] = []
    lock = threading.Lock()
    real_fsync, real_append = os.fsync, SkipLog.append

    def fsync(fd: int) -> None:
        real_fsync(fd)
        with lock:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def append(self, split: str, ordinal: int, *args) -> None:
        real_append(self, split, ordinal, *args)
        with lock:
            events.append(("append", split, ordinal))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(SkipLog, "append", append)
    return events


def test_skips_are_fsynced_before_the_shards_they_describe(tmp_path: Path, dirty: dict, fsyncs: list) -> None:
    """A shard holding rows that come after skip k in its split is committed only once k is durable:
    a resume fast-forwards through the kept shards by the log alone."""
    report = preprocess(FetchSource([dirty["dir"]]), tmp_path / "out", dirty["tokenizer"], options())
    assert report.skipped == {"undecodable": 9}
    ordinal = {}  # key -> (split, position among the split's samples), as preprocess counts them
    counts: dict[str, int] = {}
    for item in assign_splits(FetchSource([dirty["dir"]]), 0.8):
        ordinal[item.key] = (item.split, counts.setdefault(item.split, 0))
        counts[item.split] += 1
    checked = 0
    for at, event in enumerate(fsyncs):
        path = Path(event[1]) if event[0] == "fsync" else None
        if path is None or not path.name.startswith(".shard-"):
            continue
        split = path.parent.name
        shard = pa.ipc.open_file(str(path.parent / path.name[1:].removesuffix(".tmp"))).read_all()
        last = max(ordinal[key][1] for key in shard.column("key").to_pylist())
        synced = False
        for earlier in reversed(fsyncs[:at]):
            if earlier[0] == "fsync" and Path(earlier[1]).name == SKIPS_NAME:
                synced = True
            elif earlier[0] == "append" and earlier[1] == split and earlier[2] < last:
                assert synced, f"{split} skip {earlier[2]} not durable before {path.name} (rows up to {last})"
                checked += 1
    assert checked > 5  # the check ran against real skips that shards came after


def test_reports_and_state_are_written_durably(tmp_path: Path, dirty: dict, fsyncs: list) -> None:
    preprocess(FetchSource([dirty["dir"]]), tmp_path / "out", dirty["tokenizer"], options())
    tsv = tmp_path / "empty.tsv"
    tsv.write_text("")
    fetch_cc(tsv, tmp_path / "fetched", None)
    names = [Path(event[1]).name for event in fsyncs if event[0] == "fsync"]
    for written in (".preprocess-report.json.tmp", ".fetch-state.json.tmp", ".fetch-report.json.tmp"):
        at = names.index(written)
        assert names[at + 1] in ("out", "fetched"), f"{written}: its directory is not fsynced after the rename"


def test_a_torn_skip_log_line_is_cut_and_the_resume_matches_a_clean_run(tmp_path: Path, dirty: dict) -> None:
    source, tok = FetchSource([dirty["dir"]]), dirty["tokenizer"]
    preprocess(source, tmp_path / "clean", tok, options())
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(source, tmp_path / "crashed", tok, options(), progress=crash_after(7))
    log = tmp_path / "crashed" / SKIPS_NAME
    complete = log.read_bytes()
    with open(log, "ab") as handle:
        handle.write(b'{"split": "train", "ordi')  # a crash in the middle of an append
    report = preprocess(source, tmp_path / "crashed", tok, options(mode="resume"))
    assert report.rows_resumed > 0 and report.skipped == {"undecodable": 9}
    assert log.read_bytes().startswith(complete) and b'"ordi\n' not in log.read_bytes()
    for split in ("train", "test"):
        assert shard_digests(tmp_path / "crashed" / split) == shard_digests(tmp_path / "clean" / split)


@pytest.mark.parametrize("content", [b"", b"\n", b'{"run": ', b"[1, 2]\n", b'{"other": 1}\n'])
def test_an_empty_or_corrupt_skip_log_is_one_clear_error(tmp_path: Path, dirty: dict, content: bytes) -> None:
    source, tok = FetchSource([dirty["dir"]]), dirty["tokenizer"]
    with pytest.raises(RuntimeError):
        preprocess(source, tmp_path / "out", tok, options(), progress=crash_after(7))
    (tmp_path / "out" / SKIPS_NAME).write_bytes(content)
    with pytest.raises(DataError, match=f"{SKIPS_NAME} is empty or corrupt.*--overwrite"):
        preprocess(source, tmp_path / "out", tok, options(mode="resume"))


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", "\ufeff\x00"])
def test_an_empty_or_corrupt_fetch_state_is_one_clear_error(tmp_path: Path, content: str) -> None:
    tsv = tmp_path / "list.tsv"
    tsv.write_text("a caption\thttp://example.invalid/x.jpg\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "fetch-state.json").write_text(content)
    with pytest.raises(FetchError, match="fetch-state.json is empty or corrupt .*Delete it and rerun"):
        fetch_cc(tsv, out)


def test_the_cli_says_it_in_one_red_line_with_exit_code_1(tmp_path: Path) -> None:
    tsv = tmp_path / "list.tsv"
    tsv.write_text("a caption\thttp://example.invalid/x.jpg\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fetch-state.json").write_text("")
    command = [sys.executable, "-m", "vilbert", "fetch", "cc", "--tsv", str(tsv), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(lines) == 1 and "fetch-state.json is empty or corrupt" in lines[0], done.stderr
