"""Labelled caches for the downstream tests (finetune, evaluate): rendered 64x64 scenes with random
labels, written straight with `CacheWriter`, for the mechanics. The chain test in `test_ablate.py`
builds the real synthetic corpus and memes with the pipeline instead."""

from __future__ import annotations

from pathlib import Path

from vilbert.pipeline.text import train_wordpiece


def build_labelled_cache(root: Path, sizes: dict[str, int], *, seed: int = 0, max_len: int = 32) -> Path:
    """Fast labelled caches `root/<split>` of rendered 64x64 scenes with random 0/1 labels (for the
    mechanics of fine-tuning and evaluation, not for learning)."""
    import numpy as np

    from vilbert.cache import CacheWriter
    from vilbert.pipeline.text import CaptionEncoder

    from .conftest import render_samples

    data = {split: render_samples(n, seed + i, 64) for i, (split, n) in enumerate(sizes.items())}
    captions = [c for _, _, caps in data.values() for c in caps]
    encoder = CaptionEncoder(train_wordpiece(captions, vocab_size=256, min_frequency=1), max_len=max_len)
    rng = np.random.default_rng(seed)
    for split, (keys, images, caps) in data.items():
        ids, lengths = encoder(caps)
        labels = rng.integers(0, 2, len(keys)).astype(np.int64)
        with CacheWriter(
            root / split,
            encoder.cache_spec(
                split=split,
                image_size=64,
                pixel_dtype="uint8",
                normalization="half",
                has_labels=True,
                command="tests/train/downstream_data.py",
            ),
        ) as writer:
            writer.write(keys, images, ids, lengths, labels, caps)
    return root
