"""Sources: Hateful Memes and folder listings (splits, labels, malformed lines), key-hash splits."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from vilbert.errors import UsageError
from vilbert.pipeline._fetched_rows import iter_fetched_rows
from vilbert.pipeline.fetch import IMAGE_SCHEMA, iter_fetched
from vilbert.pipeline.sources import (
    FetchSource,
    FolderSource,
    HatefulMemesSource,
    Sample,
    Skip,
    assign_splits,
    iter_captions,
    open_source,
    split_for_key,
)


def _write_jsonl(path: Path, records: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")


@pytest.fixture()
def memes(tmp_path: Path) -> Path:
    root = tmp_path / "memes"
    (root / "img").mkdir(parents=True)
    _write_jsonl(
        root / "train.jsonl",
        [
            {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color"},
            "{not json",
            {"id": 23058, "img": "img/23058.png", "label": 1, "text": "don't be afraid"},
            {"id": 13894, "img": "img/13894.png", "text": "no label on this one"},
            "",
            [1, 2],
        ],
    )
    _write_jsonl(root / "dev_seen.jsonl", [{"id": 8291, "img": "img/08291.png", "label": 1, "text": "white people"}])
    _write_jsonl(root / "test_unseen.jsonl", [{"id": 1, "img": "img/00001.png", "text": "no labels here"}])
    return root


def test_hateful_memes_keeps_splits_labels_and_reports_bad_lines(memes: Path) -> None:
    source = open_source([memes], "hateful-memes")
    assert isinstance(source, HatefulMemesSource)
    assert source.split_names() == ("train", "dev_seen", "test_unseen")
    assert [source.has_labels(s) for s in source.split_names()] == [True, True, False]
    assert source.size_hint() == 7  # non-blank lines
    items = list(source)
    samples = [i for i in items if isinstance(i, Sample)]
    assert [(s.key, s.label, s.split) for s in samples] == [
        ("42953", 0, "train"),
        ("23058", 1, "train"),
        ("8291", 1, "dev_seen"),
        ("1", None, "test_unseen"),
    ]
    image = samples[0].image
    assert (image.root, image.name, image.where) == (memes.resolve(), "img/42953.png", f"{memes / 'train.jsonl'}:1")
    assert samples[0].caption == "its their character not their color"
    skips = [i for i in items if isinstance(i, Skip)]
    train = memes / "train.jsonl"
    assert [(s.key, s.reason, s.split) for s in skips] == [
        (f"{train}:2", "malformed-line", "train"),
        (f"{train}:4", "malformed-line", "train"),
        (f"{train}:6", "malformed-line", "train"),
    ]
    assert "invalid JSON" in skips[0].detail and "no label" in skips[1].detail and "JSON object" in skips[2].detail


def test_folder_tsv_with_header_and_labels(tmp_path: Path) -> None:
    listing = tmp_path / "list.tsv"
    listing.write_text(
        "image\tcaption\tlabel\na.jpg\ta cat\t1\nsub/b.png\ta dog\t0\nc.jpg\tonly two\nbad line\n"
        "d.jpg\tnot a number\tx\n",
        encoding="utf-8",
    )
    source = FolderSource(tmp_path, listing)
    assert source.split_names() is None and source.has_labels("train")
    items = list(source)
    samples = [i for i in items if isinstance(i, Sample)]
    assert [(s.key, s.image.root / s.image.name, s.caption, s.label) for s in samples] == [
        ("a.jpg", tmp_path.resolve() / "a.jpg", "a cat", 1),
        ("sub/b.png", tmp_path.resolve() / "sub/b.png", "a dog", 0),
    ]
    reasons = [(i.key.rsplit(":", 1)[1], i.detail) for i in items if isinstance(i, Skip)]
    assert [r[0] for r in reasons] == ["4", "5", "6"]
    assert "no label" in reasons[0][1] and "fields" in reasons[1][1] and "not an integer" in reasons[2][1]


def test_folder_tsv_without_labels(tmp_path: Path) -> None:
    listing = tmp_path / "captions.txt"
    listing.write_text("a.jpg\ta cat\nb.jpg\t\n", encoding="utf-8")
    source = open_source([tmp_path], "folder", str(listing))
    assert not source.has_labels("train")
    assert [(s.key, s.caption, s.label) for s in source] == [("a.jpg", "a cat", None), ("b.jpg", "", None)]


def test_folder_jsonl_with_keys_and_own_splits(tmp_path: Path) -> None:
    listing = tmp_path / "list.jsonl"
    _write_jsonl(
        listing,
        [
            {"key": "k1", "image": "1.jpg", "caption": "one", "split": "val"},
            {"id": 2, "path": "2.jpg", "text": "two", "split": "train"},
            {"image": "3.jpg", "caption": "three"},
            {"caption": "no image", "split": "train"},
        ],
    )
    source = FolderSource(tmp_path, listing)
    assert source.split_names() == ("train", "val") and not source.has_labels("val")
    items = list(source)
    assert [(i.key, i.split) for i in items if isinstance(i, Sample)] == [("k1", "val"), ("2", "train")]
    assert [i.detail for i in items if isinstance(i, Skip)] == [
        "split None is not a name",
        "no image path (field image or img or path or file)",
    ]


def test_split_for_key_is_stable_and_close_to_the_ratio() -> None:
    keys = [f"{i:08d}" for i in range(20000)]
    splits = [split_for_key(k, 0.8) for k in keys]
    assert 0.78 < splits.count("train") / len(keys) < 0.82
    assert splits == [split_for_key(k, 0.8) for k in keys]
    # Pinned values: the split of a key must never change between versions (caches would mix).
    assert [split_for_key(k, 0.8) for k in ("0", "1", "2", "3", "4", "5", "6", "7")] == PINNED
    # A larger ratio only moves keys from test to train.
    assert all(split_for_key(k, 0.9) == "train" for k, s in zip(keys, splits, strict=True) if s == "train")


PINNED = ["train", "test", "train", "train", "train", "train", "train", "test"]


def test_assign_splits_keeps_own_splits_and_malformed_lines() -> None:
    items = [
        Sample(key="a", image=b"", caption="x"),
        Sample(key="b", image=b"", caption="y", split="dev"),
        Skip("f.tsv:3", "malformed-line"),
        Skip("c", "empty-caption"),
    ]
    out = list(assign_splits(items, 0.5))
    assert out[0].split in ("train", "test") and out[1].split == "dev"
    assert out[2].split is None and out[3].split == split_for_key("c", 0.5)
    with pytest.raises(UsageError, match="train_ratio=1.0"):
        list(assign_splits(items, 1.0))


def test_open_source_usage_errors(tmp_path: Path, memes: Path) -> None:
    with pytest.raises(UsageError, match="unknown source format 'csv'"):
        open_source([tmp_path], "csv")
    with pytest.raises(UsageError, match="needs --listing"):
        open_source([tmp_path], "folder")
    with pytest.raises(UsageError, match="only applies to --format folder"):
        open_source([tmp_path], "fetch", listing="x.tsv")
    with pytest.raises(UsageError, match="exactly one directory"):
        open_source([memes, tmp_path], "hateful-memes")
    with pytest.raises(UsageError, match="does not exist"):
        open_source([tmp_path / "nope"], "fetch")
    with pytest.raises(UsageError, match="given twice"):
        open_source([tmp_path, tmp_path / "."], "fetch")
    with pytest.raises(UsageError, match="looks like Hateful Memes"):
        open_source([memes], "fetch")
    with pytest.raises(UsageError, match="none of train.jsonl"):
        open_source([tmp_path], "hateful-memes")


def _fetch_part(path: Path, lines: list[int], tag: str) -> None:
    n = len(lines)
    ints = pa.array([224] * n, pa.int32())
    table = pa.table([pa.array([f"{line:09d}-{tag}" for line in lines]), pa.array(lines, pa.int64()),
                      pa.array([f"http://x/{line}" for line in lines]), pa.array([f"caption {line}" for line in lines]),
                      pa.array([f"jpeg {tag} {line}".encode() for line in lines], pa.binary()), ints, ints, ints, ints],
                     schema=IMAGE_SCHEMA)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, IMAGE_SCHEMA) as writer:
        writer.write_table(table)


def test_fetch_rows_match_iter_fetched_order_across_outputs_and_parts(tmp_path: Path) -> None:
    # Parts hold lines out of order (downloads finish out of order, resumes add parts); the same line
    # in two outputs is ordered by the order the outputs are given in.
    _fetch_part(tmp_path / "a" / "images" / "part-000000.arrow", [9, 1, 5], "a")
    _fetch_part(tmp_path / "a" / "images" / "part-000001.arrow", [3, 7, 11, 13], "a")
    _fetch_part(tmp_path / "b" / "images" / "part-000000.arrow", [2, 8, 4, 5], "b")
    dirs = [tmp_path / "a", tmp_path / "b"]
    ours = [r for b in iter_fetched_rows(dirs, batch_size=3) for r in b.to_pylist()]
    reference = [r for b in iter_fetched(dirs) for r in b.to_pylist()]
    assert ours == reference
    assert [r["line"] for r in ours] == [1, 2, 3, 4, 5, 5, 7, 8, 9, 11, 13]
    samples = list(FetchSource(dirs))
    assert [s.key for s in samples] == [r["key"] for r in reference] and samples[0].image == b"jpeg a 1"
    assert FetchSource(dirs).size_hint() == 11


def test_iter_captions_from_every_kind_of_source(tmp_path: Path, memes: Path) -> None:
    cc = tmp_path / "cc.tsv"
    cc.write_text("a red circle\thttp://x/1.jpg\nthe blue square\thttp://x/2.jpg\n", encoding="utf-8")
    listing = tmp_path / "listing.tsv"
    listing.write_text("img/1.jpg\ta green star\t1\n", encoding="utf-8")
    plain = tmp_path / "captions.txt"
    plain.write_text("just a caption\n", encoding="utf-8")
    jsonl = tmp_path / "captions.jsonl"
    _write_jsonl(jsonl, [{"caption": "from jsonl"}, {"text": "text field"}, "{broken"])
    _fetch_part(tmp_path / "fetched" / "images" / "part-000000.arrow", [2, 1], "f")
    captions = list(iter_captions([cc, listing, plain, jsonl, memes, tmp_path / "fetched"]))
    assert captions == ["a red circle", "the blue square", "a green star", "just a caption", "from jsonl",
                        "text field", "its their character not their color", "don't be afraid",
                        "no label on this one", "caption 1", "caption 2"]  # fmt: skip
    with pytest.raises(UsageError, match="does not exist"):
        list(iter_captions([tmp_path / "nope.txt"]))
