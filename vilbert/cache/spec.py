"""What a cache is built with: `CacheSpec`, the manifest's fields that the producer chooses.

`CacheWriter(path, spec)` writes a cache to this spec; the writer adds what it learns while writing
(shards, row counts, checksums, the time). A spec is checked when it is made, so a bad one fails
before any file is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vilbert.cache.format import CHANNELS, PIXEL_DTYPES, SPECIAL_TOKENS, Manifest, Normalization, sha256_bytes
from vilbert.cache.format import normalization as normalization_of
from vilbert.errors import UsageError

__all__ = ["CacheSpec"]

_STRING_ROW_ESTIMATE = 96
"""Bytes a key plus caption take on average; only sizes shards, so it must never depend on data."""


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """The settings of one cache (one split), as its manifest will record them.

    Raises:
        UsageError: a value outside its valid range, naming the value and the range.
    """

    split: str
    """Split name recorded in the manifest (`train`, `test`, `dev_seen`, ...); no `/`."""
    image_size: int
    """H = W of the stored images."""
    pixel_dtype: str
    """`float16` (normalized) or `uint8` (raw; the trainer normalizes on device)."""
    normalization: str | Normalization | Any
    """Preset name, `Normalization` or `(mean, std)`; for uint8 caches, what the consumer should apply."""
    max_len: int
    """Length every `input_ids` row is padded to."""
    tokenizer_json: str = field(repr=False)
    """The tokenizer's JSON text (`Tokenizer.to_str()`) or a path to the file."""
    special_token_ids: Mapping[str, int]
    """Ids of at least `pad`, `unk`, `cls`, `sep`, `mask`."""
    vocab_size: int
    has_labels: bool
    """Whether rows carry a label (and the `label` column exists)."""
    has_captions: bool = True
    """Whether rows carry their caption text (and the `caption` column exists)."""
    command: str
    """The command line that built the cache (provenance)."""
    target_shard_bytes: int = 256 << 20
    """Approximate shard size; rows per shard follow from it and the row size."""
    rows_per_shard: int | None = None
    """Exact rows per shard, overriding `target_shard_bytes` (tests, tuning); set from it when None."""
    tokenizer_bytes: bytes = field(init=False, repr=False, compare=False)
    """The bytes of `_tokenizer.json` as the cache stores them."""

    def __post_init__(self) -> None:
        _check(self)
        object.__setattr__(self, "normalization", normalization_of(self.normalization))
        object.__setattr__(self, "special_token_ids", {k: int(v) for k, v in self.special_token_ids.items()})
        object.__setattr__(self, "tokenizer_bytes", _tokenizer_bytes(self.tokenizer_json))
        if self.rows_per_shard is None:
            object.__setattr__(self, "rows_per_shard", _rows_per_shard(self))

    def manifest(self) -> Manifest:
        """The manifest to be: every setting, no shards yet."""
        assert self.rows_per_shard is not None
        return Manifest(
            split=self.split,
            num_rows=0,
            image_size=self.image_size,
            pixel_dtype=self.pixel_dtype,
            normalization=self.normalization,
            tokenizer_fingerprint=sha256_bytes(self.tokenizer_bytes),
            vocab_size=int(self.vocab_size),
            special_token_ids=dict(self.special_token_ids),
            max_len=self.max_len,
            has_labels=self.has_labels,
            has_captions=self.has_captions,
            shards=(),
            command=self.command,
            rows_per_shard=self.rows_per_shard,
        )


def _check(spec: CacheSpec) -> None:
    if not spec.split or "/" in spec.split:
        raise UsageError(f"split must be a non-empty name without '/', got {spec.split!r}")
    if spec.pixel_dtype not in PIXEL_DTYPES:
        raise UsageError(f"unknown pixel_dtype {spec.pixel_dtype!r}; valid: {', '.join(PIXEL_DTYPES)}")
    for name in ("image_size", "max_len", "vocab_size", "target_shard_bytes"):
        if int(getattr(spec, name)) <= 0:
            raise UsageError(f"{name} must be > 0, got {getattr(spec, name)}")
    if spec.rows_per_shard is not None and spec.rows_per_shard <= 0:
        raise UsageError(f"rows_per_shard must be > 0, got {spec.rows_per_shard}")
    missing = [t for t in SPECIAL_TOKENS if t not in spec.special_token_ids]
    if missing:
        raise UsageError(f"special_token_ids lacks {', '.join(missing)}; needed: {', '.join(SPECIAL_TOKENS)}")
    bad = {k: v for k, v in spec.special_token_ids.items() if not 0 <= int(v) < spec.vocab_size}
    if bad:
        raise UsageError(f"special_token_ids {bad} outside the vocabulary [0, {spec.vocab_size})")


def _rows_per_shard(spec: CacheSpec) -> int:
    row = CHANNELS * spec.image_size * spec.image_size * np.dtype(spec.pixel_dtype).itemsize
    row += 4 * spec.max_len + 4 + (8 if spec.has_labels else 0) + _STRING_ROW_ESTIMATE
    return max(1, spec.target_shard_bytes // row)


def _tokenizer_bytes(tokenizer_json: str) -> bytes:
    text = tokenizer_json.lstrip()
    if text.startswith("{"):
        return tokenizer_json.encode("utf-8")
    path = Path(tokenizer_json)
    if not path.is_file():
        raise UsageError(f"tokenizer_json is neither JSON text nor an existing file: {tokenizer_json[:80]!r}")
    return path.read_bytes()
