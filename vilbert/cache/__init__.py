"""The cache: the on-disk contract between the pipeline (writer) and the trainer (reader, loader).

A cache is a directory of Arrow IPC shards (pixels, token ids, lengths, labels, captions), the
tokenizer it was built with and a manifest written last. See README.md beside this file and
`docs/cache-format.md`.
"""

from vilbert.cache.format import (
    FORMAT_VERSION,
    NORMALIZATIONS,
    Manifest,
    Normalization,
    ShardInfo,
    normalization,
    read_manifest,
)
from vilbert.cache.loader import Batch, BatchLoader
from vilbert.cache.reader import CacheReader
from vilbert.cache.sampler import EpochSampler
from vilbert.cache.verify import VerifyReport, verify_cache
from vilbert.cache.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "NORMALIZATIONS",
    "Normalization",
    "normalization",
    "Manifest",
    "ShardInfo",
    "read_manifest",
    "CacheWriter",
    "CacheReader",
    "EpochSampler",
    "Batch",
    "BatchLoader",
    "VerifyReport",
    "verify_cache",
]
