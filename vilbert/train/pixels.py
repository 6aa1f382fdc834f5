"""Stored pixels -> model input on the device: normalization, and the optional augmentation.

- **PixelNormalizer**: a `uint8` cache stores raw pixels, divided by 255 and normalized on the device;
  a `float16` cache is stored normalized and only changes dtype. `pixel_normalizer` picks the mean and
  std the vision weights expect and refuses a float16 cache normalized otherwise.
- **augment_images**: random resized crop, horizontal flip and colour jitter (brightness, contrast,
  saturation; no hue, which would change the colour words of a caption), per sample and vectorized,
  on images in [0, 1], drawn from a `torch.Generator` (so a resumed run is exact).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from vilbert.cache import CacheReader
from vilbert.errors import CacheError

__all__ = ["PixelNormalizer", "pixel_normalizer", "augment_images"]

log = logging.getLogger(__name__)


def augment_images(
    images: torch.Tensor,
    *,
    generator: torch.Generator,
    crop_scale: float = 0.5,
    flip_probability: float = 0.0,
    jitter: float = 0.4,
) -> torch.Tensor:
    """Random resized crop, flip and colour jitter of a batch, each sample its own draw.

    Args:
        images: `(B, 3, H, W)` float in [0, 1].
        generator: On the device of `images`.
        crop_scale: Smallest crop area as a fraction of the image (torchvision's `scale=(s, 1)`);
            aspect ratio log-uniform in [3/4, 4/3]; the crop is resized back to H x W (bilinear).
        flip_probability: Horizontal flip probability. 0 by default: captions say "left of".
        jitter: Brightness, contrast and saturation factors are drawn from [1 - jitter, 1 + jitter].

    Returns:
        The augmented batch, same shape and dtype, clamped to [0, 1].
    """
    b = images.shape[0]
    dev = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator, device=dev)

    area = uniform(crop_scale, 1.0)
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - width) * uniform(-1.0, 1.0)  # centre in [-1, 1] grid units, crop stays inside
    cy = (1 - height) * uniform(-1.0, 1.0)
    flip = torch.where(uniform(0.0, 1.0) < flip_probability, -1.0, 1.0)
    theta = torch.zeros((b, 2, 3), device=dev, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        out = _colour_jitter(out, uniform, jitter)
    return out


def _colour_jitter(images: torch.Tensor, uniform, jitter: float) -> torch.Tensor:
    shape = (-1, 1, 1, 1)
    out = images * uniform(1 - jitter, 1 + jitter).view(shape)  # brightness
    gray = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)  # (B, 1, H, W)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * uniform(1 - jitter, 1 + jitter).view(shape) + mean  # contrast
    gray = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)
    out = (out - gray) * uniform(1 - jitter, 1 + jitter).view(shape) + gray  # saturation
    return out.clamp(0.0, 1.0)


class PixelNormalizer:
    """Turns stored pixels into model input on the device.

    A `uint8` cache stores raw pixels: the device divides by 255 and normalizes with the cache's
    mean/std. A `float16` cache is stored normalized already and only changes dtype.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stored pixels as float images in [0, 1] (for augmentation)."""
        if pixels.dtype == torch.uint8:
            return pixels.float() / 255.0
        return (pixels.float() * self.std + self.mean).clamp(0.0, 1.0)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images as model input."""
        return (images - self.mean) / self.std

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stored pixels as normalized float32 model input."""
        if pixels.dtype == torch.uint8:
            return self.normalize(pixels.float() / 255.0)
        return pixels.float()


def pixel_normalizer(reader: CacheReader, model: torch.nn.Module, device: torch.device) -> PixelNormalizer:
    """Stored pixels -> model input with the mean/std the vision weights expect (`model.image_mean`,
    `model.image_std`).

    Raises:
        CacheError: A float16 cache normalized otherwise (it cannot be re-normalized exactly).
    """
    want_mean, want_std = tuple(model.image_mean), tuple(model.image_std)
    norm = reader.normalization
    same = all(abs(a - b) < 1e-6 for a, b in zip((*norm.mean, *norm.std), (*want_mean, *want_std), strict=True))
    if not same and reader.pixel_dtype == "float16":
        raise CacheError(
            f"cache {reader.paths[0]} holds float16 pixels normalized with {norm.describe()}, but the vision "
            f"weights expect mean={want_mean} std={want_std}; rebuild it with that normalization or with "
            "--pixel-dtype uint8 (normalized on the device)"
        )
    if not same:
        log.warning(
            "uint8 cache records %s; normalizing with the model's mean=%s std=%s", norm.describe(), want_mean, want_std
        )
    return PixelNormalizer(want_mean, want_std, device)
