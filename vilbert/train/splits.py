"""Opening a cache root's splits, and fitting a run's config to the cache it reads.

    DATA/            a cache root: DATA/train, DATA/test, DATA/dev_seen, ... (each a cache)
    open_split(DATA, split) -> CacheReader, or None for a missing split other than train
    fit_config_to_cache(config, reader) -> the config with the cache tokenizer's vocabulary

Every check here refuses with a `CacheError` naming the cache and what would fit.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from vilbert.cache import MANIFEST_NAME, CacheReader, is_cache, verify_cache
from vilbert.config import Config
from vilbert.errors import CacheError

__all__ = ["open_split", "open_cache", "fit_config_to_cache", "require_labels", "check_same_tokenizer"]

log = logging.getLogger(__name__)


def open_split(data: Path, split: str, *, verify: bool = False, num_labels: int | None = None) -> CacheReader | None:
    """`data/split` as a cache, `data` itself for `train` when it is a cache, or None when missing.

    `verify` checks every shard first (`verify_cache`: checksums, values, keys) and refuses a corrupt
    cache; `num_labels` bounds the labels the reader hands out (it range-checks every batch anyway).
    """
    data = Path(data)
    if is_cache(data / split):
        path = data / split
    elif split == "train" and is_cache(data):
        path = data
    elif split == "train":
        raise CacheError(f"no cache at {data}/train (nor {data} itself); build one with `vilbert preprocess`")
    else:
        return None
    if verify:
        verify_cache(path).raise_if_bad()
    return CacheReader(path, num_labels=num_labels)


def open_cache(path: str | Path) -> CacheReader:
    """One cache directory; a cache *root* gets an error naming the splits inside it.

    Raises:
        CacheError: `path` is not a cache.
    """
    path = Path(path)
    if is_cache(path):
        return CacheReader(path)
    splits = sorted(p.name for p in path.iterdir() if is_cache(p)) if path.is_dir() else []
    hint = f"; it holds the caches {', '.join(splits)}: pass one, e.g. {path / splits[0]}" if splits else ""
    raise CacheError(f"{path} is not a cache directory (no {MANIFEST_NAME}){hint}")


def fit_config_to_cache(config: Config, reader: CacheReader) -> Config:
    """The config with the text vocabulary of the cache's tokenizer; refuses caches that cannot fit
    (another image size, longer captions than the position table, another pretrained tokenizer)."""
    manifest = reader.manifest
    text = config.model.text
    if reader.image_size != config.model.vision.image_size:
        raise CacheError(
            f"cache {reader.paths[0]} holds {reader.image_size}px images, the model expects "
            f"model.vision.image_size={config.model.vision.image_size}; rebuild the cache or set it to match"
        )
    if reader.max_len > text.max_position_embeddings:
        raise CacheError(
            f"cache max_len={reader.max_len} exceeds model.text.max_position_embeddings={text.max_position_embeddings}"
        )
    pad = int(manifest.special_token_ids["pad"])
    if text.vocab_size == manifest.vocab_size and text.pad_token_id == pad:
        return config
    if text.pretrained is not None:
        raise CacheError(
            f"cache tokenizer has {manifest.vocab_size} tokens (pad={pad}) but the pretrained text stream "
            f"{text.pretrained} has {text.vocab_size} (pad={text.pad_token_id}); build the cache with its tokenizer"
        )
    log.info("text vocabulary from the cache's tokenizer: %d tokens (pad id %d)", manifest.vocab_size, pad)
    text = dataclasses.replace(text, vocab_size=manifest.vocab_size, pad_token_id=pad)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, text=text))


def require_labels(reader: CacheReader | None, what: str) -> CacheReader | None:
    """`reader` (or None), refusing a cache without labels."""
    if reader is not None and not reader.has_labels:
        raise CacheError(
            f"{reader.paths[0]} ({what}) has no labels; fine-tuning needs a labelled cache "
            "(e.g. `vilbert preprocess --format hateful-memes`)"
        )
    return reader


def check_same_tokenizer(readers: list[CacheReader]) -> None:
    """Refuse splits built with different tokenizers (their ids would mean different words)."""
    first = readers[0]
    for other in readers[1:]:
        if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise CacheError(f"{other.paths[0]} was built with another tokenizer than {first.paths[0]}")
