"""metrics.jsonl writing, truncation on resume, and the PNG curves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vilbert.errors import UsageError
from vilbert.train.metrics import Accumulator, MetricsWriter, StepClock, read_metrics
from vilbert.train.plot import plot_runs


def _write_run(run: Path, steps: int, scale: float = 1.0) -> None:
    writer = MetricsWriter(run / "metrics.jsonl")
    for step in range(1, steps + 1):
        writer.write(
            {
                "kind": "train",
                "step": step,
                "epoch": 0,
                "loss": torch.tensor(scale / step),
                "mlm_loss": 2.0 / step,
                "ap_acc": 1 - 0.5 / step,
                "samples_per_s": 100.0 + step,
                "data_wait_frac": 0.01,
                "lr": 1e-3,
                "peak_mem_mb": None,
            }
        )
        if step % 5 == 0:
            writer.write(
                {
                    "kind": "eval",
                    "step": step,
                    "epoch": 0,
                    "loss": scale / step,
                    "ap_acc": 0.9,
                    "mim_top1": float("nan"),
                }
            )


def test_writer_callback_truncate_and_torn_line(tmp_path: Path) -> None:
    seen = []
    writer = MetricsWriter(tmp_path / "metrics.jsonl", callback=seen.append)
    for step in range(1, 6):
        writer.write({"kind": "train", "step": step, "loss": torch.tensor(float(step))})
    assert [r["loss"] for r in seen] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert writer.truncate_after(3) == 2
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert MetricsWriter(None).truncate_after(0) == 0


def test_accumulator_and_clock() -> None:
    acc = Accumulator()
    acc.add({"a": torch.tensor(1.5), "b": 2})
    acc.add({"a": torch.tensor(0.5)})
    assert acc.totals() == {"a": 2.0, "b": 2.0}
    clock = StepClock()
    it = iter([1, 2])
    assert clock.next_from(it) == 1
    clock.step_done(8)
    summary = clock.summary()
    assert summary["samples_per_s"] > 0 and 0 <= summary["data_wait_frac"] <= 1
    assert clock.next_from(it) == 2
    with pytest.raises(StopIteration):
        clock.next_from(it)


def test_plot_overlays_runs(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", 20)
    _write_run(tmp_path / "b", 12, scale=2.0)
    written = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "plots")
    assert {p.name for p in written} == {"losses.png", "accuracy.png", "throughput.png", "curves.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not math.isnan(read_metrics(tmp_path / "a")[0]["loss"])


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(UsageError, match="no plottable"):
        plot_runs([tmp_path / "empty"], tmp_path / "out")
