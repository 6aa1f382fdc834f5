"""Range checks of cache rows (`first_bad_row`), the reader refusing a corrupted shard in place, and
`verify_cache` reporting the same values."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vilbert.cache import CacheReader, verify_cache
from vilbert.cache.checks import first_bad_row
from vilbert.errors import CacheError

from .conftest import MAX_LEN, WORDS, build_cache, corrupt_in_place, make_rows


def columns(n: int = 6, dtype: str = "float16") -> dict[str, np.ndarray]:
    rows = make_rows(n, dtype)
    return {"input_ids": rows["input_ids"], "num_tokens": rows["num_tokens"], "label": rows["labels"],
            "pixels": rows["pixels"]}  # fmt: skip


def test_valid_rows_pass() -> None:
    assert first_bad_row(columns(), len(WORDS), MAX_LEN, num_labels=2) is None
    assert first_bad_row(columns(dtype="uint8"), len(WORDS), MAX_LEN, num_labels=2) is None


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("input_ids", 2_000_000_000, "token id 2000000000 outside [0, vocab_size=12)"),
        ("input_ids", -1, "token id -1 outside"),
        ("input_ids", len(WORDS), "token id 12 outside"),
        ("num_tokens", 1, "num_tokens 1 outside [2, max_len=8]"),
        ("num_tokens", MAX_LEN + 1, "num_tokens 9 outside"),
        ("label", 2, "label 2 outside [0, num_labels=2)"),
        ("label", -3, "label -3 outside"),
        ("pixels", np.inf, "float16 pixel inf (not finite)"),
        ("pixels", -np.inf, "float16 pixel -inf (not finite)"),
        ("pixels", np.nan, "float16 pixel nan (not finite)"),
    ],
)
def test_each_out_of_range_value_names_its_row(column: str, value: float, message: str) -> None:
    batch = columns()
    flat = batch[column].reshape(len(batch[column]), -1)
    flat[4, -1] = value
    flat[5, 0] = value
    row, what = first_bad_row(batch, len(WORDS), MAX_LEN, num_labels=2)
    assert row == 4 and message in what


def test_the_float16_check_agrees_with_isfinite_on_every_bit_pattern() -> None:
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(-1, 1)
    base = {"pixels": np.zeros((1, 1), np.float16)}
    flagged = np.array([first_bad_row({"pixels": p[None]}, 10, 8) is not None for p in patterns])
    assert first_bad_row(base, 10, 8) is None
    assert np.array_equal(flagged, ~np.isfinite(patterns[:, 0]))
    assert flagged.sum() == 2 * 1024  # +-inf and the NaNs: 2 * 2^10 patterns with all exponent bits set


def test_without_num_labels_only_negative_labels_are_refused() -> None:
    batch = columns()
    batch["label"][2] = 7
    assert first_bad_row(batch, len(WORDS), MAX_LEN) is None
    batch["label"][3] = -1
    assert first_bad_row(batch, len(WORDS), MAX_LEN)[0] == 3


@pytest.mark.parametrize(
    ("column", "value", "fragment"),
    [
        ("input_ids", np.int32(2_000_000_000), "token id 2000000000 outside"),
        ("num_tokens", np.int32(0), "num_tokens 0 outside"),
        ("pixels", np.float16(np.nan), "not finite"),
        ("label", np.int64(5), "label 5 outside [0, num_labels=2)"),
    ],
)
def test_a_shard_corrupted_in_place_is_refused_by_gather_naming_shard_and_row(tmp_path, column, value, fragment):
    path = tmp_path / "cache"
    build_cache(path, n=20, dtype="float16")  # 7 rows per shard: row 9 is shard 1's row 2
    corrupt_in_place(path / "shard-00001.arrow", column, 2, value)
    reader = CacheReader(path, num_labels=2)  # opens: same sizes, same schema
    assert reader.gather([0, 1, 15])["input_ids"].shape == (3, MAX_LEN)  # other rows still served
    named = rf"shard .*shard-00001\.arrow row 2 \(key 'img00009'\): .*{re.escape(fragment)}"
    for indices in ([9], [3, 9, 17], list(range(20))):  # one shard, several, a global order
        with pytest.raises(CacheError, match=named):
            reader.gather(indices)
    report = verify_cache(path)
    assert not report.ok and report.problems[0].startswith("shard-00001.arrow: checksum mismatch")
