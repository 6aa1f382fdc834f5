"""Labelled caches of the synthetic memes task for the downstream tests (finetune, evaluate, analyse).

Built with the real pipeline (`generate_memes` -> `preprocess` with a WordPiece tokenizer trained on the
memes' texts), at the tiny preset's 64x64, in process (no decode workers) because the sets are small.
"""

from __future__ import annotations

from pathlib import Path

from vilbert.pipeline.preprocess import PreprocessOptions, preprocess
from vilbert.pipeline.sources import HatefulMemesSource, iter_captions
from vilbert.pipeline.synthetic import generate_memes
from vilbert.pipeline.text import train_wordpiece


def build_memes_cache(root: Path, n: int, *, seed: int = 0, max_len: int = 32) -> Path:
    """`root/cache/{train,dev_seen,test_seen}` of about `n` synthetic memes; returns `root/cache`."""
    memes = generate_memes(root / "memes", n, seed)
    tokenizer = train_wordpiece(iter_captions([memes]), 256, min_frequency=1)
    options = PreprocessOptions(image_size=64, pixel_dtype="uint8", max_len=max_len, workers=0)
    preprocess(HatefulMemesSource(memes), root / "cache", tokenizer, options, command="tests/train")
    return root / "cache"


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
            split=split,
            image_size=64,
            pixel_dtype="uint8",
            normalization="half",
            max_len=max_len,
            tokenizer_json=encoder.tokenizer_json,
            special_token_ids=encoder.special_ids,
            vocab_size=encoder.vocab_size,
            has_labels=True,
            command="tests/train/downstream_data.py",
        ) as writer:
            writer.write(keys, images, ids, lengths, labels, caps)
    return root
