"""preprocess --format webdataset: img2dataset's tar shards, written by `webdataset.TarWriter`.

Every good sample must reach the cache with its caption byte-exact and its pixels equal to our own
decode of the same bytes; every trap (a corrupt JPEG, a sample without caption, one without image,
a truncated tar) must be a counted skip naming its shard and member, and the run must exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vilbert.cache import CacheReader, verify_cache
from vilbert.pipeline.images import decode_resize
from vilbert.pipeline.preprocess import REPORT_NAME, PreprocessOptions, preprocess
from vilbert.pipeline.sources import iter_captions, open_source
from vilbert.pipeline.text import train_wordpiece
from vilbert.pipeline.webdataset import WebDatasetSource, iter_tar

from .img2dataset_layout import Row, key_of, photo, write_webdataset_shard

pytest.importorskip("webdataset")

SIZE = 32
WORDS = "a small big red blue green circle square left right of above below the near photo".split()  # noqa: SIM905


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(2, 9)))


def truncate_inside_member(tar: Path, member_index: int) -> str:
    """Cut `tar` in the middle of the data of its `member_index`-th member; returns that member's name."""
    with tarfile.open(tar) as archive:
        member = archive.getmembers()[member_index]
    with open(tar, "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)
    return member.name


@pytest.fixture(scope="module")
def img2dataset_output(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three shards of img2dataset's webdataset output with one trap of each kind among 40 samples."""
    rng = np.random.default_rng(7)
    out = tmp_path_factory.mktemp("cc3m-wds")
    shards: list[list[Row]] = []
    for shard in range(3):
        rows = []
        for i in range(14):
            size = (int(rng.integers(36, 80)), int(rng.integers(36, 80)))
            image = photo(rng, *size, fmt="png" if i == 5 else "jpeg")
            rows.append(Row(key_of(shard, i), caption(rng), image))
        shards.append(rows)
    shards[0][3].image = b"\xff\xd8\xff\xe0 not really a jpeg"  # undecodable
    shards[0][6].caption = "a caf\u00e9 \u2014 na\u00efve \U0001f431  with  spaces "  # byte-exact, not normalized
    shards[0][9].status, shards[0][9].error = "failed_to_download", "HTTP 404"  # not in the tar at all
    shards[1][2].drop, shards[1][2].extra_json = ("txt",), {"caption": None}  # no caption anywhere
    shards[1][7].drop = ("jpg",)  # no image
    paths = [write_webdataset_shard(out, s, rows) for s, rows in enumerate(shards)]
    broken = truncate_inside_member(paths[2], 3 * 9 + 0)  # inside sample 9's first member
    good = [r for rows in shards[:2] for r in rows if r.status == "success" and not r.drop]
    good = [r for r in good if r.key != key_of(0, 3)] + shards[2][:9]
    return {"dir": out, "shards": shards, "good": good, "broken": broken, "paths": paths}


def test_img2dataset_webdataset_output_becomes_a_cache_with_every_trap_counted(tmp_path, img2dataset_output, run_cli):
    data = img2dataset_output
    tokenizer = tmp_path / "tokenizer.json"
    trained = run_cli("tokenizer", "train", str(data["dir"]), "--vocab-size", "60", "--out", str(tokenizer))
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "cache"
    result = run_cli(
        "preprocess", "--format", "webdataset", str(data["dir"] / "*.tar"), "--to-mmap", str(out),
        "--tokenizer", str(tokenizer), "--image-size", str(SIZE), "--pixel-dtype", "uint8", "--max-len", "12",
        "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["skipped"] == {"no-caption": 1, "no-image": 1, "truncated-shard": 1, "undecodable": 1}
    examples = report["examples"]
    shard0, shard1, shard2 = (str(p) for p in data["paths"])
    assert examples["undecodable"][0].startswith(f"{shard0}:{key_of(0, 3)}.jpg: ")
    assert examples["no-caption"][0].startswith(f"{shard1}:{key_of(1, 2)}.jpg: no txt or json.caption")
    assert examples["no-image"][0].startswith(f"{shard1}:{key_of(1, 7)}.json,{key_of(1, 7)}.txt: no jpg/")
    assert examples["truncated-shard"][0].startswith(f"{shard2}:{data['broken']}: the tar breaks while reading")
    rows = {}
    for split in report["splits"]:
        reader = CacheReader(out / split)
        assert verify_cache(out / split).ok
        pixels = reader.gather(np.arange(len(reader)))["pixels"]
        everything = range(len(reader))
        for key, text, image in zip(reader.keys(everything), reader.captions(everything), pixels, strict=True):
            rows[key] = (text, image)
    assert sorted(rows) == sorted(r.key for r in data["good"])
    for row in data["good"]:
        text, image = rows[row.key]
        assert text.encode() == row.caption.encode()
        np.testing.assert_array_equal(image, decode_resize(row.image, size=SIZE).transpose(2, 0, 1))
    per_shard = [(s, v) for split in report["splits"].values() for s, v in split["sources"].items()]
    assert sum(v.get("rows", 0) for _, v in per_shard) == len(data["good"]) == report["rows"]
    assert sum(v.get("truncated-shard", 0) for s, v in per_shard if s == shard2) == 1


def test_a_json_caption_and_label_and_a_member_cap(tmp_path):
    rng = np.random.default_rng(3)
    rows = [
        Row(key_of(0, i), caption(rng), photo(rng, 40, 40), extra_json={"label": i % 2}, drop=("txt",))
        for i in range(6)
    ]
    rows[4].extra_json = {"label": "yes"}
    rows[5].image = photo(rng, 400, 400)  # over the member cap below
    write_webdataset_shard(tmp_path / "wds", 0, rows)
    source = open_source([tmp_path / "wds"], "webdataset", columns={"caption": "json.caption", "label": "json.label"})
    assert isinstance(source, WebDatasetSource) and source.has_labels("train") and source.size_hint() == 6
    source.max_member_bytes = 10_000
    items = list(source)
    samples = [i for i in items if hasattr(i, "image")]
    assert [s.label for s in samples] == [0, 1, 0, 1]
    assert [s.caption for s in samples] == [r.caption for r in rows[:4]]
    skips = {i.reason: i for i in items if not hasattr(i, "image")}
    assert set(skips) == {"malformed-label", "too-large"}
    assert skips["too-large"].where.endswith(f"00000.tar:{key_of(0, 5)}.jpg")
    keyed = open_source([tmp_path / "wds"], "webdataset", columns={"caption": "json.caption", "key": "json.url"})
    assert [i.key for i in keyed][:2] == [f"http://127.0.0.1/{key_of(0, i)}.jpg" for i in range(2)]


def test_keys_must_be_unique_across_sources_or_prefixed(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("cc3m", "cc12m"):  # two img2dataset runs: both number their samples from 000000000
        write_webdataset_shard(
            tmp_path / name, 0, [Row(key_of(0, i), caption(rng), photo(rng, 40, 40)) for i in range(4)]
        )
    tokenizer = train_wordpiece([" ".join(WORDS)] * 4, vocab_size=40, min_frequency=1)
    options = PreprocessOptions(image_size=SIZE, max_len=8, workers=0, pixel_dtype="uint8")
    both = [tmp_path / "cc3m", tmp_path / "cc12m"]
    with pytest.raises(Exception, match=r"key '000000000' \(.*cc12m/00000.tar:000000000.jpg\) comes twice") as info:
        preprocess(open_source(both, "webdataset"), tmp_path / "refused", tokenizer, options)
    assert "--key-prefix source" in str(info.value)
    report = preprocess(open_source(both, "webdataset", key_prefix="source"), tmp_path / "out", tokenizer, options)
    keys = [
        k
        for split in report.splits
        for k in CacheReader(tmp_path / "out" / split).keys(range(report.splits[split].rows))
    ]
    assert sorted(keys) == sorted(f"{name}/00000/{key_of(0, i)}" for name in ("cc3m", "cc12m") for i in range(4))


def test_a_tar_that_is_not_a_tar_and_tokenizer_captions(tmp_path, img2dataset_output):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    items = list(iter_tar(tmp_path / "junk.tar", frozenset({"jpg"}), 1 << 20))
    assert [(i.reason, i.source) for i in items] == [("unreadable-shard", str(tmp_path / "junk.tar"))]
    expected = [r.caption for r in img2dataset_output["shards"][0] if r.status == "success"]
    assert list(iter_captions([img2dataset_output["paths"][0]])) == expected
    assert list(iter_captions([img2dataset_output["paths"][0]], "webdataset", "json.caption")) == expected


# ------------------------------------------------------------------------------------ kill -9


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vilbert.pipeline.preprocess import PreprocessOptions, preprocess
    from vilbert.pipeline.sources import open_source
    from vilbert.pipeline.text import load_tokenizer

    shards, out, tokenizer, mode, stop_after = sys.argv[1:6]
    out, stop_after = Path(out), int(stop_after)
    options = PreprocessOptions(image_size=32, max_len=8, workers=2, chunk_size=8, mode=mode,
                                target_shard_bytes=60_000)
    calls = []

    def progress(state):
        calls.append(state)
        if len(calls) == stop_after:  # mid-way: tell the parent, then wait to be killed
            (out / "KILL-ME").write_text(str(state["done"]))
            time.sleep(600)

    preprocess(open_source([shards], "webdataset"), out, load_tokenizer(tokenizer), options, progress=progress)
    """
)


def _child(tmp_path: Path, out: Path, mode: str, stop_after: int, shards: Path, tokenizer: Path) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    args = [sys.executable, str(script), str(shards), str(out), str(tokenizer), mode, str(stop_after)]
    return subprocess.Popen(args, start_new_session=True)


def test_kill_9_mid_way_then_resume_gives_the_same_cache(tmp_path):
    rng = np.random.default_rng(11)
    shards = tmp_path / "wds"
    for shard in range(4):
        rows = [Row(key_of(shard, i), caption(rng), photo(rng, 48, 40)) for i in range(40)]
        rows[7].image = b"\xff\xd8\xff broken"
        write_webdataset_shard(shards, shard, rows)
    tokenizer = tmp_path / "tokenizer.json"
    train_wordpiece(iter_captions([shards]), vocab_size=60).save(str(tokenizer))
    clean = _child(tmp_path, tmp_path / "clean", "create", 0, shards, tokenizer)
    assert clean.wait(timeout=300) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    child = _child(tmp_path, killed, "create", 12, shards, tokenizer)  # 12 chunks of 8: in the third tar
    deadline = time.monotonic() + 300
    while not (killed / "KILL-ME").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (killed / "KILL-ME").exists(), "the child never reached the middle of the run"
    os.killpg(child.pid, signal.SIGKILL)  # the child and its decode workers, at once
    child.wait()
    assert not (killed / "train" / "_manifest.json").exists()
    assert list((killed / "train").glob("shard-*.arrow")), "no shard was complete at the kill"
    (killed / "KILL-ME").unlink()
    resumed = _child(tmp_path, killed, "resume", 0, shards, tokenizer)
    assert resumed.wait(timeout=300) == 0
    for split in ("train", "test"):
        a, b = CacheReader(tmp_path / "clean" / split), CacheReader(killed / split)
        assert a.keys(range(len(a))) == b.keys(range(len(b)))
        got_a, got_b = a.gather(np.arange(len(a))), b.gather(np.arange(len(b)))
        for column in got_a:
            assert got_a[column].tobytes() == got_b[column].tobytes()
        shards_a = sorted(p.name for p in (tmp_path / "clean" / split).glob("shard-*.arrow"))
        for name in shards_a:
            assert (tmp_path / "clean" / split / name).read_bytes() == (killed / split / name).read_bytes()
        assert verify_cache(killed / split).ok
    report = json.loads((killed / REPORT_NAME).read_text())
    assert report["rows_resumed"] > 0 and report["skipped"] == {"undecodable": 4}
