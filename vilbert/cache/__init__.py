"""The cache: the on-disk contract between the pipeline (writer) and the trainer (reader, loader).

A cache is a directory of Arrow IPC shards (pixels, token ids, lengths, labels, captions), the
tokenizer it was built with (`_tokenizer.json`) and a manifest written last (`_manifest.json`).
See README.md beside this file and `docs/cache-format.md`.
"""

from typing import TYPE_CHECKING

from vilbert.cache.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    NORMALIZATIONS,
    TOKENIZER_NAME,
    Manifest,
    Normalization,
    ShardInfo,
    is_cache,
    normalization,
    read_manifest,
)
from vilbert.cache.reader import CacheReader
from vilbert.cache.sampler import EpochSampler
from vilbert.cache.spec import CacheSpec
from vilbert.cache.verify import VerifyReport, verify_cache
from vilbert.cache.writer import CacheWriter

if TYPE_CHECKING:
    from vilbert.cache.dataset import CacheDataset
    from vilbert.cache.loader import Batch, BatchLoader

_LAZY = {
    "Batch": "vilbert.cache.loader",
    "BatchLoader": "vilbert.cache.loader",
    "CacheDataset": "vilbert.cache.dataset",
}


def __getattr__(name: str):
    # The loader and the dataset need torch (seconds to import); the CLI and the writer should not pay for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vilbert.cache' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "NORMALIZATIONS",
    "Normalization",
    "normalization",
    "Manifest",
    "ShardInfo",
    "read_manifest",
    "is_cache",
    "CacheSpec",
    "CacheWriter",
    "CacheReader",
    "EpochSampler",
    "Batch",
    "BatchLoader",
    "CacheDataset",
    "VerifyReport",
    "verify_cache",
]
