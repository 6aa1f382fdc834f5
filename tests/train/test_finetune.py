"""`vilbert finetune`: results and metrics files, exact resume, initialization from a pretraining run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vilbert.config import tiny
from vilbert.errors import CacheError, CheckpointError
from vilbert.overrides import apply_overrides
from vilbert.pipeline.synthetic.caches import scene_caches
from vilbert.recipes import cpu
from vilbert.train.checkpoint import load_checkpoint
from vilbert.train.finetune import FinetuneOptions, finetune
from vilbert.train.loading import load_model
from vilbert.train.metrics import read_metrics
from vilbert.train.pretrain import PretrainOptions, pretrain

CONFIG = apply_overrides(
    tiny(),
    [
        "data.max_len=32",
        "finetune.epochs=2",
        "finetune.batch_size=16",
        "finetune.log_every=1",
        "pretrain.batch_size=16",
        "pretrain.checkpoint_every=0",
    ],
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train rows: 3 steps per epoch of 16, the last one partial."""
    return scene_caches(
        tmp_path_factory.mktemp("labelled"), {"train": 40, "dev_seen": 24, "test_seen": 16}, labelled=True
    )


def test_writes_results_metrics_and_plots(labelled: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = finetune(CONFIG, FinetuneOptions(data=labelled, run_dir=run, device="cpu"))
    assert result.stopped == "completed" and result.step == 6 and result.epoch == 2
    results = json.loads((run / "results.json").read_text())
    assert results == json.loads(json.dumps(result.results))
    assert results["init_kind"] == "scratch" and results["steps"] == 6
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
    for entry in results["epochs"]:
        assert entry["train"]["n"] == 40 and entry["dev"]["n"] == 24
        assert 0.0 <= entry["dev"]["auroc"] <= 1.0 and 0.0 <= entry["train"]["accuracy"] <= 1.0
    assert results["final"]["test"]["n"] == 16
    assert results["final"]["dev"] == results["epochs"][-1]["dev"]
    records = read_metrics(run)
    evals = [r for r in records if r["kind"] == "eval"]
    assert {"train_acc", "train_auroc", "dev_acc", "dev_auroc", "dev_loss"} <= set(evals[0])
    assert "test_auroc" in evals[-1] and evals[-1]["test_auroc"] == results["final"]["test"]["auroc"]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (run / "plots" / "accuracy.png").is_file() and (run / "config.json").is_file()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        finetune(CONFIG, FinetuneOptions(data=labelled, run_dir=run, device="cpu"))


def test_resume_continues_exactly(labelled: Path, tmp_path: Path) -> None:
    straight = finetune(CONFIG, FinetuneOptions(data=labelled, run_dir=tmp_path / "a", device="cpu", plots=False))
    stopped = finetune(
        CONFIG, FinetuneOptions(data=labelled, run_dir=tmp_path / "b", device="cpu", plots=False, max_steps=4)
    )
    assert stopped.stopped == "max_steps" and stopped.step == 4  # mid-epoch 2
    resumed = finetune(
        CONFIG, FinetuneOptions(data=labelled, run_dir=tmp_path / "b", device="cpu", plots=False, resume=True)
    )
    assert resumed.step == 6
    a, b = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert resumed.results["epochs"] == straight.results["epochs"]  # incl. epoch 2's train predictions
    assert resumed.results["final"]["test"] == straight.results["final"]["test"]
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_init_from_a_pretraining_run(labelled: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    pretrain(CONFIG, PretrainOptions(data=labelled, run_dir=pre, device="cpu", max_steps=2))
    options = FinetuneOptions(data=labelled, run_dir=tmp_path / "ft", init=pre, device="cpu", max_steps=0)
    result = finetune(apply_overrides(CONFIG, ["model.freeze=[text,vision]"]), options)
    assert result.stopped == "max_steps" and result.step == 0
    start, source = load_checkpoint(tmp_path / "ft"), load_checkpoint(pre)
    assert start["init_kind"] == "pretrain" and start["init"] == source["path"]
    for name, value in source["model"].items():
        if name.startswith("classifier."):
            continue  # redrawn from finetune.seed
        torch.testing.assert_close(start["model"][name], value, rtol=0, atol=0, msg=name)
    assert start["config"]["model"]["freeze"] == ["text", "vision"]
    groups = start["optimizer"]["param_groups"]
    trainable = sum(len(g["params"]) for g in groups)
    model = load_model(tmp_path / "ft").model
    model.freeze(start["config"]["model"]["freeze"])
    assert trainable == sum(1 for p in model.parameters() if p.requires_grad)


def test_refuses_another_tokenizer_and_unlabelled_caches(labelled: Path, small_cache: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    pretrain(CONFIG, PretrainOptions(data=small_cache, run_dir=pre, device="cpu", max_steps=1))
    with pytest.raises(CacheError, match="tokenizer"):
        finetune(CONFIG, FinetuneOptions(data=labelled, run_dir=tmp_path / "ft", init=pre, device="cpu"))
    with pytest.raises(CacheError, match="no labels"):
        finetune(CONFIG, FinetuneOptions(data=small_cache, run_dir=tmp_path / "ft2", device="cpu"))


def test_cli(labelled: Path, tmp_path: Path, run_cli) -> None:
    run = tmp_path / "run"
    args = ["finetune", "--data", str(labelled), "--init", "none", "--preset", "tiny", "--set", "data.max_len=32"]
    args += ["--set", "finetune.epochs=1", "--set", "finetune.batch_size=20", "--freeze", "text"]
    args += ["--set", "model.allow_random_frozen=true", "--device", "cpu"]  # a random text stream, frozen
    proc = run_cli(*args, "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1 dev" in proc.stdout and "test" in proc.stdout and "AUROC" in proc.stdout
    assert json.loads((run / "config.json").read_text())["model"]["freeze"] == ["text"]
    bad = [*args[:4], str(tmp_path / "missing-run"), *args[5:]]
    proc = run_cli(*bad, "--out", str(tmp_path / "run2"))
    assert proc.returncode == 2 and "--init" in proc.stderr and "none" in proc.stderr


def test_gradient_accumulation_matches_the_whole_batch(labelled: Path, tmp_path: Path) -> None:
    # No dropout (the cpu recipe): two micro-batches of 8 then see exactly what one batch of 16 sees,
    # up to float summation order. Adam divides by the gradient's own size, so on an element whose
    # gradient is zero or near it in exact arithmetic (key biases: softmax ignores them) that rounding
    # noise becomes a step of up to about lr (seen once in a full local run, on the patch embedding).
    # So: 99% of each tensor's elements agree to rtol 1e-4 / atol 1e-5, none differs by more than the
    # 3 steps' 3 lr, and the mean difference stays under lr / 10 (measured: at most 2.5e-7 = lr / 400),
    # where a real accumulation error (a micro-batch counted twice or dropped) moves most elements by
    # about lr. The per-step losses must agree to 1e-5.
    base = apply_overrides(cpu(tiny()), ["finetune.epochs=1", "finetune.log_every=1"])
    runs = {}
    for name, overrides in (
        ("whole", ["finetune.batch_size=16"]),
        ("accum", ["finetune.batch_size=8", "finetune.grad_accum=2"]),
    ):
        options = FinetuneOptions(data=labelled, run_dir=tmp_path / name, device="cpu", plots=False)
        runs[name] = finetune(apply_overrides(base, overrides), options)
    assert runs["whole"].step == runs["accum"].step == 3  # 40 rows: 16 + 16 + 8
    a, b = load_checkpoint(tmp_path / "whole")["model"], load_checkpoint(tmp_path / "accum")["model"]
    lr = base.finetune.lr
    for name in a:
        diff = (a[name] - b[name]).abs()
        loose = diff > 1e-5 + 1e-4 * b[name].abs()
        detail = (name, int(loose.sum()), a[name].numel(), float(diff.max()), float(diff.mean()))
        assert loose.float().mean() <= 0.01 and diff.max() <= 3 * lr and diff.mean() <= lr / 10, detail
    losses = [[r["loss"] for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in ("whole", "accum")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
