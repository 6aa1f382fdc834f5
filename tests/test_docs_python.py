"""Every ```python block of docs/python.md, run as written on a tiny cache and a real export of it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from vilbert.cache import read_manifest
from vilbert.config import tiny
from vilbert.model import ViLBERT
from vilbert.overrides import config_to_dict
from vilbert.pipeline.synthetic.caches import scene_caches
from vilbert.train.checkpoint import PRETRAIN_FORMAT, CheckpointManager
from vilbert.train.export import export_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's layout: data/cache/cc/{train,test} and models/vilbert-cc (exported from a checkpoint)."""
    root = tmp_path_factory.mktemp("docs")
    cache = scene_caches(root / "data" / "cache" / "cc", 48, seed=3)
    config = tiny()
    text = dataclasses.replace(config.model.text, vocab_size=read_manifest(cache / "train").vocab_size)
    model_config = dataclasses.replace(config.model, text=text)
    config = dataclasses.replace(config, model=model_config)
    state = {"format": PRETRAIN_FORMAT, "step": 0, "epoch": 0, "config": config_to_dict(config),
             "model": ViLBERT(model_config).state_dict(), "data": str(cache)}  # fmt: skip
    CheckpointManager(root / "runs" / "cc").save(state, 0)
    export_run(root / "runs" / "cc", root / "models" / "vilbert-cc")
    return root


def test_the_doc_has_its_examples() -> None:
    assert len(BLOCKS) == 3 and all(len(block.splitlines()) <= 18 for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs_as_written(index: int, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_python_{index}"}
    exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)
    if index == 0:  # the loop ran over whole batches, normalized
        assert namespace["pixels"].shape == (16, 3, 64, 64) and namespace["mask"].dtype == torch.bool
        assert float(namespace["pixels"].min()) >= -1.01 and float(namespace["pixels"].max()) <= 1.01
    else:
        assert capsys.readouterr().out.strip()
