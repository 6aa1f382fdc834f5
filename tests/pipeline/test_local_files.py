"""Listing paths are confined to the dataset root: `LocalFile` on its own, then a trap directory for
each source format through `vilbert preprocess` in a real process (which must end by itself)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vilbert.cache import CacheReader
from vilbert.pipeline.local_files import DEFAULT_MAX_FILE_BYTES, LocalFile, LocalFileError
from vilbert.pipeline.text import train_wordpiece

ROOT = Path(__file__).resolve().parents[2]


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


def make_traps(base: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A dataset root under `base` with good images and traps: {listed path: reason}, good paths."""
    root = base / "data"
    (root / "img").mkdir(parents=True)
    (base / "secret.png").write_bytes(png(99))  # a real image, outside the root
    good = []
    for i in range(4):
        (root / "img" / f"good{i}.png").write_bytes(png(i))
        good.append(f"img/good{i}.png")
    (root / "img" / "inner-link.png").symlink_to(root / "img" / "good0.png")  # inward: fine
    good.append("img/inner-link.png")
    (root / "img" / "outward.png").symlink_to(base / "secret.png")
    (root / "img" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "img" / "fifo.png")
    (root / "img" / "folder.png").mkdir()
    (root / "img" / "doc.eps").write_bytes(EPS)
    with open(root / "img" / "huge.png", "wb") as huge:  # 100 MiB, sparse: a PNG header, then holes
        huge.write(png(5))
        huge.truncate(100 << 20)
    traps = {
        "../secret.png": "outside-root",
        "img/../../secret.png": "outside-root",
        str(base / "secret.png"): "outside-root",
        "/dev/zero": "outside-root",
        "/etc/passwd": "outside-root",
        "img/outward.png": "outside-root",
        "img/zero.png": "outside-root",
        "img/fifo.png": "not-a-file",
        "img/folder.png": "not-a-file",
        "img": "not-a-file",
        "img/doc.eps": "not-an-image",
        "img/huge.png": "too-large",
        "img/gone.png": "missing-image",
    }
    return root, traps, good


# ------------------------------------------------------------------------------------- LocalFile


def test_local_file_reads_only_confined_regular_files_under_the_cap(tmp_path: Path) -> None:
    root, traps, good = make_traps(tmp_path)
    resolved = root.resolve()
    for name in good:
        assert LocalFile(resolved, name).read() == (root / name).read_bytes()
    for name, reason in traps.items():
        if reason == "not-an-image":
            continue  # a regular file: the image gate's job
        with pytest.raises(LocalFileError) as info:
            LocalFile(resolved, name, where="list.tsv:7").read()
        assert info.value.reason == reason, (name, str(info.value))
        assert "list.tsv:7" in str(info.value)
    small = LocalFile(resolved, "img/good0.png", max_bytes=100)
    with pytest.raises(LocalFileError, match="above the cap of 100") as info:
        small.read()
    assert info.value.reason == "too-large"
    assert DEFAULT_MAX_FILE_BYTES == 64 << 20


# ------------------------------------------------------------------------------ trap directories


def hateful_memes(root: Path, traps: dict[str, str], good: list[str]) -> list[str]:
    lines = [{"id": f"g{i}", "img": name, "label": i % 2, "text": f"good meme {i}"} for i, name in enumerate(good)]
    lines += [{"id": f"t{i}", "img": name, "label": 0, "text": f"trap {i}"} for i, name in enumerate(traps)]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return ["--format", "hateful-memes"]


def folder_tsv(root: Path, traps: dict[str, str], good: list[str]) -> list[str]:
    rows = [f"{name}\tgood picture {i}\n" for i, name in enumerate(good)]
    rows += [f"{name}\ttrap {i}\n" for i, name in enumerate(traps)]
    (root / "list.tsv").write_text("image\tcaption\n" + "".join(rows), encoding="utf-8")
    return ["--format", "folder", "--listing", str(root / "list.tsv")]


def folder_jsonl(root: Path, traps: dict[str, str], good: list[str]) -> list[str]:
    rows = [{"key": f"g{i}", "image": n, "caption": f"good picture {i}", "split": "train"} for i, n in enumerate(good)]
    rows += [{"key": f"t{i}", "path": n, "caption": f"trap {i}", "split": "train"} for i, n in enumerate(traps)]
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ["--format", "folder", "--listing", str(root / "list.jsonl")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [hateful_memes, folder_tsv, folder_jsonl], ids=lambda f: f.__name__)
def test_a_trap_directory_is_skipped_and_counted_and_every_good_row_cached(tmp_path: Path, layout) -> None:
    root, traps, good = make_traps(tmp_path)
    tokenizer = tmp_path / "tokenizer.json"
    train_wordpiece(["good meme picture trap"] * 4, vocab_size=40, min_frequency=1).save(str(tokenizer))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vilbert", "preprocess", str(root), *layout(root, traps, good)]
    command += ["--to-mmap", str(out), "--tokenizer", str(tokenizer), "--image-size", "32", "--workers", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)  # a FIFO would hang it
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output[-3000:]
    report = json.loads((out / "preprocess-report.json").read_text(encoding="utf-8"))
    expected: dict[str, int] = {}
    for reason in traps.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped"] == expected
    assert report["rows"] == len(good)
    cached = set()
    for split in report["splits"]:
        cached |= set(CacheReader(out / split).keys(range(report["splits"][split]["rows"])))
    assert len(cached) == len(good) and not any(key.startswith("t") or key in traps for key in cached)
    listing_lines = {e.split(": ", 1)[1].split(": ", 1)[0] for es in report["examples"].values() for e in es}
    assert all(":" in where and where.rsplit(":", 1)[1].isdigit() for where in listing_lines), listing_lines
