"""Format pieces: normalization presets and parsing, the manifest round trip, malformed manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vilbert.cache import NORMALIZATIONS, Manifest, Normalization, normalization, read_manifest
from vilbert.errors import CacheError, UsageError


def test_normalization_presets_and_parsing():
    assert set(NORMALIZATIONS) == {"imagenet", "half", "clip"}
    assert normalization("imagenet").mean == (0.485, 0.456, 0.406)
    assert normalization(((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))).name == "half"  # recognised by value
    custom = normalization({"name": "mine", "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})
    assert custom == Normalization("mine", (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert custom.matches(Normalization("other", [0.1, 0.2, 0.3], [1, 1, 1]))
    with pytest.raises(UsageError, match="unknown normalization 'vit'; valid: imagenet, half, clip"):
        normalization("vit")
    with pytest.raises(UsageError, match="std must be > 0"):
        Normalization("bad", (0, 0, 0), (1, 0, 1))
    with pytest.raises(UsageError, match="mean and std need 3 values"):
        Normalization("bad", (0, 0), (1, 1))


def test_normalization_lut_is_exact():
    norm = normalization("clip")
    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3).transpose(2, 0, 1)[None]  # [1,3,1,256]
    got = norm.apply(np.ascontiguousarray(pixels))
    for c in range(3):
        expected = ((np.arange(256) / 255.0 - norm.mean[c]) / norm.std[c]).astype(np.float16)
        assert got[0, c, 0].tobytes() == expected.tobytes()


def test_manifest_round_trip_and_malformed_manifests(cache_f16):
    path, _ = cache_f16
    manifest = read_manifest(path)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    data = manifest.to_dict()
    del data["shards"][0]["checksum"]
    (path / "_manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"_manifest.json: malformed manifest \(TypeError"):
        read_manifest(path)
    (path / "_manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="unreadable manifest"):
        read_manifest(path)
