"""The vision stream: timm's `VisionTransformer`, with a learned mask token for MIM.

`VisionEncoder(config)(pixels)` returns what timm's `forward_features` returns (`(B, 1+P, D)`, [CLS]
first, after the final norm). ViLBERT drives the same pieces one at a time (`embed`, `blocks`,
`norm`) so cross layers can run between blocks. Weights come from timm by name (online) or from a
local safetensors / state-dict file; `image_mean`/`image_std` are what those weights expect: timm's
`pretrained_cfg` for a timm name, the metadata vilbert writes into its own files
(`vilbert.model.weights.normalization_metadata`), or `model.vision.image_mean`/`image_std` for a
file that carries none (refused without them: a guessed normalization would fail silently).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from vilbert.config import VisionConfig
from vilbert.errors import ModelError
from vilbert.model.attention import init_bert_weights
from vilbert.model.weights import read_normalization, read_state_dict

__all__ = ["VisionEncoder", "timm_model_kwargs"]

log = logging.getLogger(__name__)

_LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class VisionEncoder(nn.Module):
    """A timm ViT shaped by `config`, plus a mask token that replaces masked patch embeddings.

    Args:
        config: The vision stream; `config.pretrained` is a timm name (downloaded), a local file,
            or None (random init, works offline).
        init_std: The std of the from-scratch init of the blocks' Linear weights and the position
            embeddings (`ModelConfig.initializer_range`, as for every other part built from scratch;
            timm's own is 0.02 whatever the width). Unused when weights are loaded.

    Attributes:
        image_mean: Per-channel pixel mean the weights expect (see the module docstring).
        image_std: Per-channel pixel std the weights expect.

    Raises:
        ModelError: An unknown timm name, weights that cannot be fetched or do not fit.
    """

    def __init__(self, config: VisionConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.config = config
        source = config.pretrained
        by_name = source is not None and not _looks_like_file(source)
        if by_name and config.stem != "patch":
            raise ModelError(
                f"model.vision.pretrained={source!r} names timm weights, which have a linear patch embedding; "
                f"model.vision.stem={config.stem} takes a local weights file saved with that stem, or no weights"
            )
        self.vit = _create_vit(source if by_name else config.timm_name, config, pretrained=by_name)
        self.image_mean, self.image_std = _timm_normalization(self.vit)  # timm's default for the name
        if config.image_mean is not None and config.image_std is not None:
            self.image_mean, self.image_std = config.image_mean, config.image_std
        if by_name:
            self._adopt_normalization(_timm_normalization(self.vit), f"timm's pretrained_cfg of {source!r}")
        if source is None:
            self.vit.blocks.apply(functools.partial(init_bert_weights, std=init_std))
            nn.init.normal_(self.vit.pos_embed, std=init_std)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if source is not None and not by_name:
            self.load_weights(source)

    @property
    def num_patches(self) -> int:
        """Patches per image (the sequence has one more token, [CLS])."""
        return self.vit.patch_embed.num_patches

    @property
    def blocks(self) -> nn.Sequential:
        """The transformer blocks, run in order by ViLBERT so cross layers can interleave."""
        return self.vit.blocks

    def embed(self, pixels: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """Patch embeddings (masked ones replaced by the mask token), [CLS], positions.

        Args:
            pixels: `(B, 3, H, W)`, normalized with `image_mean`/`image_std`.
            image_mask: `(B, P)` bool, True = replace that patch by the mask token; or None.

        Returns:
            `(B, 1+P, D)`, the input of the first block.
        """
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ModelError(
                f"pixels have shape {tuple(pixels.shape)}; the vision encoder needs "
                f"(B, 3, {size}, {size}) (model.vision.image_size={size})"
            )
        if not pixels.is_floating_point():
            raise ModelError(f"pixels are {pixels.dtype}; the model takes normalized floating-point pixels")
        x = self.vit.patch_embed(pixels.to(self.vit.pos_embed.dtype))  # (B, P, D); float16 caches -> model dtype
        if image_mask is not None:
            if tuple(image_mask.shape) != tuple(x.shape[:2]):
                raise ModelError(
                    f"image_mask has shape {tuple(image_mask.shape)}; expected (B, num_patches) = {tuple(x.shape[:2])}"
                )
            x = torch.where(image_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self.vit._pos_embed(x)  # (B, 1+P, D)
        return self.vit.norm_pre(self.vit.patch_drop(x))

    def norm(self, x: Tensor) -> Tensor:
        """The final norm after the last block (ViT is pre-LN, so its stream needs one)."""
        return self.vit.norm(x)

    def forward(self, pixels: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """`(B, 1+P, D)` features, as timm's `forward_features` (without a mask)."""
        x = self.embed(pixels, image_mask)
        for block in self.vit.blocks:
            x = block(x)
        return self.norm(x)

    def load_weights(self, path: str | Path) -> None:
        """Load a timm ViT state dict (safetensors or torch file) into `self.vit`; head is dropped. The
        normalization becomes the one the file records, or `config.image_mean`/`image_std` for a file
        that records none (refused without them)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(
                f"vision weights file not found: {path}; model.vision.pretrained takes a "
                "timm model name (needs network) or a local .safetensors/.pth file"
            )
        recorded = read_normalization(path)
        if recorded is None and self.config.image_mean is None:
            raise ModelError(
                f"{path} does not record the pixel normalization its weights were trained with (vilbert "
                "records it in the files it writes); set model.vision.image_mean and model.vision.image_std "
                "to that mean and std (e.g. the pretrained_cfg of the timm model it came from)"
            )
        if recorded is not None:
            self._adopt_normalization(recorded, f"the metadata of {path}")
        state = read_state_dict(path)
        state = {k.removeprefix("module.").removeprefix("vit."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.") and k != "mask_token"}
        state = checkpoint_filter_fn(state, self.vit)  # resamples pos_embed to our image size
        try:
            self.vit.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelError(
                f"vision weights in {path} do not fit model.vision (timm_name={self.config.timm_name!r}): {err}"
            ) from None
        log.info("loaded ViT weights from %s", path)

    def _adopt_normalization(self, carried: tuple[tuple[float, ...], tuple[float, ...]], origin: str) -> None:
        """Take the normalization the weights carry; a different one in the config is a mistake."""
        given = self.config.image_mean, self.config.image_std
        if self.config.image_mean is not None and not _same_normalization(carried, given):
            raise ModelError(
                f"model.vision.image_mean={list(given[0])} image_std={list(given[1])} disagree with {origin}: "
                f"mean={list(carried[0])} std={list(carried[1])}; leave them unset to use the weights' own"
            )
        self.image_mean, self.image_std = tuple(carried[0]), tuple(carried[1])


def _timm_normalization(vit: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = vit.pretrained_cfg
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))


def _same_normalization(a: tuple[tuple[float, ...], ...], b: tuple[tuple[float, ...] | None, ...]) -> bool:
    flat_a = [x for values in a for x in values]
    flat_b = [x for values in b for x in (values or ())]
    return len(flat_a) == len(flat_b) and all(abs(x - y) < 1e-6 for x, y in zip(flat_a, flat_b, strict=True))


class ConvStemEmbed(PatchEmbed):
    """timm's `PatchEmbed` with a convolutional stem in place of its linear projection: per halving of
    the resolution one conv3x3-ReLU-maxpool2 stage, `stem_width` channels doubling per stage, the last
    stage giving `embed_dim` (8x8 patches at width 64: 16, 32, 64). With 8x8 patches each token then sees
    22 px around its patch instead of the patch alone: the locality a small ViT from scratch lacks (Xiao
    et al. 2021)."""

    def __init__(self, *, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, stem_width: int = 16,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        stages = patch_size.bit_length() - 1  # patch_size is a power of 2 (VisionConfig checks)
        widths = [stem_width * 2**i for i in range(stages - 1)] + [embed_dim]
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_chans = width
        self.proj = nn.Sequential(*layers)


def _looks_like_file(source: str) -> bool:
    return source.endswith(_LOCAL_SUFFIXES) or Path(source).exists()


def timm_model_kwargs(config: VisionConfig) -> dict[str, object]:
    """The `timm.create_model` keyword arguments that shape a ViT like `config` (no classifier head); plain
    values, so they can be written into a model card. The conv stem adds an `embed_layer` of vilbert's own."""
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        proj_drop_rate=config.dropout,
        attn_drop_rate=config.attention_dropout,
        num_classes=0,
    )


def _create_vit(name: str, config: VisionConfig, pretrained: bool) -> VisionTransformer:
    kwargs = timm_model_kwargs(config)
    if config.stem == "conv":
        kwargs["embed_layer"] = functools.partial(ConvStemEmbed, stem_width=config.stem_width)
    if not timm.is_model(name.split(".")[0]):
        valid = ", ".join(timm.list_models("vit_*")[:8])
        raise ModelError(f"unknown timm model {name!r}; valid: a timm ViT name such as {valid}, ...")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # network, hub and shape errors surface as many types
        if pretrained:
            raise ModelError(
                f"cannot load pretrained ViT {name!r} from timm ({type(err).__name__}: {err}); "
                "offline? download it once, or set model.vision.pretrained to a local "
                ".safetensors/.pth file"
            ) from None
        raise ModelError(f"cannot build timm model {name!r} with model.vision settings: {err}") from None
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"timm model {name!r} is a {type(model).__name__}; the vision stream needs a "
            "VisionTransformer (e.g. vit_base_patch16_224)"
        )
    return model
