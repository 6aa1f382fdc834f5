"""Fixtures for the trainer's tests: a cache of synthetic scenes, built directly with `CacheWriter`.

The scenes and captions come from the synthetic corpus's own generator (`random_shapes`,
`render_scene`, `describe`), rendered straight at the tiny preset's 64x64 instead of as large JPEG/PNG
files that are decoded and resized again: the same kind of data at a fraction of the cost, so the
learning test spends its minutes on training. The tokenizer is a WordPiece trained on the captions.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from vilbert.cache import CacheWriter
from vilbert.pipeline.synthetic.captions import describe
from vilbert.pipeline.synthetic.scenes import random_shapes, render_scene
from vilbert.pipeline.text import CaptionEncoder, train_wordpiece

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def render_samples(n: int, seed: int, size: int) -> tuple[list[str], np.ndarray, list[str]]:
    """`n` (key, CHW uint8 image, caption) of one to three shapes each."""
    keys, images, captions = [], np.empty((n, 3, size, size), np.uint8), []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        shapes = random_shapes(rng, int(rng.choice([1, 2, 2, 3])))
        pixels, placed = render_scene(rng, size, size, shapes)
        images[i] = np.asarray(pixels).transpose(2, 0, 1)  # HWC -> CHW (an array or a PIL image)
        captions.append(describe(placed, rng))
        keys.append(f"{seed}-{i:06d}")
    return keys, images, captions


def build_synthetic_cache(
    root: Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    max_len: int = 32,
    test_fraction: float = 0.2,
    pixel_dtype: str = "uint8",
    normalization: str = "half",
) -> Path:
    """`root/train` and `root/test` caches (split by key hash) of `n` synthetic scenes."""
    keys, images, captions = render_samples(n, seed, size)
    encoder = CaptionEncoder(train_wordpiece(captions, vocab_size=256, min_frequency=1), max_len=max_len)
    ids, lengths = encoder(captions)
    is_test = np.array([int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 2**32 < test_fraction for k in keys])
    if pixel_dtype == "float16":
        pixels = ((images / 255.0 - 0.5) / 0.5).astype(np.float16)
        if normalization == "imagenet":
            mean = np.array([0.485, 0.456, 0.406])[:, None, None]
            std = np.array([0.229, 0.224, 0.225])[:, None, None]
            pixels = ((images / 255.0 - mean) / std).astype(np.float16)
    else:
        pixels = images
    for split, rows in (("train", ~is_test), ("test", is_test)):
        index = np.flatnonzero(rows)
        with CacheWriter(
            root / split,
            encoder.cache_spec(
                split=split,
                image_size=size,
                pixel_dtype=pixel_dtype,
                normalization=normalization,
                has_labels=False,
                command="tests/train/conftest.py",
            ),
        ) as writer:
            writer.write(
                [keys[i] for i in index], pixels[index], ids[index], lengths[index], None, [captions[i] for i in index]
            )
    return root


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~250 train / ~60 test synthetic samples, uint8, 64x64."""
    return build_synthetic_cache(tmp_path_factory.mktemp("small-cache"), 320, seed=11)


@pytest.fixture
def one_thread():
    """Torch on one thread: on 2 cores shared with other jobs, a second intra-op thread mostly spins
    (here: 3x the CPU time for the same steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `vilbert` subprocesses: this venv first, one thread per process, unbuffered."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~48 train / ~12 test samples: a few batches per epoch, for loop mechanics."""
    return build_synthetic_cache(tmp_path_factory.mktemp("tiny-cache"), 60, seed=5)


@pytest.fixture(scope="session")
def cache_builder():
    """`build_synthetic_cache` for tests that need a cache of their own."""
    return build_synthetic_cache
