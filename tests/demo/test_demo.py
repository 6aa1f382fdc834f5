"""`vilbert demo` end to end on a small corpus: every stage runs, and the report holds this run's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vilbert.demo import DemoOptions, remove_previous_demo, run_demo
from vilbert.errors import UsageError

STAGES = [
    "synth",
    "fetch",
    "tokenizer",
    "preprocess cc",
    "preprocess memes",
    "pretrain",
    "finetune (pretrained)",
    "finetune (from scratch)",
    "analyse",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "out"
    options = DemoOptions(
        out=out, images=240, memes=160, pretrain_epochs=1, finetune_epochs=1, latency_ms=5, device="cpu"
    )
    seen: list[str] = []
    report = run_demo(options, lambda stage, info: seen.append(stage))
    return report, seen


@pytest.mark.slow
def test_every_stage_runs_and_reports(demo) -> None:
    report, seen = demo
    assert [s.stage for s in report.stages] == STAGES
    assert {"synthesize", "fetch", "preprocess", "pretrain", "finetune", "analyse"} <= set(seen)
    text = report.report_path.read_text()
    for stage in STAGES:
        assert f"| {stage} |" in text
    figures = json.loads((report.out / "report.json").read_text())
    fetch = figures["fetch"]
    assert fetch["saved"] > 0 and fetch["saved"] + sum(fetch["failed_by_reason"].values()) == fetch["lines_read"]
    assert figures["preprocess_cc"]["rows"] == fetch["saved"] - sum(figures["preprocess_cc"]["skipped"].values())
    assert figures["pretrain"]["step"] > 0 and "mlm_loss" in figures["pretrain"]["eval"]
    assert "tiny preset, MLM + AP + MIM + ITC, 1 epochs" in text  # the tasks the run's config trained
    for run in ("finetune", "scratch"):
        assert 0.0 <= figures[run]["final"]["dev"]["auroc"] <= 1.0
    assert "## Reading it" in text and "pretraining losses" in text
    dev = {run: figures[run]["final"]["dev"]["auroc"] for run in ("finetune", "scratch")}
    assert f"(dev AUROC {dev['finetune']:.3f} against {dev['scratch']:.3f})" in text  # the verdict quotes this run
    plots = sorted((report.out / "runs" / "pretrain" / "plots").glob("*.png"))
    assert plots and all(f"]({p.relative_to(report.out)})" in text for p in plots)
    assert (report.out / "analysis.png").stat().st_size > 5000


@pytest.mark.slow
def test_out_must_be_empty_and_overwrite_only_removes_a_demo(demo, tmp_path: Path) -> None:
    report, _ = demo
    with pytest.raises(UsageError, match="not empty"):
        run_demo(DemoOptions(out=report.out))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(UsageError, match="does not look like a demo"):
        remove_previous_demo(other)
    assert (other / "thesis.tex").read_text() == "keep me"
