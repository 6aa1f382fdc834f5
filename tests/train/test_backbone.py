"""Supervised pretraining of the vision stream on labelled images, and the weights file it writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vilbert.cli.app import main as cli_main
from vilbert.config import tiny
from vilbert.model import VisionEncoder
from vilbert.pipeline.synthetic.objects import render_objects
from vilbert.train.backbone import save_vision_weights, train_vision_backbone

VISION = dataclasses.replace(tiny().model.vision, image_size=32)  # 4x4 patches of 8 px, width 64


@pytest.fixture(scope="module")
def objects():
    return render_objects(480, 32, seed=0), render_objects(240, 32, seed=1)


def _train(objects, config=VISION, **kwargs):
    train, test = objects
    return train_vision_backbone(config, train.pixels, train.labels, test.pixels, test.labels, **kwargs)


def test_learns_the_colour_of_held_out_objects(objects):
    result = _train(objects, steps=120, lr=3e-3, init_std=0.07)
    assert result.steps == 120 and set(result.accuracy) == {"shape", "colour"}
    assert result.accuracy["colour"] >= 0.5  # chance 1/6 (0.83 when written; the [CLS] token learns it in ~100 steps)


def test_same_seed_same_weights(objects):
    first, again = _train(objects, steps=4), _train(objects, steps=4)
    for (name, a), b in zip(first.encoder.state_dict().items(), again.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = _train(objects, steps=4, seed=1)
    assert not torch.equal(other.encoder.vit.pos_embed, first.encoder.vit.pos_embed)


def test_saved_weights_load_as_model_vision_pretrained(objects, tmp_path):
    config = dataclasses.replace(VISION, stem="conv")
    encoder = _train(objects, config, steps=2).encoder.eval()
    path = save_vision_weights(encoder, tmp_path / "weights" / "vision.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["vision.safetensors"]  # no temp file left
    loaded = VisionEncoder(dataclasses.replace(config, pretrained=str(path))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), encoder(pixels), atol=0, rtol=0)


def test_bad_inputs_are_refused(objects, tmp_path):
    train, test = objects
    with pytest.raises(ValueError, match="starts from scratch"):
        _train(objects, dataclasses.replace(VISION, pretrained="vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match=r"need uint8 \(N, 3, 32, 32\)"):
        train_vision_backbone(VISION, train.pixels[:, :, :16, :16], train.labels, test.pixels, test.labels)
    with pytest.raises(ValueError, match="same label sets"):
        train_vision_backbone(VISION, train.pixels, train.labels, test.pixels, {"shape": test.labels["shape"]})
    with pytest.raises(ValueError, match="written as .safetensors"):
        save_vision_weights(VisionEncoder(VISION), tmp_path / "vision.pt")


def test_cli_writes_weights_that_the_config_loads(tmp_path, capsys):
    out = tmp_path / "vision.safetensors"
    sets = ["--set", "model.vision.image_size=32", "--set", "data.image_size=32", "--set", "model.vision.stem=conv"]
    args = ["synth", "vision", "--out", str(out), "--images", "64", "--steps", "3", *sets]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "held-out accuracy: shape" in printed and "model.vision.stem=conv" in printed
    config = dataclasses.replace(VISION, stem="conv", pretrained=str(out))
    VisionEncoder(config)  # loads strictly: every tensor of the stem and the blocks fits


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--out", "{tmp}/vision.pt"], "are written as .safetensors"),
        (["--out", "{tmp}/exists.safetensors"], "exists; pass --overwrite"),
        (["--out", "{tmp}/v.safetensors", "--set", "model.vision.pretrained=vit_tiny"], "trains from scratch"),
        (["--out", "{tmp}/v.safetensors", "--steps", "0"], "need --images >= 8 and --steps >= 1"),
        (["--out", "{tmp}/v.safetensors", "--set", "model.vision.stem=convex"], "vision.stem"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(extra, fragment, tmp_path, capsys):
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["synth", "vision", *[a.format(tmp=tmp_path) for a in extra]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
