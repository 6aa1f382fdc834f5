"""The ablation's bookkeeping, and (slow) the whole chain on synthetic data: pretraining on the corpus
helps the memes task, the analysis sees alignment, and `vilbert ablate` prints its table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vilbert.errors import UsageError
from vilbert.train.ablate import AblationOptions, summarize_runs


def _run(setting: str, seed: int, dev_auroc: float, test_auroc: float = 0.5) -> dict:
    return {
        "setting": setting,
        "seed": seed,
        "dev_acc": 0.5,
        "dev_auroc": dev_auroc,
        "test_acc": 0.5,
        "test_auroc": test_auroc,
    }


def test_summary_means_sample_std_and_difference_to_none() -> None:
    runs = [_run("none", 0, 0.50), _run("none", 1, 0.54), _run("ap", 0, 0.70, 0.8), _run("ap", 1, 0.80, 0.9)]
    summary = summarize_runs(runs, ["none", "ap"])
    none, ap = summary
    assert none["setting"] == "none" and none["seeds"] == 2 and none["tasks"] == []
    assert none["dev_auroc_mean"] == pytest.approx(0.52)
    assert none["dev_auroc_std"] == pytest.approx(math.sqrt(((0.02**2) * 2) / 1))
    assert ap["dev_auroc_mean"] == pytest.approx(0.75) and ap["tasks"] == ["ap"]
    assert ap["dev_auroc_vs_none"] == pytest.approx(0.23)
    assert ap["test_auroc_vs_none"] == pytest.approx(0.35)
    single = summarize_runs([_run("all", 0, 0.6)], ["all"])[0]
    assert single["dev_auroc_std"] == 0.0 and single["dev_auroc_vs_none"] is None


def test_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="valid: none, all, mlm\\+ap, ap"):
        AblationOptions(corpus=tmp_path, memes=tmp_path, out=tmp_path, settings=("mim",))
    with pytest.raises(UsageError, match="--seeds"):
        AblationOptions(corpus=tmp_path, memes=tmp_path, out=tmp_path, seeds=0)
