"""The pretraining loop in-process: exact resume, checkpoint contents, refusals, sub-batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vilbert.cache import CacheReader
from vilbert.config import Config, tiny
from vilbert.errors import CacheError, CheckpointError
from vilbert.model import ViLBERT
from vilbert.overrides import apply_overrides, config_from_dict
from vilbert.train.checkpoint import load_checkpoint
from vilbert.train.loading import load_model
from vilbert.train.metrics import read_metrics
from vilbert.train.pretrain import PretrainOptions, pretrain, run_config

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = [
    "data.max_len=32",
    "pretrain.batch_size=8",
    "pretrain.grad_accum=2",
    "pretrain.epochs=3",
    "pretrain.log_every=1",
    "pretrain.eval_max_batches=1",
    "pretrain.checkpoint_every=0",
    "pretrain.warmup_steps=2",
]


def _config(*overrides: str) -> Config:
    return apply_overrides(tiny(), [*BASE, *overrides])


def _run(cache: Path, run: Path, config: Config, max_steps: int | None, resume: bool = False, device: str = "cpu"):
    options = PretrainOptions(data=cache, run_dir=run, device=device, max_steps=max_steps, resume=resume)
    return pretrain(config, options)


def test_n_steps_resume_n_steps_equals_2n_steps(tiny_cache: Path, tmp_path: Path) -> None:
    config = _config()
    # 52 train rows / 8 = 6 batches = 3 steps of 2 micro-batches per epoch: the run stops and resumes
    # mid-epoch (step 4 = epoch 1, batch 2), and the resumed half crosses an epoch end (evaluation,
    # epoch checkpoint, a new shuffle). Dropout is on (tiny: 0.1), so its RNG must be restored too.
    full = _run(tiny_cache, tmp_path / "full", config, max_steps=8)
    first = _run(tiny_cache, tmp_path / "split", config, max_steps=4)
    assert (full.step, first.step, first.stopped) == (8, 4, "max_steps")
    second = _run(tiny_cache, tmp_path / "split", run_config(tmp_path / "split"), max_steps=8, resume=True)
    assert second.step == 8 and second.epoch == 2

    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"parameter {name} differs after resume"
    for key in ("exp_avg", "exp_avg_sq"):
        for i, state in a["optimizer"]["state"].items():
            assert torch.equal(state[key], b["optimizer"]["state"][i][key])
    assert a["loader"] == b["loader"] and a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8

    losses = lambda run: [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run)]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert [r["kind"] for r in read_metrics(tmp_path / "full")].count("eval") == 2


def test_checkpoint_contents_and_keep_last(tiny_cache: Path, tmp_path: Path) -> None:
    config = _config("pretrain.checkpoint_every=2", "pretrain.keep_last=2", "pretrain.tasks=ap", "pretrain.epochs=2")
    result = _run(tiny_cache, tmp_path / "run", config, max_steps=5)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000005.pt"]
    state = load_checkpoint(tmp_path / "run")  # torch.load(weights_only=True) inside
    assert state["step"] == 5 == result.step
    assert set(state) >= {"model", "optimizer", "scheduler", "loader", "rng", "config", "step", "epoch"}
    assert state["loader"]["position"] == 4 and state["loader"]["epoch"] == 1
    assert set(state["rng"][0]) >= {"torch", "numpy", "python", "generators"}
    assert "masking" in state["rng"][0]["generators"]
    assert not any(k.startswith(("_orig_mod", "module.")) for k in state["model"])
    vocab = CacheReader(tiny_cache / "train").manifest.vocab_size
    assert vocab < 1000 and state["config"]["model"]["text"]["vocab_size"] == vocab  # the cache's tokenizer
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["pretrain"]["tasks"] == ["ap"]
    model = ViLBERT(run_config(tmp_path / "run").model)
    model.load_state_dict(state["model"])


def test_fresh_run_refuses_an_existing_run_and_resume_needs_one(tiny_cache: Path, tmp_path: Path) -> None:
    config = _config("pretrain.tasks=ap")
    _run(tiny_cache, tmp_path / "run", config, max_steps=1)
    with pytest.raises(CheckpointError, match="--resume"):
        _run(tiny_cache, tmp_path / "run", config, max_steps=2)
    with pytest.raises(CheckpointError, match="no run directory"):
        _run(tiny_cache, tmp_path / "other", config, max_steps=2, resume=True)
    with pytest.raises(CheckpointError, match="another model config"):
        _run(tiny_cache, tmp_path / "run", _config("pretrain.tasks=ap", "model.cross.num_heads=4"), 2, resume=True)


def test_a_checkpoint_of_an_earlier_format_is_refused_clearly(tiny_cache: Path, tmp_path: Path) -> None:
    config = _config("pretrain.tasks=ap")
    result = _run(tiny_cache, tmp_path / "run", config, max_steps=1)
    state = torch.load(result.checkpoint, weights_only=True)
    torch.save({**state, "format": "vilbert-pretrain/1"}, result.checkpoint)
    with pytest.raises(
        CheckpointError, match=r"vilbert-pretrain/1 checkpoint of an earlier vilbert.*reads vilbert-pretrain/2"
    ):
        _run(tiny_cache, tmp_path / "run", config, max_steps=2, resume=True)
    with pytest.raises(CheckpointError, match="earlier vilbert"):
        load_model(tmp_path / "run")


def test_refuses_float16_cache_with_other_normalization(tmp_path: Path, cache_builder) -> None:
    cache = cache_builder(tmp_path / "cache", 40, pixel_dtype="float16", normalization="imagenet")
    with pytest.raises(CacheError, match=r"normalized with .*imagenet.*expect mean=\(0.5, 0.5, 0.5\)"):
        _run(cache, tmp_path / "run", _config(), max_steps=1)


def test_refuses_image_size_mismatch(tiny_cache: Path, tmp_path: Path) -> None:
    config = config_from_dict({"model": {"vision": {"image_size": 32}}, "data": {"image_size": 32}}, base=_config())
    with pytest.raises(CacheError, match="64px images.*image_size=32"):
        _run(tiny_cache, tmp_path / "run", config, max_steps=1)


def test_task_sub_batches_and_options(tiny_cache: Path, tmp_path: Path) -> None:
    config = _config(
        "pretrain.mim_batch_size=4",
        "pretrain.ap_batch_size=8",
        "pretrain.mim_positions=unmasked",
        "pretrain.mim_stop_grad=false",
        "pretrain.augment=true",
        "pretrain.align_only_for_mlm_mim=false",
        "pretrain.eval_every=1",
        "pretrain.schedule=cosine",
    )
    _run(tiny_cache, tmp_path / "run", config, max_steps=2)
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if r["kind"] == "train"]
    assert {
        "mlm_loss",
        "mlm_acc",
        "ap_loss",
        "ap_acc",
        "mim_loss",
        "mim_top1",
        "lr",
        "samples_per_s",
        "data_wait_s",
        "step_time_s",
        "peak_mem_mb",
        "grad_norm",
    } <= set(train[0])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 2]  # eval_every=1; the epoch has 3 steps
    assert all(0 <= r["ap_acc"] <= 1 and r["mim_loss"] > 0 for r in train)


@pytest.mark.slow
def test_compiled_model_checkpoints_uncompiled_names(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo captures the graphs as with the default backend; "eager" skips inductor's C++ compilation
    # (over ten minutes on 2 shared cores), which is not what this test is about.
    compile_, modes, step_marks = torch.compile, [], []

    def eager_compile(model=None, **kwargs):
        modes.append(kwargs.get("mode"))
        return compile_(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: step_marks.append(1))
    overrides = ("pretrain.compile=true", "pretrain.compile_mode=reduce-overhead", "pretrain.tasks=mlm,ap")
    config = _config(*overrides)
    result = _run(tiny_cache, tmp_path / "run", config, 2)
    # The mode reaches torch.compile; each micro-batch starts a new step for CUDA graphs (outputs reusable).
    assert modes == ["reduce-overhead"] and len(step_marks) == 2 * config.pretrain.grad_accum > 2
    state = load_checkpoint(result.checkpoint)
    assert not any("_orig_mod" in k for k in state["model"])
    ViLBERT(run_config(tmp_path / "run").model).load_state_dict(state["model"])  # strict: the same names


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
def test_cuda_graphs_train_as_eager_does(tiny_cache: Path, tmp_path: Path) -> None:
    # The trainer under torch.compile(mode="reduce-overhead") on CUDA, through an epoch-end evaluation:
    # a replay overwrites the last step's outputs, so anything the loop kept of them would fail to read
    # (cudagraph trees raise) or be wrong. Same data order and initial weights as eager; dropout draws
    # differ between eager and compiled kernels, so the losses agree loosely, not exactly.
    losses = {}
    for mode in ("eager", "reduce-overhead"):
        overrides = () if mode == "eager" else ("pretrain.compile=true", f"pretrain.compile_mode={mode}")
        result = _run(tiny_cache, tmp_path / mode, _config(*overrides), 6, device="cuda")
        records = read_metrics(tmp_path / mode)
        assert result.step == 6 and [r["kind"] for r in records].count("eval") == 1
        losses[mode] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses["reduce-overhead"]) == 6 and all(math.isfinite(v) for v in losses["reduce-overhead"])
    eager, graphs = (sum(values) / len(values) for values in losses.values())
    assert abs(graphs - eager) <= 0.1 * eager, losses
