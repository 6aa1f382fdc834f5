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

Augmentation and pixel normalization live in `pixels.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ALIGNED",
    "NOT_ALIGNED",
    "IGNORE_INDEX",
    "SpecialTokens",
    "mask_tokens",
    "mismatch_captions",
    "mask_patches",
    "num_masked_patches",
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
