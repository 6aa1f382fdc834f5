"""`vilbert evaluate` and `load_model`: every checkpoint kind, metrics that agree with a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vilbert.cache import CacheReader
from vilbert.config import tiny
from vilbert.errors import CacheError, CheckpointError
from vilbert.overrides import apply_overrides
from vilbert.pipeline.synthetic.caches import scene_caches
from vilbert.train.evaluate import evaluate, predict
from vilbert.train.finetune import FinetuneOptions, finetune
from vilbert.train.loading import load_model
from vilbert.train.pretrain import PretrainOptions, pretrain
from vilbert.train.scoring import auroc

CONFIG = apply_overrides(
    tiny(),
    [
        "data.max_len=32",
        "finetune.epochs=1",
        "finetune.batch_size=16",
        "pretrain.batch_size=16",
        "pretrain.epochs=1",
        "pretrain.checkpoint_every=0",
    ],
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scene_caches(
        tmp_path_factory.mktemp("labelled"), {"train": 32, "dev_seen": 24, "test_seen": 16}, labelled=True
    )


@pytest.fixture(scope="module")
def finetuned(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ft") / "run"
    finetune(CONFIG, FinetuneOptions(data=labelled, run_dir=run, device="cpu", plots=False))
    return run


def test_finetune_checkpoint_metrics_match_a_hand_computation(labelled: Path, finetuned: Path) -> None:
    report = evaluate(finetuned, labelled / "dev_seen", device="cpu", batch_size=7)
    assert report["kind"] == "finetune" and report["split"] == "dev_seen" and report["rows"] == 24
    assert report["pretraining"] is None
    loaded = load_model(finetuned)
    reader = CacheReader(labelled / "dev_seen")
    preds = predict(loaded.model, reader, batch_size=24)
    labels = torch.from_numpy(reader.gather(range(24))["label"])
    torch.testing.assert_close(preds.labels, labels)
    margin = preds.classify[:, 1] - preds.classify[:, 0]
    assert report["classifier"]["auroc"] == pytest.approx(auroc(labels, margin))
    assert report["classifier"]["accuracy"] == pytest.approx((preds.classify.argmax(1) == labels).float().mean().item())
    loss = torch.nn.functional.cross_entropy(preds.classify, labels).item()
    assert report["classifier"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0.0 <= report["alignment"]["auroc"] <= 1.0
    results = json.loads((finetuned / "results.json").read_text())
    assert results["final"]["dev"]["auroc"] == pytest.approx(report["classifier"]["auroc"])


def test_pretraining_checkpoint_and_export(labelled: Path, tmp_path: Path) -> None:
    run = tmp_path / "pre"
    pretrain(CONFIG, PretrainOptions(data=labelled, run_dir=run, device="cpu", max_steps=1))
    report = evaluate(run, labelled / "test_seen", device="cpu")
    assert report["kind"] == "pretrain" and report["step"] == 1
    assert {"mlm_acc", "ap_acc", "mim_top1", "loss"} <= set(report["pretraining"])
    again = evaluate(run, labelled / "test_seen", device="cpu")
    assert again["pretraining"] == report["pretraining"]  # the same masks every time
    exported = load_model(run).model.save_pretrained(tmp_path / "export")
    from_export = evaluate(exported, labelled / "test_seen", device="cpu")
    assert from_export["kind"] == "export" and from_export["pretraining"] is None
    assert from_export["alignment"] == report["alignment"]


def test_errors_name_the_problem(labelled: Path, finetuned: Path, tmp_path: Path, small_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="no run directory or checkpoint"):
        load_model(tmp_path / "missing")
    with pytest.raises(CacheError, match="dev_seen, test_seen, train"):
        evaluate(finetuned, labelled, device="cpu")
    with pytest.raises(CacheError, match="tokenizer|px"):  # another tokenizer (larger vocabulary)
        evaluate(finetuned, small_cache / "test", device="cpu")


def test_cli_table_and_json(labelled: Path, finetuned: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "eval.json"
    options = ["--data", str(labelled / "dev_seen"), "--device", "cpu", "--out", str(out)]
    proc = run_cli("evaluate", str(finetuned), *options)
    assert proc.returncode == 0, proc.stderr
    assert "AUROC" in proc.stdout and "classifier" in proc.stdout
    assert json.loads(out.read_text())["classifier"]["n"] == 24
    proc = run_cli("evaluate", str(tmp_path / "nothing"), *options)
    assert proc.returncode == 2 and "nothing" in proc.stderr  # a missing input path is a usage error
