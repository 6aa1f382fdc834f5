"""Shared pieces for the model tests: a tiny config and a padded batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vilbert.config import ModelConfig, tiny


def tiny_model_config(**changes: object) -> ModelConfig:
    """`tiny()`'s model with a small vocabulary (fast) and any `ModelConfig` fields changed."""
    model = tiny().model
    model = dataclasses.replace(model, text=dataclasses.replace(model.text, vocab_size=97))
    return dataclasses.replace(model, **changes)


def make_batch(config: ModelConfig, batch: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with padding in two rows, normalized-looking pixels, a random image mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.text.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = config.text.pad_token_id
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    patches = (size // config.vision.patch_size) ** 2
    image_mask = torch.rand(batch, patches, generator=g) < 0.4
    return {"input_ids": ids, "attention_mask": mask, "pixels": pixels, "image_mask": image_mask}


@pytest.fixture
def config() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _on_one_thread(one_thread):
    # These models are tiny: one intra-op thread is as fast, and far steadier on a shared 2-core box.
    yield
