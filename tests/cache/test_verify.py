"""verify_cache and `vilbert cache verify|inspect`: every byte checked, the bad shard named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vilbert.cache import CacheReader, verify_cache
from vilbert.errors import CacheError


def flip_byte(file: Path, offset: int) -> None:
    with open(file, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x01]))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_sound_cache_verifies(cache_f16):
    report = verify_cache(cache_f16[0])
    assert report.ok and report.shards_checked == 3 and report.rows == 20
    report.raise_if_bad()


def test_one_flipped_pixel_byte_is_caught_by_the_checksum(cache_f16):
    path, _ = cache_f16
    flip_byte(path / "shard-00001.arrow", 2000)  # inside the pixel data: the file still parses
    report = verify_cache(path)
    assert not report.ok
    assert report.problems[0].startswith("shard-00001.arrow: checksum mismatch")
    with pytest.raises(CacheError, match="is corrupt: shard-00001.arrow: checksum mismatch"):
        report.raise_if_bad()


def test_truncated_and_missing_shards_are_named(cache_f16):
    path, _ = cache_f16
    with open(path / "shard-00000.arrow", "r+b") as handle:
        handle.truncate(1000)
    (path / "shard-00002.arrow").unlink()
    report = verify_cache(path)
    assert report.problems[0].startswith("shard-00000.arrow: truncated: 1000 bytes")
    assert report.problems[1] == "shard-00002.arrow: missing"


def test_duplicate_keys_are_reported(tmp_path):

    from .conftest import make_rows, new_writer

    rows = make_rows(10, "uint8")
    rows["keys"][9] = rows["keys"][2]  # shard 1 repeats a key of shard 0
    with new_writer(tmp_path / "c", "uint8") as writer:
        writer.write(
            rows["keys"], rows["pixels"], rows["input_ids"], rows["num_tokens"], rows["labels"], rows["captions"]
        )
    report = verify_cache(tmp_path / "c")
    assert report.problems == ("shard-00001.arrow: duplicate key 'img00002'",)


def test_cli_verify_exits_0_with_a_summary(cache_u8, run_cli):
    result = run_cli("cache", "verify", str(cache_u8[0]))
    assert result.returncode == 0, result.stderr
    assert f"OK {cache_u8[0]}: 3 shards, 20 rows" in " ".join(result.stdout.split())
    algorithm = CacheReader(cache_u8[0]).manifest.shards[0].checksum.split(":")[0]  # xxh3_128 where installed
    assert f"verified ({algorithm}, schema, contents)" in " ".join(result.stdout.split())


def test_cli_verify_exits_1_naming_the_bad_shard(cache_u8):
    path, _ = cache_u8
    flip_byte(path / "shard-00002.arrow", 1500)
    # A real process: the console script's exit code and stderr as a user sees them.
    command = [sys.executable, "-m", "vilbert", "cache", "verify", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "shard-00002.arrow: checksum mismatch" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_verify_refuses_an_unknown_version(cache_u8, run_cli):
    path, _ = cache_u8
    manifest = json.loads((path / "_manifest.json").read_text())
    manifest["format_version"] = 3
    (path / "_manifest.json").write_text(json.dumps(manifest))
    result = run_cli("cache", "verify", str(path))
    assert result.returncode == 1
    assert "unknown format 'vilbert-cache' version 3" in error_lines(result)[0]


def test_cli_inspect_shows_the_cache(cache_f16, run_cli):
    result = run_cli("cache", "inspect", str(cache_f16[0]))
    assert result.returncode == 0, result.stderr
    for fragment in ("float16 CHW 3x16x16", "'half'", "caption 0 a red circle", "img00002", "max_len"):
        assert fragment in result.stdout
    as_json = run_cli("cache", "inspect", "--json", str(cache_f16[0]))
    assert json.loads(as_json.stdout)["num_rows"] == 20


def test_cli_inspect_of_a_non_cache_is_one_line(tmp_path, run_cli):
    result = run_cli("cache", "inspect", str(tmp_path))
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and "not a cache (no _manifest.json)" in lines[0]


def test_shards_carry_xxh3_checksums_that_verify_recomputes(cache_f16):
    pytest.importorskip("xxhash")  # a dev install has it (through datasets)
    import xxhash

    path, _ = cache_f16
    manifest = json.loads((path / "_manifest.json").read_text())
    shard = manifest["shards"][1]
    assert shard["checksum"] == "xxh3_128:" + xxhash.xxh3_128((path / shard["name"]).read_bytes()).hexdigest()
    flip_byte(path / "shard-00001.arrow", 2000)
    assert verify_cache(path).problems[0].startswith("shard-00001.arrow: checksum mismatch (xxh3_128 ")


def test_without_xxhash_the_writer_falls_back_to_sha256_and_both_verify(tmp_path, monkeypatch):
    import hashlib

    from vilbert.cache import writer as writer_module

    from .conftest import build_cache

    monkeypatch.setattr(writer_module, "default_checksum_algorithm", lambda: "sha256")
    path = tmp_path / "sha"
    build_cache(path, dtype="uint8")
    shards = json.loads((path / "_manifest.json").read_text())["shards"]
    first = shards[0]
    assert first["checksum"] == "sha256:" + hashlib.sha256((path / first["name"]).read_bytes()).hexdigest()
    assert verify_cache(path).ok
    flip_byte(path / shards[2]["name"], 2000)
    assert verify_cache(path).problems[0].startswith("shard-00002.arrow: checksum mismatch (sha256 ")


def test_an_unknown_checksum_algorithm_is_a_named_problem(cache_u8):
    path, _ = cache_u8
    manifest_path = path / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["checksum"] = "md5:" + "0" * 32
    manifest_path.write_text(json.dumps(manifest))
    problem = verify_cache(path).problems[0]
    assert problem.startswith("shard-00000.arrow: unknown checksum 'md5:") and "xxh3_128, sha256" in problem
