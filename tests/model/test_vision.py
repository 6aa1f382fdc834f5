"""Our VisionEncoder against timm's VisionTransformer with the same state dict."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import save_file

from vilbert.config import VisionConfig, tiny
from vilbert.errors import ConfigError, ModelError
from vilbert.model import ViLBERT, VisionEncoder, normalization_metadata
from vilbert.overrides import apply_overrides

CONFIG = VisionConfig(
    timm_name="vit_tiny_patch16_224", image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=3
)
IMAGENET = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}
"""Not timm's default for vit_tiny_patch16_224 (0.5 everywhere), so taking it shows where it came from."""


def _timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=10,
    )
    with torch.no_grad():  # random norms and cls/pos, so nothing is trivially zero or one
        for name, p in vit.named_parameters():
            if "norm" in name or name in ("cls_token", "pos_embed"):
                p.add_(0.1 * torch.randn_like(p))
    return vit.eval()


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_equals_timm_forward_features_with_same_state_dict():
    vit = _timm_vit()
    ours = VisionEncoder(CONFIG).eval()
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    ours.vit.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours(_pixels()), vit.forward_features(_pixels()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_loads_local_weight_file(tmp_path, suffix):
    vit = _timm_vit()
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}  # with a 10-class head, dropped
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    # A file from elsewhere does not say how its pixels were normalized: the user says, or it is refused.
    with pytest.raises(ModelError, match="set model.vision.image_mean and model.vision.image_std"):
        VisionEncoder(dataclasses.replace(CONFIG, pretrained=str(path)))
    ours = VisionEncoder(dataclasses.replace(CONFIG, pretrained=str(path), **IMAGENET)).eval()
    assert (ours.image_mean, ours.image_std) == (IMAGENET["image_mean"], IMAGENET["image_std"])
    with torch.no_grad():
        torch.testing.assert_close(ours(_pixels()), vit.forward_features(_pixels()), atol=1e-5, rtol=1e-5)


def test_mask_token_replaces_exactly_the_masked_patches():
    ours = VisionEncoder(CONFIG).eval()
    pixels = _pixels()
    mask = torch.zeros(2, ours.num_patches, dtype=torch.bool)
    mask[0, 3] = True
    plain, masked = ours.embed(pixels), ours.embed(pixels, mask)
    changed = (plain != masked).any(-1)  # (B, 1+P)
    expected = torch.zeros_like(changed)
    expected[0, 4] = True  # patch 3 sits after [CLS]
    assert torch.equal(changed, expected)
    pos = ours.vit.pos_embed[0, 4]
    torch.testing.assert_close(masked[0, 4], ours.mask_token[0, 0] + pos)


def test_exposes_the_normalization_of_its_weights():
    ours = VisionEncoder(CONFIG)
    cfg = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert ours.image_mean == tuple(cfg["mean"]) and ours.image_std == tuple(cfg["std"])
    assert ours.num_patches == 16


def test_offline_download_is_a_model_error(monkeypatch):
    # Hub offline mode: the download fails at once instead of waiting on the network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="offline|local"):
        VisionEncoder(dataclasses.replace(CONFIG, pretrained="vit_tiny_patch16_224"))


def test_unknown_timm_name_lists_choices():
    with pytest.raises(ModelError, match="unknown timm model 'vit_nope'"):
        VisionEncoder(dataclasses.replace(CONFIG, timm_name="vit_nope"))


