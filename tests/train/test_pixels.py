"""The pixel normalizer and the on-device augmentation (`vilbert/train/pixels.py`)."""

from __future__ import annotations

import torch

from vilbert.train.pixels import PixelNormalizer, augment_images


def test_augmentation_shapes_range_and_determinism() -> None:
    images = torch.rand(6, 3, 32, 32)
    a = augment_images(images, generator=torch.Generator().manual_seed(3), flip_probability=0.5)
    b = augment_images(images, generator=torch.Generator().manual_seed(3), flip_probability=0.5)
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, images)


def test_augmentation_identity_without_crop_or_jitter() -> None:
    images = torch.rand(4, 3, 16, 16)
    out = augment_images(images, generator=torch.Generator(), crop_scale=1.0, jitter=0.0)
    # A full-size crop at aspect ratio != 1 is clamped to the image, so the only change is resampling.
    assert out.shape == images.shape
    flipped = augment_images(images, generator=torch.Generator(), crop_scale=1.0, jitter=0.0, flip_probability=1.0)
    assert torch.allclose(flipped, out.flip(-1), atol=1e-5)


def test_pixel_normalizer_uint8_and_float16_agree() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    norm = PixelNormalizer(mean, std, "cpu")
    raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    from_uint8 = norm.model_input(raw)
    stored_f16 = ((raw.float() / 255 - norm.mean) / norm.std).half()
    assert torch.allclose(norm.model_input(stored_f16), from_uint8, atol=1e-2)
    assert torch.allclose(norm.unit(raw), raw.float() / 255)
    assert torch.allclose(norm.unit(stored_f16), raw.float() / 255, atol=2e-3)
