"""A shard corrupted in place (same size): training stops with a `CacheError` naming the shard and
row before any step uses the bad row, and `--verify-cache` refuses the cache before the first step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vilbert.cache import CacheReader
from vilbert.config import tiny
from vilbert.errors import CacheError
from vilbert.overrides import apply_overrides
from vilbert.train.pretrain import PretrainOptions, pretrain

from ..cache.conftest import corrupt_in_place

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ["data.max_len=32", "pretrain.batch_size=8", "pretrain.epochs=1", "pretrain.log_every=1",
            "pretrain.checkpoint_every=0", "pretrain.eval_split=train", "pretrain.log_sample_indices=true"]  # fmt: skip


def logged_batches(run: Path) -> list[list[int]]:
    path = run / "samples" / "rank-0.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["indices"] for line in path.read_text().splitlines()]


def test_a_corrupted_row_stops_training_before_any_step_uses_it(cache_builder, tmp_path: Path) -> None:
    data = cache_builder(tmp_path / "data", 60, seed=5)
    config = apply_overrides(tiny(), SETTINGS)
    clean = pretrain(config, PretrainOptions(data=data, run_dir=tmp_path / "clean", device="cpu"))
    order = logged_batches(tmp_path / "clean")
    assert clean.stopped == "completed" and len(order) >= 4
    bad = order[2][3]  # a row of the third batch: two steps run before it
    reader = CacheReader(data / "train")
    assert reader.num_shards == 1
    key = reader.keys([bad])[0]
    corrupt_in_place(reader.shard_paths[0], "input_ids", bad, np.int32(2_000_000_000))

    with pytest.raises(CacheError, match=rf"shard-00000\.arrow row {bad} \(key '{key}'\): token id 2000000000"):
        # An embedding lookup of id 2e9 would raise IndexError on CPU (a device assert on CUDA).
        pretrain(config, PretrainOptions(data=data, run_dir=tmp_path / "corrupt", device="cpu"))
    used = logged_batches(tmp_path / "corrupt")
    assert used == order[:2], "the steps before the bad batch ran, the bad batch never reached one"


def test_verify_cache_refuses_a_corrupt_cache_before_the_first_step(cache_builder, tmp_path: Path, run_cli) -> None:
    data = cache_builder(tmp_path / "data", 60, seed=5)
    shutil.copytree(data, tmp_path / "intact")
    corrupt_in_place(data / "train" / "shard-00000.arrow", "pixels", 5, np.uint8(7))  # a value in range

    settings = [arg for setting in SETTINGS for arg in ("--set", setting)]
    done = run_cli("pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                   "--device", "cpu", "--max-steps", "1", "--verify-cache", *settings)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "is corrupt: shard-00000.arrow: checksum mismatch" in done.stderr.splitlines()[-1], done.stderr
    assert logged_batches(tmp_path / "run") == [], "no step ran"
    config = apply_overrides(tiny(), [*SETTINGS, "data.verify_cache=true"])  # what --verify-cache sets
    options = PretrainOptions(data=tmp_path / "intact", run_dir=tmp_path / "run-intact", device="cpu", max_steps=1)
    assert pretrain(config, options).step == 1  # the intact copy passes the same verification
