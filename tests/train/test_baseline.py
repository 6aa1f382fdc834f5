"""`vilbert finetune --init none`: pretrained encoders, new cross layers and heads, as the thesis ran its
baseline; freezing an encoder without weights is refused at the run's start, not trained silently random."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vilbert.cache import CacheReader
from vilbert.config import check_frozen_parts, tiny
from vilbert.errors import ConfigError
from vilbert.model import VisionEncoder
from vilbert.pipeline.synthetic.caches import scene_caches
from vilbert.train.backbone import save_vision_weights
from vilbert.train.checkpoint import load_checkpoint

TINY_SIZES = """
[data]
image_size = 64
max_len = 32
[model.text]
hidden_size = 64
num_layers = 2
num_heads = 2
intermediate_size = 128
[model.vision]
timm_name = "vit_tiny_patch16_224"
image_size = 64
patch_size = 8
hidden_size = 64
num_layers = 2
num_heads = 2
[model.cross]
hidden_size = 64
num_heads = 2
intermediate_size = 128
[finetune]
epochs = 1
batch_size = 20
"""
"""`vilbert_base`'s architecture at tiny sizes (its freeze, pattern and schedule kept), for the CPU."""


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scene_caches(
        tmp_path_factory.mktemp("labelled"), {"train": 40, "dev_seen": 20, "test_seen": 20}, labelled=True
    )


@pytest.fixture(scope="module")
def encoder_weights(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random BERT saved by `transformers` with the cache's vocabulary, and a ViT file as `vilbert` writes it."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("weights")
    manifest = CacheReader(labelled / "train").manifest
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=manifest.vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            pad_token_id=int(manifest.special_token_ids["pad"]),
        )
    )
    bert.save_pretrained(root / "bert")
    vision = VisionEncoder(dataclasses.replace(tiny().model.vision, image_size=64))
    return {"text": root / "bert", "vision": save_vision_weights(vision, root / "vit.safetensors")}


def _finetune(run_cli, labelled: Path, run: Path, config_file: Path, *extra: str):
    args = ["finetune", "--data", str(labelled), "--init", "none", "--preset", "vilbert_base"]
    return run_cli(*args, "--config", str(config_file), "--device", "cpu", "--out", str(run), *extra)


def test_baseline_without_encoder_weights_exits_2_naming_the_keys(labelled: Path, tmp_path: Path, run_cli) -> None:
    config_file = tmp_path / "sizes.toml"
    config_file.write_text(TINY_SIZES)
    proc = _finetune(run_cli, labelled, tmp_path / "run", config_file)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.text.pretrained" in lines[0] and "model.vision.pretrained" in lines[0]
    assert "model.allow_random_frozen" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_baseline_with_encoder_weights_runs_with_them_frozen(
    labelled: Path, encoder_weights: dict[str, Path], tmp_path: Path, run_cli
) -> None:
    config_file = tmp_path / "sizes.toml"
    vocab = CacheReader(labelled / "train").manifest.vocab_size
    config_file.write_text(TINY_SIZES.replace("[model.text]", f"[model.text]\nvocab_size = {vocab}"))
    run = tmp_path / "run"
    sources = [f"--set=model.{part}.pretrained={path}" for part, path in encoder_weights.items()]
    proc = _finetune(run_cli, labelled, run, config_file, *sources)
    assert proc.returncode == 0, proc.stderr
    state = load_checkpoint(run)
    assert state["config"]["model"]["freeze"] == ["text", "vision"]
    assert state["config"]["model"]["vision"]["image_mean"] is not None  # the run's config carries the normalization
    bert = pytest.importorskip("transformers").BertModel.from_pretrained(encoder_weights["text"])
    torch.testing.assert_close(
        state["model"]["text.embeddings.word_embeddings.weight"], bert.embeddings.word_embeddings.weight.detach()
    )
    vision = load_file(str(encoder_weights["vision"]))
    torch.testing.assert_close(state["model"]["vision.vit.blocks.0.mlp.fc1.weight"], vision["blocks.0.mlp.fc1.weight"])


def test_random_frozen_parts_need_the_opt_in() -> None:
    model = tiny().model
    frozen = dataclasses.replace(model, freeze=("vision",))
    with pytest.raises(ConfigError, match=r"model\.vision\.pretrained") as info:
        check_frozen_parts(frozen)
    assert "model.text.pretrained" not in str(info.value)
    check_frozen_parts(dataclasses.replace(frozen, allow_random_frozen=True))
    check_frozen_parts(dataclasses.replace(frozen, vision=dataclasses.replace(model.vision, pretrained="v.pt")))
    check_frozen_parts(dataclasses.replace(model, freeze=("cross", "heads")))  # parts without weights to load
