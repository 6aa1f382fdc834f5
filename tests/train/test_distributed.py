"""Real `torchrun --nproc-per-node 2` (gloo, CPU): ranks read disjoint samples, a pretraining run
resumes, and fine-tuning on two ranks matches one process with the same global batch."""

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


def _torchrun(args: list[str], env: dict[str, str], command: str = "pretrain") -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "vilbert",
        command,
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


FINETUNE = [
    "--init",
    "none",
    "--preset",
    "tiny",
    "--recipe",
    "cpu",  # no dropout: the two runs draw no random numbers after the initial weights
    "--device",
    "cpu",
    "--set",
    "finetune.epochs=2",
    "--set",
    "finetune.log_every=1",
]


@pytest.mark.slow
def test_finetune_on_two_ranks_matches_one_process_with_the_same_global_batch(tmp_path: Path, cli_env: dict) -> None:
    from vilbert.pipeline.synthetic.caches import scene_caches

    data = scene_caches(tmp_path / "data", {"train": 32, "dev_seen": 16, "test_seen": 8}, labelled=True)
    one, two = tmp_path / "one", tmp_path / "two"
    single = [sys.executable, "-m", "vilbert", "finetune", "--data", str(data), "--out", str(one), *FINETUNE]
    proc = subprocess.run([*single, "--set", "finetune.batch_size=16"], capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = ["--data", str(data), "--out", str(two), *FINETUNE, "--set", "finetune.batch_size=8"]
    proc = _torchrun(args, cli_env, command="finetune")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["step"] == b["step"] == 4 and b["world_size"] == 2 and len(b["rng"]) == 2
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    print(f"\nfinetune, 2 ranks x 8 vs 1 process x 16: max parameter difference {diff:.2e}")
    assert diff < 1e-4
    results = [json.loads((run / "results.json").read_text()) for run in (one, two)]
    for x, y in zip(results[0]["epochs"], results[1]["epochs"], strict=True):
        assert x["train"]["n"] == y["train"]["n"] == 32  # every rank's training predictions are counted
        assert abs(x["train"]["loss"] - y["train"]["loss"]) < 1e-4 and abs(x["dev"]["loss"] - y["dev"]["loss"]) < 1e-4
    losses = [[r["loss"] for r in read_metrics(run) if r["kind"] == "train"] for run in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 4 and max(abs(x - y) for x, y in zip(*losses, strict=True)) < 1e-4
