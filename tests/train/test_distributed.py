"""Real `torchrun --nproc-per-node 2` (gloo, CPU): ranks read disjoint samples, and the run resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vilbert.train.checkpoint import load_checkpoint
from vilbert.train.metrics import read_metrics

SETTINGS = [
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--set",
    "data.max_len=32",
    "--set",
    "pretrain.batch_size=8",
    "--set",
    "pretrain.log_every=1",
    "--set",
    "pretrain.log_sample_indices=true",
    "--set",
    "pretrain.eval_max_batches=1",
]


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "vilbert",
        "pretrain",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _samples(run: Path, rank: int) -> list[dict]:
    path = run / "samples" / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_disjoint_samples_and_resume(small_cache: Path, tmp_path: Path, cli_env: dict) -> None:
    run = tmp_path / "run"
    first = _torchrun([str(run), "--data", str(small_cache), *SETTINGS, "--max-steps", "3"], cli_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = load_checkpoint(run)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch_equal_rng(state["rng"][0], state["rng"][1]), "ranks must draw different masks"

    second = _torchrun(["--resume", str(run), "--max-steps", "5"], cli_env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 5

    per_rank = [_samples(run, rank) for rank in (0, 1)]
    for records in per_rank:
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4], "one batch per step, none repeated on resume"
        assert all(r["epoch"] == 0 and len(r["indices"]) == 8 for r in records)
    seen = [[i for r in records for i in r["indices"]] for records in per_rank]
    assert not set(seen[0]) & set(seen[1]), "the ranks saw a common sample"
    assert len(set(seen[0])) == len(seen[0]) == 40, "a rank saw a sample twice in one epoch"
    # Only rank 0 writes the run's files: one record per step, one checkpoint file per save.
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    assert not (run / "checkpoints" / "rank-1").exists()


def torch_equal_rng(a: dict, b: dict) -> bool:
    return bool((a["generators"]["masking"] == b["generators"]["masking"]).all())
