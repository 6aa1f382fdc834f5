"""The CPU half of fetch: bytes -> resized JPEG, run in worker processes (or threads).

Kept apart from the network code so worker processes import only what they need.
"""

from __future__ import annotations

from vilbert.pipeline.images import ImageDecodeError, encode_jpeg, load_resized

__all__ = ["decode_job", "init_worker"]


def init_worker() -> None:
    """Process initializer: one torch thread per worker process (the pool is the parallelism)."""
    import torch

    torch.set_num_threads(1)


def decode_job(data: bytes, size: int, mode: str, quality: int, max_pixels: int) -> tuple:
    """Decode, resize and re-encode one image.

    Returns:
        `("ok", jpeg, width, height, orig_width, orig_height)` or `("fail", reason, message)`.
    """
    try:  # load_resized's gate refuses bodies that are no image of an accepted format (`not-an-image`)
        image = load_resized(data, size=size, mode=mode, max_pixels=max_pixels)
    except ImageDecodeError as err:
        return ("fail", err.reason, str(err))
    pixels = image.pixels
    return ("ok", encode_jpeg(pixels, quality), pixels.shape[1], pixels.shape[0], image.orig_width, image.orig_height)
