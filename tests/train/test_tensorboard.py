"""`pretrain.tensorboard = true`: every number of metrics.jsonl as a TensorBoard scalar, read back with
TensorBoard's own `EventAccumulator`."""

from __future__ import annotations

from pathlib import Path

import pytest

from vilbert.train.metrics import MetricsWriter, read_metrics

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

pytestmark = pytest.mark.usefixtures("one_thread")


def _scalars(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows them."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]
    }


def _numbers(records: list[dict]) -> dict[str, dict[int, float]]:
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{record['kind']}/{key}", {})[record["step"]] = float(value)
    return expected


def _assert_same(scalars: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert scalars[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # events hold float32


def test_pretrain_writes_every_metric_as_a_scalar(tiny_cache: Path, tmp_path: Path) -> None:
    from vilbert.cli.app import main

    run = tmp_path / "run"
    args = ["pretrain", "--data", str(tiny_cache), "--out", str(run), "--preset", "tiny", "--device", "cpu",
            "--set", "data.max_len=32", "--set", "pretrain.batch_size=8", "--set", "pretrain.log_every=1",
            "--set", "pretrain.eval_every=2", "--set", "pretrain.eval_max_batches=1",
            "--set", "pretrain.tensorboard=true", "--max-steps", "3"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert (exit_info.value.code or 0) == 0
    records = read_metrics(run)
    assert {r["kind"] for r in records} >= {"train", "eval"}
    _assert_same(_scalars(run / "tensorboard"), _numbers(records))


def test_finetune_writes_every_metric_as_a_scalar(tmp_path: Path) -> None:
    from vilbert.config import tiny
    from vilbert.overrides import apply_overrides
    from vilbert.pipeline.synthetic.caches import scene_caches
    from vilbert.train.finetune import FinetuneOptions, finetune

    data = scene_caches(tmp_path / "data", {"train": 24, "dev_seen": 8}, labelled=True)
    config = apply_overrides(tiny(), ["data.max_len=32", "finetune.epochs=1", "finetune.batch_size=8",
                                      "finetune.log_every=1", "finetune.tensorboard=true"])  # fmt: skip
    finetune(config, FinetuneOptions(data=data, run_dir=tmp_path / "run", device="cpu", plots=False))
    records = read_metrics(tmp_path / "run")
    assert {r["kind"] for r in records} == {"train", "eval"}
    _assert_same(_scalars(tmp_path / "run" / "tensorboard"), _numbers(records))


def test_a_resumed_run_does_not_show_a_step_twice(tmp_path: Path) -> None:
    first = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)
    for step in (1, 2, 3):
        first.write({"kind": "train", "step": step, "epoch": 0, "loss": 10.0 - step})
    first.tensorboard.close()
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)  # the checkpoint was at step 1
    assert resumed.truncate_after(1) == 2
    for step in (2, 3, 4):
        resumed.write({"kind": "train", "step": step, "epoch": 0, "loss": 100.0 + step})
    resumed.tensorboard.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == {1: 9.0, 2: 102.0, 3: 103.0, 4: 104.0}
    _assert_same(scalars, _numbers(read_metrics(tmp_path)))


def test_without_the_flag_nothing_is_written(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"kind": "train", "step": 1, "loss": 1.0})
    assert writer.tensorboard is None and not (tmp_path / "tensorboard").exists()
