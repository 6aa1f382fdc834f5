"""The pretraining tasks' inputs, built on the device from a plain batch.

Pure functions of tensors and a `torch.Generator`: the same generator state gives the same masks on
any run, which is what makes a resumed run exact (the generator's state is checkpointed).

- **MLM** (BERT, Devlin et al. 2019): 15% of the real tokens are selected, never [CLS], [SEP] or
  [PAD]; of the selected, 80% become [MASK], 10% a random token, 10% stay unchanged. Labels are the
  original ids at selected positions and -100 (ignored by the loss) elsewhere.
- **AP** (alignment prediction, ViLBERT): exactly half of a batch (floor(B/2) rows) gets another
  sample's caption. The donor is given by a random cyclic permutation (a derangement), so a row never
  receives its own caption. Label 1 = aligned, 0 = not aligned.
- **MIM** (contrastive masked image modelling): exactly `round(ratio * P)` of an image's P patches
  are masked, chosen uniformly per image.
- **Augmentation** (optional): random resized crop, horizontal flip and colour jitter (brightness,
  contrast, saturation; no hue, which would change the colour words of a caption), per sample and
  vectorized, on images in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ALIGNED",
    "NOT_ALIGNED",
    "IGNORE_INDEX",
    "SpecialTokens",
    "mask_tokens",
    "mismatch_captions",
    "mask_patches",
    "num_masked_patches",
    "augment_images",
    "PixelNormalizer",
]

ALIGNED = 1
NOT_ALIGNED = 0
IGNORE_INDEX = -100
"""The label `F.cross_entropy` ignores: every position that was not selected for MLM."""


@dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """The tokenizer's special token ids (a cache manifest's `special_token_ids`)."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_dict(cls, ids: dict[str, int]) -> SpecialTokens:
        """From a manifest's `{"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}`."""
        missing = [name for name in ("pad", "unk", "cls", "sep", "mask") if name not in ids]
        if missing:
            raise ValueError(f"special token ids lack {', '.join(missing)}; got {sorted(ids)}")
        return cls(**{name: int(ids[name]) for name in ("pad", "unk", "cls", "sep", "mask")})

    @property
    def all_ids(self) -> tuple[int, ...]:
        return tuple(sorted({self.pad, self.unk, self.cls, self.sep, self.mask}))


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    special: SpecialTokens,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked language modelling corruption.

    Each real token (not [CLS], [SEP] or [PAD]) is selected independently with `probability`; a
    selected token becomes [MASK] with `mask_fraction`, a random non-special token with
    `random_fraction`, and stays itself otherwise.

    Args:
        input_ids: `(B, T)` integer token ids, padded with `special.pad`.
        special: The tokenizer's special ids.
        vocab_size: Random replacements are drawn uniformly from the non-special ids below this.
        generator: On the device of `input_ids`.
        probability: Fraction of real tokens selected (BERT: 0.15).
        mask_fraction: Of the selected, the fraction replaced by [MASK] (BERT: 0.8).
        random_fraction: Of the selected, the fraction replaced by a random token (BERT: 0.1).

    Returns:
        `(masked_ids, labels)`: int64 `(B, T)`; labels hold the original id at selected positions and
        `IGNORE_INDEX` elsewhere.
    """
    ids = input_ids.long()
    real = (ids != special.pad) & (ids != special.cls) & (ids != special.sep)
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    selected = real & (draw < probability)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    # A second uniform decides what a selected token becomes: [0, .8) mask, [.8, .9) random, rest kept.
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_ids = _random_regular_ids(ids.shape, special, vocab_size, generator, ids.device)
    masked = torch.where(to_mask, torch.full_like(ids, special.mask), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def _random_regular_ids(
    shape: torch.Size, special: SpecialTokens, vocab_size: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Uniform ids in [0, vocab_size) that skip the special ids."""
    specials = [s for s in special.all_ids if s < vocab_size]
    if vocab_size - len(specials) < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no regular token besides the special ids {specials}")
    ids = torch.randint(0, vocab_size - len(specials), shape, generator=generator, device=device)
    for s in specials:  # ascending: shift every id at or above a special one step up
        ids = ids + (ids >= s).long()
    return ids


def mismatch_captions(
    batch_size: int, *, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which caption each row of a batch gets for alignment prediction.

    Exactly `batch_size // 2` rows, chosen uniformly, get the caption of another row; the donor of
    row i is `sigma(i)` for a uniformly random cyclic permutation `sigma` (a derangement: never i).

    Returns:
        `(source, aligned)`: `source[i]` is the row whose caption row i gets (int64 `(B,)`), and
        `aligned[i]` is `ALIGNED` (1) where `source[i] == i`, else `NOT_ALIGNED` (0).
    """
    if batch_size < 2:
        raise ValueError(f"alignment prediction needs a batch of at least 2 rows, got {batch_size}")
    order = torch.randperm(batch_size, generator=generator, device=device)
    cycle = torch.empty_like(order)
    cycle[order] = torch.roll(order, shifts=-1)  # order[k] -> order[k+1]: one cycle through all rows
    chosen = torch.randperm(batch_size, generator=generator, device=device)[: batch_size // 2]
    source = torch.arange(batch_size, device=device)
    source[chosen] = cycle[chosen]
    aligned = (source == torch.arange(batch_size, device=device)).long()
    return source, aligned


def num_masked_patches(num_patches: int, ratio: float) -> int:
    """`round(ratio * P)`, kept within [1, P - 1] so both views have something to compare."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} is invalid; valid: 0 < ratio < 1")
    return min(max(round(ratio * num_patches), 1), num_patches - 1)


def mask_patches(
    batch_size: int, num_patches: int, ratio: float, *, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A `(B, P)` bool mask with exactly `num_masked_patches(P, ratio)` True per row, uniform per image."""
    k = num_masked_patches(num_patches, ratio)
    noise = torch.rand((batch_size, num_patches), generator=generator, device=device)
    chosen = noise.argsort(dim=1)[:, :k]  # (B, k) the k smallest draws: a uniform k-subset
    mask = torch.zeros((batch_size, num_patches), dtype=torch.bool, device=device)
    return mask.scatter_(1, chosen, True)


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
