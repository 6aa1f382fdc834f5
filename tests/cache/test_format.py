"""Format pieces: normalization presets and parsing, the manifest round trip, malformed manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vilbert.cache import NORMALIZATIONS, Manifest, Normalization, normalization, read_manifest
from vilbert.cache.format import arrow_array, arrow_strings, numpy_column
from vilbert.errors import CacheError, UsageError


def test_normalization_presets_and_parsing():
    assert set(NORMALIZATIONS) == {"imagenet", "half", "clip"}
    assert normalization("imagenet").mean == (0.485, 0.456, 0.406)
    assert normalization(((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))).name == "half"  # recognised by value
    custom = normalization({"name": "mine", "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})
    assert custom == Normalization("mine", (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert custom.matches(Normalization("other", [0.1, 0.2, 0.3], [1, 1, 1]))
    with pytest.raises(UsageError, match="unknown normalization 'vit'; valid: imagenet, half, clip"):
        normalization("vit")
    with pytest.raises(UsageError, match="std must be > 0"):
        Normalization("bad", (0, 0, 0), (1, 0, 1))
    with pytest.raises(UsageError, match="mean and std need 3 values"):
        Normalization("bad", (0, 0), (1, 1))


def test_normalization_lut_is_exact():
    norm = normalization("clip")
    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3).transpose(2, 0, 1)[None]  # [1,3,1,256]
    got = norm.apply(np.ascontiguousarray(pixels))
    for c in range(3):
        expected = ((np.arange(256) / 255.0 - norm.mean[c]) / norm.std[c]).astype(np.float16)
        assert got[0, c, 0].tobytes() == expected.tobytes()


def test_manifest_round_trip_and_malformed_manifests(cache_f16):
    path, _ = cache_f16
    manifest = read_manifest(path)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    data = manifest.to_dict()
    del data["shards"][0]["checksum"]
    (path / "_manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"_manifest.json: malformed manifest \(TypeError"):
        read_manifest(path)
    (path / "_manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="unreadable manifest"):
        read_manifest(path)


# ---------------------------------------------- Arrow <-> numpy without pa.array / to_numpy (no pandas)


def test_numpy_column_reads_slices_bools_lists_and_chunks_as_to_numpy_does():
    ints = pa.array(list(range(10)), pa.int64())
    bools = pa.array([True, False, True, True, False, False, True, False, True, True])
    lists = pa.FixedSizeListArray.from_arrays(pa.array([float(i) for i in range(12)], pa.float16()), 3)
    for column in (ints.slice(3, 4), bools.slice(3, 6), pa.chunked_array([ints, ints.slice(2, 3)]), ints.slice(10)):
        np.testing.assert_array_equal(numpy_column(column), column.to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(numpy_column(lists.slice(1, 2)), np.arange(3, 9, dtype=np.float16).reshape(2, 3))
    assert numpy_column(pa.chunked_array([], pa.int32())).dtype == np.int32
    with pytest.raises(ValueError, match="1 nulls"):
        numpy_column(pa.array([1, None]))
    with pytest.raises(TypeError, match="not a numeric column"):
        numpy_column(pa.array(["a"]))


def test_arrow_array_and_strings_round_trip():
    values = np.arange(20, dtype=np.int32)[::3]  # not contiguous
    assert arrow_array(values).to_pylist() == values.tolist()
    assert arrow_array(np.zeros(0, np.float16)).type == pa.float16()
    strings = ["", "a cat", "ünïcödé 猫", "x" * 1000]
    built = arrow_strings(strings)
    built.validate(full=True)
    assert built.type == pa.string() and built.to_pylist() == strings
    with pytest.raises(UnicodeEncodeError):
        arrow_strings(["\ud800"])
    with pytest.raises(TypeError):
        arrow_array(np.zeros((2, 2)))


def test_preprocess_and_training_reads_do_not_import_pandas(tmp_path):
    # pyarrow imports pandas (when installed) on the first `pa.array(...)` or `.to_numpy()`: 0.3-0.45 s
    # of CPU at a command's start, for nothing; the cache and pipeline build and read arrays from buffers.
    from tests.pipeline.test_preprocess import _jpeg, write_fetch_output
    from vilbert.pipeline.text import train_wordpiece

    rng = np.random.default_rng(0)
    rows = [(f"a red circle {i}", _jpeg(rng)) for i in range(40)]
    write_fetch_output(tmp_path / "f", rows)
    train_wordpiece([c for c, _ in rows], vocab_size=60).save(str(tmp_path / "tokenizer.json"))
    script = f"""
import sys
import numpy as np
from pathlib import Path
from vilbert.cache import CacheReader
from vilbert.pipeline.preprocess import PreprocessOptions, preprocess
from vilbert.pipeline.sources import open_source
from vilbert.pipeline.text import load_tokenizer
root = Path({str(tmp_path)!r})
options = PreprocessOptions(image_size=32, max_len=8, workers=2, mode="overwrite")
preprocess(open_source([root / "f"], "fetch"), root / "c", load_tokenizer(root / "tokenizer.json"), options)
reader = CacheReader(root / "c" / "train")
reader.gather(np.arange(len(reader)))
print("pandas" in sys.modules)
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
