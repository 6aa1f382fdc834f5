"""The decode pool's pixel store: the paired lookup gives the per-pixel table's bits exactly."""

from __future__ import annotations

import numpy as np
import pytest

from vilbert.cache import normalization
from vilbert.pipeline._decode_pool import PixelStore, normalization_lut


@pytest.mark.parametrize("size", [224, 15])  # an odd H*W has no whole pixel pairs: per-pixel lookups
@pytest.mark.parametrize("preset", ["half", "imagenet"])
def test_paired_lookup_equals_the_per_pixel_table(size: int, preset: str) -> None:
    norm = normalization(preset)
    lut = normalization_lut(norm.mean, norm.std)
    rgb = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [0, 255, 128]]
    out = np.empty((3, size, size), np.float16)
    PixelStore(lut)(rgb, out)
    expected = np.stack([lut[c][rgb[:, :, c]] for c in range(3)])
    assert out.tobytes() == expected.tobytes()


def test_uint8_store_is_a_transpose() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = np.empty((3, 8, 8), np.uint8)
    PixelStore(None)(rgb, out)
    assert np.array_equal(out, rgb.transpose(2, 0, 1))
