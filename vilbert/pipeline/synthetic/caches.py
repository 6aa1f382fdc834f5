"""Caches of synthetic scenes, the one builder the demo, `vilbert ablate --quick` and the tests use.

Two routes, for two needs:

    prepare_synthetic: generate_corpus + generate_memes (JPEG/PNG files) -> WordPiece -> preprocess
        -> corpus cache root (train/, test/) and memes cache root (train/, dev_seen/, test_seen/):
        the real pipeline, for runs whose figures are about the chain.
    scene_caches: scenes rendered straight at the cache's size -> CacheWriter
        -> root/<split>: the same kind of data at a fraction of the cost, for the trainer's tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from vilbert.cache import CacheWriter, is_cache
from vilbert.pipeline.synthetic.captions import describe
from vilbert.pipeline.synthetic.corpus import generate_corpus
from vilbert.pipeline.synthetic.memes import generate_memes
from vilbert.pipeline.synthetic.scenes import random_shapes, render_scene
from vilbert.pipeline.text import CaptionEncoder, load_tokenizer, train_wordpiece

__all__ = ["TOKENIZER_VOCAB", "generate_synthetic", "prepare_synthetic", "render_samples", "scene_caches"]

TOKENIZER_VOCAB = 512
"""Enough for every word of the synthetic captions and claims, with room for sub-words."""
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])[:, None, None]
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])[:, None, None]


def generate_synthetic(work: Path, *, corpus: int, memes: int, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic corpus (`work/corpus`) and memes (`work/memes`) as image files; each is generated
    only when missing, so a second call reuses them."""
    corpus_dir, memes_dir = Path(work) / "corpus", Path(work) / "memes"
    if not (corpus_dir / "corpus.jsonl").is_file():
        generate_corpus(corpus_dir, corpus, seed, overwrite=True)
    if not (memes_dir / "synth.jsonl").is_file():
        generate_memes(memes_dir, memes, seed, overwrite=True)
    return corpus_dir, memes_dir


def prepare_synthetic(
    work: Path,
    *,
    corpus: int,
    memes: int,
    seed: int = 0,
    image_size: int = 64,
    max_len: int = 32,
    workers: int | None = None,
) -> tuple[Path, Path]:
    """Generate (or reuse) the synthetic corpus and memes under `work` and cache them with the pipeline.

    Returns:
        The corpus cache root (`train/`, `test/`) and the memes cache root (`train/`, `dev_seen/`, `test_seen/`).
    """
    from vilbert.pipeline.preprocess import PreprocessOptions, preprocess
    from vilbert.pipeline.sources import FolderSource, HatefulMemesSource, iter_captions

    work = Path(work)
    corpus_dir, memes_dir = generate_synthetic(work, corpus=corpus, memes=memes, seed=seed)
    caches = work / "caches"
    tokenizer_path = work / "tokenizer.json"
    if not tokenizer_path.is_file():
        captions = iter_captions([corpus_dir / "corpus.jsonl", memes_dir])
        train_wordpiece(captions, TOKENIZER_VOCAB, min_frequency=1).save(str(tokenizer_path))
    tokenizer = load_tokenizer(tokenizer_path)
    options = PreprocessOptions(
        image_size=image_size, pixel_dtype="uint8", max_len=max_len, workers=workers, mode="overwrite"
    )
    sources = {
        "corpus": lambda: FolderSource(corpus_dir / "images", corpus_dir / "corpus.jsonl"),
        "memes": lambda: HatefulMemesSource(memes_dir),
    }
    for name, source in sources.items():
        if not is_cache(caches / name / "train"):
            preprocess(source(), caches / name, tokenizer, options, command=f"prepare_synthetic ({name})")
    return caches / "corpus", caches / "memes"


def render_samples(n: int, seed: int, size: int) -> tuple[list[str], np.ndarray, list[str]]:
    """`n` (key, CHW uint8 image, caption) of one to three shapes each, rendered at `size` px."""
    keys, images, captions = [], np.empty((n, 3, size, size), np.uint8), []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        shapes = random_shapes(rng, int(rng.choice([1, 2, 2, 3])))
        pixels, placed = render_scene(rng, size, size, shapes)
        images[i] = np.asarray(pixels).transpose(2, 0, 1)  # HWC -> CHW (an array or a PIL image)
        captions.append(describe(placed, rng))
        keys.append(f"{seed}-{i:06d}")
    return keys, images, captions


def scene_caches(
    root: Path,
    n: int | dict[str, int],
    *,
    seed: int = 0,
    size: int = 64,
    max_len: int = 32,
    test_fraction: float = 0.2,
    pixel_dtype: str = "uint8",
    normalization: str = "half",
    labelled: bool = False,
) -> Path:
    """Caches `root/<split>` of rendered scenes, with a WordPiece tokenizer trained on their captions.

    Args:
        n: A number of scenes, split into `train` and `test` by key hash (`test_fraction`), or
            `{split: scenes}` (split `i` drawn with seed `seed + i`).
        pixel_dtype: `uint8`, or `float16` normalized by `normalization` (`half` or `imagenet`).
        labelled: Add random 0/1 labels (for the mechanics of fine-tuning, not for learning).
    """
    splits = _split_samples(n, seed, size, test_fraction)
    captions = [c for _, _, caps in splits.values() for c in caps]
    encoder = CaptionEncoder(train_wordpiece(captions, vocab_size=256, min_frequency=1), max_len=max_len)
    rng = np.random.default_rng(seed)
    for split, (keys, images, caps) in splits.items():
        ids, lengths = encoder(caps)
        labels = rng.integers(0, 2, len(keys)).astype(np.int64) if labelled else None
        spec = encoder.cache_spec(
            split=split,
            image_size=size,
            pixel_dtype=pixel_dtype,
            normalization=normalization,
            has_labels=labelled,
            command="vilbert.pipeline.synthetic.caches.scene_caches",
        )
        with CacheWriter(Path(root) / split, spec) as writer:
            writer.write(keys, _stored_pixels(images, pixel_dtype, normalization), ids, lengths, labels, caps)
    return Path(root)


def _split_samples(
    n: int | dict[str, int], seed: int, size: int, test_fraction: float
) -> dict[str, tuple[list[str], np.ndarray, list[str]]]:
    if isinstance(n, dict):
        return {split: render_samples(count, seed + i, size) for i, (split, count) in enumerate(n.items())}
    keys, images, captions = render_samples(n, seed, size)
    is_test = np.array([int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 2**32 < test_fraction for k in keys])
    splits = {}
    for split, rows in (("train", ~is_test), ("test", is_test)):
        index = np.flatnonzero(rows)
        splits[split] = ([keys[i] for i in index], images[index], [captions[i] for i in index])
    return splits


def _stored_pixels(images: np.ndarray, pixel_dtype: str, normalization: str) -> np.ndarray:
    if pixel_dtype == "uint8":
        return images
    if normalization == "imagenet":
        return ((images / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD).astype(np.float16)
    return ((images / 255.0 - 0.5) / 0.5).astype(np.float16)
