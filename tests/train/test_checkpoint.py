"""Atomic checkpoints, keep-last-K, weights_only loading, RNG capture and restore."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vilbert.errors import CheckpointError
from vilbert.train.checkpoint import CheckpointManager, capture_rng, find_checkpoint, load_checkpoint, restore_rng


def test_save_keep_last_and_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (5, 10, 15):
        manager.save({"step": step, "weights": torch.full((3,), float(step)), "config": {"a": [1, 2]}}, step)
    names = [p.name for p in manager.paths()]
    assert names == ["step-00000010.pt", "step-00000015.pt"]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 15 and torch.equal(state["weights"], torch.full((3,), 15.0))
    assert state["config"] == {"a": [1, 2]}
    assert find_checkpoint(tmp_path / "checkpoints" / "step-00000010.pt").name == "step-00000010.pt"


def test_stale_temp_file_is_ignored_and_removed(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=0)
    manager.directory.mkdir(parents=True)
    (manager.directory / "step-00000099.pt.tmp").write_bytes(b"half a checkpoint")
    assert manager.latest() is None
    manager.save({"step": 1}, 1)
    assert [p.name for p in manager.directory.iterdir()] == ["step-00000001.pt"]


def test_disabled_manager_writes_nothing(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path, enabled=False).save({"step": 1}, 1) is None
    assert not (tmp_path / "checkpoints").exists()


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no run directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "checkpoints" / "step-00000001.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="step-00000001.pt"):
        load_checkpoint(tmp_path)


def test_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"payload": Path("/etc")}, path)  # an arbitrary class: weights_only must refuse it
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_rng_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(4)
    CheckpointManager(tmp_path).save({"rng": capture_rng({"masking": gen})}, 1)
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    gen.manual_seed(99)
    restore_rng(load_checkpoint(tmp_path)["rng"], {"masking": gen})
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
    with pytest.raises(CheckpointError, match="generator 'other'"):
        restore_rng(load_checkpoint(tmp_path)["rng"], {"other": gen})
