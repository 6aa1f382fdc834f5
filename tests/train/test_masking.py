"""Statistics of the on-device task inputs, over enough draws to pin the paper's numbers."""

from __future__ import annotations

import pytest
import torch

from vilbert.train.masking import (
    ALIGNED,
    IGNORE_INDEX,
    NOT_ALIGNED,
    SpecialTokens,
    mask_patches,
    mask_tokens,
    mismatch_captions,
    num_masked_patches,
)

SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
VOCAB = 50


def _batch(rows: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """[CLS] words [SEP] [PAD]... with random lengths, words drawn from the regular ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (rows,), generator=g)
    ids = torch.randint(5, VOCAB, (rows, max_len), generator=g)
    pos = torch.arange(max_len)
    ids[:, 0] = SPECIAL.cls
    ids[pos.unsqueeze(0) == (lengths - 1).unsqueeze(1)] = SPECIAL.sep
    ids[pos.unsqueeze(0) >= lengths.unsqueeze(1)] = SPECIAL.pad
    return ids


def test_mlm_statistics_over_100k_tokens() -> None:
    ids = _batch(8000, 36)
    real = (ids != SPECIAL.pad) & (ids != SPECIAL.cls) & (ids != SPECIAL.sep)
    assert real.sum() >= 100_000
    masked, labels = mask_tokens(ids, special=SPECIAL, vocab_size=VOCAB, generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert not (selected & ~real).any(), "selected a [CLS], [SEP] or [PAD]"
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected]), "a position that was not selected changed"
    fraction = selected.sum().item() / real.sum().item()
    assert abs(fraction - 0.15) <= 0.005, fraction

    n = selected.sum().item()
    became_mask = (masked[selected] == SPECIAL.mask).sum().item() / n
    unchanged = (masked[selected] == ids[selected]).sum().item() / n
    # A random replacement hits the original id with probability 1/45: count it as "random" by expectation.
    random_like = 1.0 - became_mask - unchanged
    assert abs(became_mask - 0.8) <= 0.01, became_mask
    assert abs(unchanged - (0.1 + 0.1 / (VOCAB - 5))) <= 0.01, unchanged
    assert abs(random_like - 0.1 * (1 - 1 / (VOCAB - 5))) <= 0.01, random_like
    replaced = masked[selected & (masked != SPECIAL.mask) & (masked != ids)]
    assert replaced.numel() > 0 and replaced.min() >= 5, "a random replacement was a special id"


def test_mlm_is_a_function_of_the_generator_state() -> None:
    ids = _batch(64, 20)
    a = mask_tokens(ids, special=SPECIAL, vocab_size=VOCAB, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special=SPECIAL, vocab_size=VOCAB, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(ids, special=SPECIAL, vocab_size=VOCAB, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_random_replacements_cover_all_regular_ids_and_skip_specials() -> None:
    special = SpecialTokens(pad=0, unk=7, cls=8, sep=9, mask=20)
    ids = torch.full((4000, 30), 30)
    masked, labels = mask_tokens(
        ids,
        special=special,
        vocab_size=25,
        generator=torch.Generator().manual_seed(0),
        mask_fraction=0.0,
        random_fraction=1.0,
        probability=0.9,
    )
    seen = set(masked[labels != IGNORE_INDEX].tolist())
    assert seen == set(range(25)) - {0, 7, 8, 9, 20}


@pytest.mark.parametrize("batch_size", [2, 3, 8, 33, 64])
def test_ap_exactly_half_mismatched_never_self(batch_size: int) -> None:
    g = torch.Generator().manual_seed(batch_size)
    donors_seen = set()
    for _ in range(200):
        source, aligned = mismatch_captions(batch_size, generator=g)
        rows = torch.arange(batch_size)
        assert (aligned == NOT_ALIGNED).sum().item() == batch_size // 2
        assert torch.equal(aligned == ALIGNED, source == rows)
        assert not (source[aligned == NOT_ALIGNED] == rows[aligned == NOT_ALIGNED]).any()
        donors_seen.update(zip(rows[aligned == 0].tolist(), source[aligned == 0].tolist(), strict=True))
    if batch_size <= 8:  # every (row, other row) pair occurs: the donor is uniform over the others
        assert len(donors_seen) == batch_size * (batch_size - 1)


def test_ap_needs_two_rows() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mismatch_captions(1, generator=torch.Generator())


@pytest.mark.parametrize(("patches", "ratio"), [(64, 0.4), (196, 0.4), (196, 0.75), (4, 0.01), (4, 0.99)])
def test_mim_exact_ratio_per_image(patches: int, ratio: float) -> None:
    mask = mask_patches(500, patches, ratio, generator=torch.Generator().manual_seed(0))
    k = num_masked_patches(patches, ratio)
    assert k == min(max(round(ratio * patches), 1), patches - 1)
    assert mask.dtype == torch.bool and mask.shape == (500, patches)
    assert (mask.sum(dim=1) == k).all()
    # Uniform over positions: each patch is masked in about k/P of the images.
    per_patch = mask.float().mean(dim=0)
    assert (per_patch - k / patches).abs().max() < 0.1
