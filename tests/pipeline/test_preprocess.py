"""preprocess: the synthetic chain end to end, memes splits, dirty data, determinism and resume."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from tokenizers import Tokenizer
from typer.testing import CliRunner

from vilbert.cache import CacheReader, CacheWriter, verify_cache
from vilbert.errors import DataError, UsageError
from vilbert.pipeline._decode_pool import DecodePool
from vilbert.pipeline.fetch import IMAGE_SCHEMA, sample_key
from vilbert.pipeline.images import encode_jpeg
from vilbert.pipeline.preprocess import (
    REPORT_NAME,
    PreprocessOptions,
    _RunState,
    parse_normalization,
    preprocess,
)
from vilbert.pipeline.sources import FetchSource, FolderSource, open_source, split_for_key
from vilbert.pipeline.synthetic import ServerOptions, generate_memes, serve_in_background
from vilbert.pipeline.text import train_wordpiece

WORDS = tuple("a small big red blue green circle square triangle left right of above below the near".split())  # noqa: SIM905


def _app():
    from vilbert.cli.app import app

    return app


def invoke(*args: str) -> str:
    result = CliRunner().invoke(_app(), list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def reference_pixels(jpeg: bytes, size: int, mean: tuple, std: tuple) -> np.ndarray:
    """PIL decode and resize, numpy normalize: the independent reference, float64 (3, H, W)."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if image.size != (size, size):  # the fetch output is already square at the size
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, np.float64) / 255.0
    return ((array - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def expected_ids(tokenizer: Tokenizer, caption: str, max_len: int) -> list[int]:
    """The tokenizer's own `encode`, truncated keeping [SEP] and padded with [PAD], by hand."""
    ids = tokenizer.encode(caption).ids
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + [ids[-1]]
    return ids + [tokenizer.token_to_id("[PAD]")] * (max_len - len(ids))


def shard_digests(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("shard-*.arrow"))}


def write_fetch_output(out: Path, rows: list[tuple[str, bytes]], part_rows: int = 25) -> None:
    """A fetch output directory as the contract describes it: Arrow IPC parts with IMAGE_SCHEMA."""
    (out / "images").mkdir(parents=True)
    for part, start in enumerate(range(0, len(rows), part_rows)):
        chunk = list(enumerate(rows[start : start + part_rows], start=start + 1))
        url = [f"http://127.0.0.1/{line}.jpg" for line, _ in chunk]
        ints = pa.array([32] * len(chunk), pa.int32())
        table = pa.table(
            [
                pa.array([sample_key(line, u, c) for (line, (c, _)), u in zip(chunk, url, strict=True)]),
                pa.array([line for line, _ in chunk], pa.int64()),
                pa.array(url),
                pa.array([c for _, (c, _) in chunk]),
                pa.array([j for _, (_, j) in chunk], pa.binary()),
                ints,
                ints,
                ints,
                ints,
            ],
            schema=IMAGE_SCHEMA,
        )
        path = out / "images" / f"part-{part:06d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, IMAGE_SCHEMA) as writer:
            writer.write_table(table)


def _jpeg(rng: np.random.Generator, size: int = 32) -> bytes:
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return encode_jpeg(np.ascontiguousarray(np.kron(base, np.ones((size // 4, size // 4, 1), np.uint8))))


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """80 fetch-output rows at 32x32: 3 undecodable JPEGs and 2 blank captions among them."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        caption = " ".join(rng.choice(WORDS, rng.integers(2, 12)))
        if i in (5, 41):
            caption = "  "
        jpeg = b"\xff\xd8\xff\xe0 not really a jpeg" if i in (3, 30, 77) else _jpeg(rng)
        rows.append((caption, jpeg))
    out = tmp_path_factory.mktemp("fetched") / "out"
    write_fetch_output(out, rows)
    tokenizer = train_wordpiece([c for c, _ in rows], vocab_size=60)
    return {"dir": out, "rows": rows, "tokenizer": tokenizer}


def small(**kwargs) -> PreprocessOptions:
    return PreprocessOptions(**{"image_size": 32, "max_len": 8, "chunk_size": 16, "workers": 2, **kwargs})


# ------------------------------------------------------------------------------------ chain


def test_synthetic_chain_cli(tmp_path: Path) -> None:
    """synth corpus -> loopback server -> fetch cc -> preprocess --to-mmap -> cache verify."""
    corpus, fetched, caches, tok = tmp_path / "corpus", tmp_path / "fetched", tmp_path / "caches", tmp_path / "t.json"
    invoke("synth", "corpus", "--n", "60", "--out", str(corpus))
    options = ServerOptions(failure_rate=0.2, kinds=("not-found", "unavailable", "html", "truncated"))
    with serve_in_background(corpus, options) as server:
        tsv = tmp_path / "cc.tsv"
        tsv.write_text(
            (corpus / "cc.tsv").read_text(encoding="utf-8").replace("http://127.0.0.1:8765", server.base_url)
        )
        invoke("fetch", "cc", "--tsv", str(tsv), "--out", str(fetched), "--allow-private-networks", "--timeout", "5")
    invoke("tokenizer", "train", str(fetched), "--vocab-size", "200", "--out", str(tok))
    output = invoke("preprocess", str(fetched), "--to-mmap", str(caches), "--tokenizer", str(tok), "--workers", "2")
    assert "train" in output and "test" in output
    for split in ("train", "test"):
        assert "OK" in invoke("cache", "verify", str(caches / split))

    from vilbert.pipeline.fetch import iter_fetched

    fetched_rows = {r["key"]: r for b in iter_fetched(fetched) for r in b.to_pylist()}
    tokenizer = Tokenizer.from_file(str(tok))
    half = (0.5, 0.5, 0.5)
    seen = 0
    for split in ("train", "test"):
        reader = CacheReader(caches / split)
        assert reader.normalization.name == "half" and reader.pixel_dtype == "float16"
        indices = np.arange(len(reader))
        keys, captions, rows = reader.keys(indices), reader.captions(indices), reader.gather(indices)
        assert all(split_for_key(k, 0.8) == split for k in keys)
        for i, key in enumerate(keys):
            source = fetched_rows[key]
            assert captions[i] == source["caption"]
            ref = reference_pixels(source["jpeg"], 224, half, half)
            np.testing.assert_allclose(rows["pixels"][i].astype(np.float64), ref, rtol=0, atol=1e-3)
            ids = expected_ids(tokenizer, source["caption"], 36)
            assert rows["input_ids"][i].tolist() == ids
            assert rows["num_tokens"][i] == sum(t != 0 for t in ids)
        seen += len(keys)
    assert seen == len(fetched_rows) > 30  # every fetched row is in exactly one split


# ------------------------------------------------------------------------------------ memes


def test_memes_become_one_cache_per_split_with_labels(tmp_path: Path) -> None:
    memes = generate_memes(tmp_path / "memes", 40, seed=1)
    records = {
        s: [json.loads(line) for line in (memes / f"{s}.jsonl").open()] for s in ("train", "dev_seen", "test_seen")
    }
    tokenizer = train_wordpiece([r["text"] for r in records["train"]], vocab_size=120)
    report = preprocess(
        open_source([memes], "hateful-memes"),
        tmp_path / "out",
        tokenizer,
        PreprocessOptions(workers=2, pixel_dtype="uint8", normalize="imagenet"),
    )
    assert set(report.splits) == set(records) and report.skipped == {}
    for split, expected in records.items():
        reader = CacheReader(tmp_path / "out" / split)
        assert reader.has_labels and reader.pixel_dtype == "uint8" and reader.normalization.name == "imagenet"
        rows = reader.gather(np.arange(len(reader)))
        assert reader.keys(np.arange(len(reader))) == [str(r["id"]) for r in expected]
        assert rows["label"].tolist() == [r["label"] for r in expected]
        first = np.asarray(Image.open(memes / expected[0]["img"]).convert("RGB"))
        assert rows["pixels"].shape[1:] == (3, 224, 224) and first.shape[0] != 224  # resized, as fetch resizes
        assert verify_cache(tmp_path / "out" / split).ok


# ------------------------------------------------------------------------------ fetch output


def test_fetch_output_dirty_data_skipped_counted_and_recorded(tmp_path: Path, fetched: dict) -> None:
    report = preprocess(FetchSource([fetched["dir"]]), tmp_path / "out", fetched["tokenizer"], small())
    assert report.skipped == {"empty-caption": 2, "undecodable": 3}
    assert report.rows == 75 == sum(len(CacheReader(p.path)) for p in report.splits.values())
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["skipped"] == report.skipped and len(saved["examples"]["undecodable"]) == 3
    manifests = [CacheReader(tmp_path / "out" / s).manifest.extra["preprocess"] for s in ("train", "test")]
    assert sum(sum(m["skipped"].values()) for m in manifests) == 5
    reader = CacheReader(tmp_path / "out" / "train")
    rows = reader.gather(np.arange(len(reader)))
    by_key = {sample_key(i + 1, f"http://127.0.0.1/{i + 1}.jpg", c): (c, j) for i, (c, j) in enumerate(fetched["rows"])}
    for i, key in enumerate(reader.keys(np.arange(len(reader)))):
        caption, jpeg = by_key[key]
        ref = reference_pixels(jpeg, 32, (0.5,) * 3, (0.5,) * 3)
        np.testing.assert_allclose(rows["pixels"][i].astype(np.float64), ref, rtol=0, atol=1e-3)
        assert rows["input_ids"][i].tolist() == expected_ids(fetched["tokenizer"], caption, 8)


def test_same_inputs_give_byte_identical_shards_whatever_the_workers(tmp_path: Path, fetched: dict) -> None:
    runs = {}
    for name, options in {"w0": small(workers=0, chunk_size=7), "w2": small(workers=2, chunk_size=16)}.items():
        preprocess(
            FetchSource([fetched["dir"]]),
            tmp_path / name,
            fetched["tokenizer"],
            PreprocessOptions(**{**options.__dict__, "target_shard_bytes": 40_000}),
        )
        runs[name] = {s: shard_digests(tmp_path / name / s) for s in ("train", "test")}
    assert runs["w0"] == runs["w2"] and len(runs["w0"]["train"]) > 2


def test_shards_go_to_the_disk_straight_from_the_decode_slots_with_the_same_bytes(
    tmp_path: Path, fetched: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    from vilbert.cache import _shard_file

    opened: list[bool] = []
    real_open = os.open

    def spy(path, flags, *args):  # type: ignore[no-untyped-def]
        if os.path.basename(str(path)).startswith(".shard-"):
            opened.append(bool(_shard_file._O_DIRECT and flags & _shard_file._O_DIRECT))
        return real_open(path, flags, *args)

    monkeypatch.setattr(_shard_file.os, "open", spy)
    options = PreprocessOptions(**{**small(workers=2, chunk_size=16).__dict__, "target_shard_bytes": 40_000})
    digests = {}
    for name, direct_io in (("direct", "1"), ("page-cache", "0")):
        monkeypatch.setenv("VILBERT_DIRECT_IO", direct_io)
        opened.clear()
        with caplog.at_level(logging.INFO, logger=_shard_file.__name__):
            preprocess(FetchSource([fetched["dir"]]), tmp_path / name, fetched["tokenizer"], options)
        refused = "direct writes refused" in caplog.text  # this machine's file system may not take them
        if direct_io == "1":
            assert len(opened) > 4 and (all(opened) or refused)  # every shard, until a refusal
        else:
            assert len(opened) > 4 and not any(opened)
        digests[name] = {s: shard_digests(tmp_path / name / s) for s in ("train", "test")}
    assert digests["direct"] == digests["page-cache"]
    assert verify_cache(tmp_path / "direct" / "train").ok


def test_resume_after_a_crash_gives_the_same_shards(tmp_path: Path, fetched: dict) -> None:
    options = PreprocessOptions(**{**small(chunk_size=8).__dict__, "target_shard_bytes": 40_000})
    preprocess(FetchSource([fetched["dir"]]), tmp_path / "clean", fetched["tokenizer"], options)
    calls = []

    def crash(state: dict) -> None:
        calls.append(state)
        if len(calls) == 7:  # after 56 samples, past an undecodable image and a few shards
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(FetchSource([fetched["dir"]]), tmp_path / "crashed", fetched["tokenizer"], options, progress=crash)
    assert not (tmp_path / "crashed" / "train" / "_manifest.json").exists()
    assert list((tmp_path / "crashed" / "train").glob("shard-*.arrow"))  # completed shards survived
    resumed = PreprocessOptions(**{**options.__dict__, "mode": "resume"})
    report = preprocess(FetchSource([fetched["dir"]]), tmp_path / "crashed", fetched["tokenizer"], resumed)
    assert report.rows_resumed > 0 and report.rows == 75
    assert report.skipped == {"empty-caption": 2, "undecodable": 3}
    for split in ("train", "test"):
        assert shard_digests(tmp_path / "crashed" / split) == shard_digests(tmp_path / "clean" / split)
        assert verify_cache(tmp_path / "crashed" / split).ok
    other = PreprocessOptions(**{**resumed.__dict__, "max_len": 12})
    with pytest.raises(UsageError, match="other inputs or options"):
        preprocess(FetchSource([fetched["dir"]]), tmp_path / "crashed", fetched["tokenizer"], other)


def test_a_pool_short_of_slots_has_the_caches_copy_what_they_borrowed(
    tmp_path: Path, fetched: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each cache borrows its unwritten shard's rows from the decode slots; with more splits than
    the slots were planned for, the caches copy them instead of the run stalling."""
    options = PreprocessOptions(**{**small(chunk_size=4).__dict__, "target_shard_bytes": 400_000})  # 63 rows a shard
    preprocess(FetchSource([fetched["dir"]]), tmp_path / "planned", fetched["tokenizer"], options)
    monkeypatch.setattr(_RunState, "lent_slots", lambda self: 0)  # 8 slots for 15 chunks of train rows
    monkeypatch.setattr(DecodePool, "WAIT_S", 0.01)
    with caplog.at_level(logging.INFO, logger="vilbert.pipeline.preprocess"):
        preprocess(FetchSource([fetched["dir"]]), tmp_path / "short", fetched["tokenizer"], options)
    assert "borrowed rows: the decode slots ran short" in caplog.text
    for split in ("train", "test"):
        assert shard_digests(tmp_path / "short" / split) == shard_digests(tmp_path / "planned" / split)


@pytest.mark.timeout(60)
def test_a_failed_write_ends_the_run_while_every_slot_is_lent(
    tmp_path: Path, fetched: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_RunState, "lent_slots", lambda self: 0)
    monkeypatch.setattr(_RunState, "detach", lambda self: None)  # the slots stay lent
    monkeypatch.setattr(DecodePool, "WAIT_S", 0.01)
    calls = []
    write = CacheWriter.write

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the 8th chunk (failures cut some chunks in two): all 8 slots lent
            raise OSError(28, "No space left on device")
        write(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write", failing)
    options = PreprocessOptions(**{**small(chunk_size=4).__dict__, "target_shard_bytes": 400_000})
    with pytest.raises(OSError, match="No space left"):
        preprocess(FetchSource([fetched["dir"]]), tmp_path / "out", fetched["tokenizer"], options)
    assert not (tmp_path / "out" / "train" / "_manifest.json").exists()


def test_existing_output_needs_overwrite_or_resume(tmp_path: Path, fetched: dict) -> None:
    preprocess(FetchSource([fetched["dir"]]), tmp_path / "out", fetched["tokenizer"], small())
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        preprocess(FetchSource([fetched["dir"]]), tmp_path / "out", fetched["tokenizer"], small())
    stale = tmp_path / "out" / "dev_seen"
    shutil.copytree(tmp_path / "out" / "test", stale)  # as if an earlier run had made this split
    (tmp_path / "out" / "notes").mkdir()
    report = preprocess(FetchSource([fetched["dir"]]), tmp_path / "out", fetched["tokenizer"], small(mode="overwrite"))
    assert report.rows == 75 and not stale.exists() and (tmp_path / "out" / "notes").is_dir()


# ------------------------------------------------------------------------------------ folder


def test_folder_with_missing_and_broken_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "b.jpg").write_bytes(_jpeg(rng, 64))
    (tmp_path / "img" / "broken.jpg").write_bytes(b"GIF89a nope")
    listing = tmp_path / "list.tsv"
    listing.write_text(
        "img/a.png\ta wide png\t1\nimg/b.jpg\ta jpeg\t0\nimg/gone.jpg\tmissing\t1\n"
        "img/broken.jpg\tbroken\t0\nimg/b.jpg\t\t1\n",
        encoding="utf-8",
    )
    tokenizer = train_wordpiece(["a wide png", "a jpeg"] * 5, vocab_size=40, min_frequency=1)
    options = PreprocessOptions(
        image_size=16, resize_mode="pad", normalize="mean=0.4,0.5,0.6:std=0.2,0.25,0.3", train_ratio=0.5, workers=1
    )
    report = preprocess(FolderSource(tmp_path, listing), tmp_path / "out", tokenizer, options)
    assert report.skipped == {"empty-caption": 1, "missing-image": 1, "undecodable": 1}
    assert report.rows == 2
    for split in report.splits:
        reader = CacheReader(tmp_path / "out" / split)
        assert reader.has_labels and reader.normalization.mean == (0.4, 0.5, 0.6)


def test_no_usable_sample_is_a_data_error(tmp_path: Path) -> None:
    listing = tmp_path / "list.tsv"
    listing.write_text("gone.jpg\tmissing\n", encoding="utf-8")
    tokenizer = train_wordpiece(["missing"] * 5, vocab_size=30, min_frequency=1)
    with pytest.raises(DataError, match="no usable sample.*missing-image"):
        preprocess(FolderSource(tmp_path, listing), tmp_path / "out", tokenizer, PreprocessOptions(workers=0))


def test_normalization_and_option_errors() -> None:
    assert parse_normalization("half").mean == (0.5, 0.5, 0.5)
    assert parse_normalization("mean=0.5,0.5,0.5:std=0.5,0.5,0.5").name == "half"  # matches the preset
    assert parse_normalization("mean=0.1,0.2,0.3:std=1,1,1").name == "custom"
    with pytest.raises(UsageError, match="malformed"):
        parse_normalization("mean=0.1,0.2:std")
    with pytest.raises(UsageError, match="unknown normalization 'imagenette'"):
        parse_normalization("imagenette")
    with pytest.raises(UsageError, match="pixel_dtype='float32'"):
        PreprocessOptions(pixel_dtype="float32")
    with pytest.raises(UsageError, match="resize_mode='crop'"):
        PreprocessOptions(resize_mode="crop")


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _app(), ["preprocess", str(tmp_path), "--to-mmap", str(tmp_path / "o"), "--overwrite", "--resume"]
    )
    assert isinstance(result.exception, UsageError) and "exclude each other" in str(result.exception)