def test_wrong_image_size_is_a_model_error():
    with pytest.raises(ModelError, match="image_size=32"):
        VisionEncoder(CONFIG)(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("std", [0.02, 0.07])
def test_from_scratch_blocks_and_positions_take_the_init_std(std):
    torch.manual_seed(0)
    encoder = VisionEncoder(dataclasses.replace(CONFIG, hidden_size=64, num_heads=2), init_std=std)
    linear = torch.cat([m.weight.flatten() for m in encoder.vit.blocks.modules() if isinstance(m, torch.nn.Linear)])
    assert linear.std().item() == pytest.approx(std, rel=0.05)  # ~50k weights: well within 5%
    assert all((m.bias == 0).all() for m in encoder.vit.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert encoder.vit.pos_embed.std().item() == pytest.approx(std, rel=0.15)  # 17 x 64 values


def test_loaded_weights_are_not_reinitialized(tmp_path):
    vit = _timm_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    ours = VisionEncoder(dataclasses.replace(CONFIG, pretrained=str(path), **IMAGENET), init_std=0.07)
    for name, value in vit.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(ours.vit.state_dict()[name], value), name


CONV = dataclasses.replace(CONFIG, stem="conv", stem_width=8)


def test_conv_stem_stages_halve_the_image_down_to_the_patch_grid():
    encoder = VisionEncoder(CONV)
    convs = [m for m in encoder.vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 16), (16, 48)]  # 8 = 2**3: three
    assert encoder.num_patches == 16
    assert encoder(_pixels()).shape == (2, 17, 48)


def test_conv_stem_tokens_see_only_their_neighbourhood():
    """A pixel change reaches the patch tokens within the stem's receptive field (22 px), not the far ones:
    the locality the linear patch embedding has only inside its own patch."""
    encoder = VisionEncoder(dataclasses.replace(CONV, image_size=64)).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    changed = pixels.clone()
    changed[0, :, 0:4, 0:4] += 1.0
    with torch.no_grad():
        before = encoder.vit.patch_embed(pixels)[0].view(8, 8, -1)
        after = encoder.vit.patch_embed(changed)[0].view(8, 8, -1)
    moved = (after - before).abs().amax(-1) > 0
    assert moved[0, 0] and moved[1, 1]  # the patch itself and its diagonal neighbour
    assert not moved[2:, :].any() and not moved[:, 2:].any()


def test_conv_stem_refuses_timm_weights_by_name():
    with pytest.raises(ModelError, match="linear patch embedding; model.vision.stem=conv takes a local weights file"):
        VisionEncoder(dataclasses.replace(CONV, pretrained="vit_tiny_patch16_224"))


def test_conv_stem_weights_round_trip_through_a_local_file(tmp_path):
    torch.manual_seed(0)
    trained = VisionEncoder(CONV).eval()
    path = tmp_path / "stem.safetensors"
    save_file(
        {k: v.contiguous() for k, v in trained.vit.state_dict().items()},
        str(path),
        normalization_metadata(trained.image_mean, trained.image_std),
    )
    loaded = VisionEncoder(dataclasses.replace(CONV, pretrained=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels()), trained(_pixels()), atol=0, rtol=0)
    with pytest.raises(ModelError, match="do not fit model.vision"):
        VisionEncoder(dataclasses.replace(CONFIG, pretrained=str(path)))  # a linear-patch config


# ------------------------------------------------------------------------------- normalization


def _vilbert_file(tmp_path, mean, std) -> str:
    """Vision weights as `vilbert synth vision` writes them, trained (nominally) under `mean`/`std`."""
    from vilbert.train.backbone import save_vision_weights

    encoder = VisionEncoder(dataclasses.replace(tiny().model.vision, image_mean=mean, image_std=std))
    return str(save_vision_weights(encoder, tmp_path / "vision.safetensors"))


def test_a_vilbert_vision_file_carries_its_normalization_into_the_model_and_its_exports(tmp_path):
    path = _vilbert_file(tmp_path, IMAGENET["image_mean"], IMAGENET["image_std"])
    config = tiny().model
    model = ViLBERT(dataclasses.replace(config, vision=dataclasses.replace(config.vision, pretrained=path)))
    assert (model.image_mean, model.image_std) == (IMAGENET["image_mean"], IMAGENET["image_std"])
    assert model.config.vision.image_mean == IMAGENET["image_mean"]  # what save_pretrained writes
    model.save_pretrained(tmp_path / "export")
    loaded = ViLBERT.from_pretrained(tmp_path / "export")  # the vision file is not read again
    assert (loaded.image_mean, loaded.image_std) == (IMAGENET["image_mean"], IMAGENET["image_std"])
    assert loaded.config.vision.pretrained == path


def test_a_normalization_that_contradicts_the_file_is_refused(tmp_path):
    path = _vilbert_file(tmp_path, IMAGENET["image_mean"], IMAGENET["image_std"])
    vision = dataclasses.replace(tiny().model.vision, pretrained=path)
    with pytest.raises(ModelError, match=r"disagree with the metadata of .*vision.safetensors: mean=\[0.485"):
        VisionEncoder(dataclasses.replace(vision, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)))
    agreeing = VisionEncoder(dataclasses.replace(vision, **IMAGENET))
    assert agreeing.image_std == IMAGENET["image_std"]


@pytest.mark.parametrize("mean", ['"0.5"', "[0.5, 0.5]", "[0.5, 0.5, NaN]", "not json"])
def test_malformed_normalization_metadata_is_a_model_error(tmp_path, mean):
    state = {k: v.contiguous() for k, v in VisionEncoder(CONFIG).vit.state_dict().items()}
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path), {"image_mean": mean, "image_std": "[0.5, 0.5, 0.5]"})
    with pytest.raises(ModelError, match="is not 3 finite means and 3 stds > 0"):
        VisionEncoder(dataclasses.replace(CONFIG, pretrained=str(path)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.vision.image_mean=[0.5,0.5,0.5]"], "set together with vision.image_mean"),
        (["model.vision.image_mean=[0.5,0.5]", "model.vision.image_std=[0.5,0.5,0.5]"], "3 numbers"),
        (["model.vision.image_mean=[0.5,0.5,0.5]", "model.vision.image_std=[0.5,0,0.5]"], "3 numbers > 0"),
    ],
)
def test_normalization_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny(), overrides)
