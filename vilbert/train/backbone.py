"""Supervised pretraining of the vision stream on labelled images: the offline stand-in for the pretrained
weights a real run starts from.

ViLBERT never learns to see from captions alone: the original reads a detector trained on Visual Genome's
objects and attributes, and our thesis layout a timm ViT trained on ImageNet, both frozen. The `tiny`
preset has no such weights, and a from-scratch vision stream does not learn shapes from pretraining in a
CPU budget (docs/results.md, Appendix A). `train_vision_backbone` makes the small
equivalent: one linear head per label set on the encoder's [CLS] token, cross-entropy summed over the
label sets, AdamW with warmup and linear decay; `save_vision_weights` writes what
`model.vision.pretrained` loads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vilbert.config import VisionConfig
from vilbert.model.vision import VisionEncoder
from vilbert.model.weights import normalization_metadata
from vilbert.train.optim import build_optimizer, build_scheduler
from vilbert.train.pixels import PixelNormalizer

__all__ = ["BackboneResult", "save_vision_weights", "train_on_synthetic_objects", "train_vision_backbone"]


@dataclass(frozen=True)
class BackboneResult:
    """The trained encoder, its held-out top-1 accuracy per label set, and what it took."""

    encoder: VisionEncoder
    accuracy: dict[str, float]
    steps: int
    seconds: float


def train_vision_backbone(
    config: VisionConfig,
    train_pixels: np.ndarray,
    train_labels: dict[str, np.ndarray],
    test_pixels: np.ndarray,
    test_labels: dict[str, np.ndarray],
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    init_std: float = 0.02,
    seed: int = 0,
) -> BackboneResult:
    """Train a from-scratch `VisionEncoder(config)` to classify `train_pixels` by every label set.

    Args:
        config: The vision stream (its `pretrained` must be None: this builds weights, it does not refine them).
        train_pixels, test_pixels: `(N, 3, S, S)` uint8 images at `config.image_size`.
        train_labels, test_labels: The same label-set names -> `(N,)` int64 class ids from 0.
        init_std: The from-scratch init of the blocks (`ModelConfig.initializer_range`).
        seed: Seeds the init and the batch order (same inputs, same weights).

    Raises:
        ValueError: Mismatched images and labels, or `config.pretrained` set.
    """
    if config.pretrained is not None:
        raise ValueError(f"train_vision_backbone starts from scratch; config.pretrained={config.pretrained!r}")
    size = config.image_size
    for name, pixels, labels in (("train", train_pixels, train_labels), ("test", test_pixels, test_labels)):
        if pixels.dtype != np.uint8 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"{name} pixels are {pixels.dtype} {pixels.shape}; need uint8 (N, 3, {size}, {size})")
        if set(labels) != set(train_labels) or any(len(v) != len(pixels) for v in labels.values()):
            raise ValueError(f"{name} labels must name the same label sets as train, one id per image")
    torch.manual_seed(seed)
    encoder = VisionEncoder(config, init_std=init_std)
    classes = {name: int(max(train_labels[name].max(), test_labels[name].max())) + 1 for name in train_labels}
    heads = nn.ModuleDict({name: nn.Linear(config.hidden_size, n) for name, n in classes.items()})
    trainable = nn.ModuleList([encoder, heads])
    optimizer = build_optimizer(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup_steps, total_steps=steps, schedule="linear")
    normalizer = PixelNormalizer(encoder.image_mean, encoder.image_std, "cpu")
    images = torch.from_numpy(train_pixels)
    targets = {name: torch.from_numpy(ids) for name, ids in train_labels.items()}
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    trainable.train()
    for _ in range(steps):
        rows = torch.randint(len(images), (batch_size,), generator=order)
        pooled = encoder(normalizer.model_input(images[rows]))[:, 0]
        loss = sum(F.cross_entropy(heads[name](pooled), ids[rows]) for name, ids in targets.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    trainable.eval()
    hits = dict.fromkeys(test_labels, 0)
    with torch.no_grad():
        for first in range(0, len(test_pixels), 256):
            pooled = encoder(normalizer.model_input(torch.from_numpy(test_pixels[first : first + 256])))[:, 0]
            for name, ids in test_labels.items():
                predicted = heads[name](pooled).argmax(-1).numpy()
                hits[name] += int((predicted == ids[first : first + 256]).sum())
    accuracy = {name: count / len(test_pixels) for name, count in hits.items()}
    return BackboneResult(encoder=encoder, accuracy=accuracy, steps=steps, seconds=seconds)


def train_on_synthetic_objects(
    config: VisionConfig, *, images: int = 3200, steps: int = 600, init_std: float = 0.02, seed: int = 0
) -> BackboneResult:
    """`train_vision_backbone` on `images` labelled one-shape scenes (`render_objects`, seed `2 * seed`),
    scored on `images // 4` more (seed `2 * seed + 1`); what `vilbert synth vision` and the learning test run."""
    from vilbert.pipeline.synthetic.objects import render_objects

    size = config.image_size
    train = render_objects(images, size, seed=2 * seed)
    test = render_objects(max(images // 4, 1), size, seed=2 * seed + 1)
    return train_vision_backbone(
        config, train.pixels, train.labels, test.pixels, test.labels, steps=steps, init_std=init_std, seed=seed
    )


def save_vision_weights(encoder: VisionEncoder, path: str | Path) -> Path:
    """Write the encoder's ViT weights as safetensors (temp file + rename), for `model.vision.pretrained`.

    The file holds timm's `VisionTransformer` state dict (no classification heads, no mask token), so
    `VisionEncoder` with the same `timm_name`, sizes and `stem` loads it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: vision weights are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.vit.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=normalization_metadata(encoder.image_mean, encoder.image_std))
    os.replace(tmp, path)
    return path
