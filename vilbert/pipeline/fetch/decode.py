"""The CPU half of fetch: bytes -> resized JPEG, run in worker processes (or threads).

Kept apart from the network code so worker processes import only what they need.
"""

from __future__ import annotations

from vilbert.pipeline.images import ImageDecodeError, encode_jpeg, load_resized

__all__ = ["decode_job", "init_worker", "looks_like_image"]

# Leading bytes of the formats PIL can decode that the web serves; anything else is "not-an-image".
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(data: bytes) -> bool:
    """Whether `data` starts like an image file (HTML error pages and empty bodies do not)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return True
    return data.startswith(_MAGIC)


def init_worker() -> None:
    """Process initializer: one torch thread per worker process (the pool is the parallelism)."""
    import torch

    torch.set_num_threads(1)


def decode_job(data: bytes, size: int, mode: str, quality: int, max_pixels: int) -> tuple:
    """Decode, resize and re-encode one image.

    Returns:
        `("ok", jpeg, width, height, orig_width, orig_height)` or `("fail", reason, message)`.
    """
    if not looks_like_image(data):
        head = data[:40].decode("latin-1").encode("unicode_escape").decode()
        return ("fail", "not-an-image", f"body is not an image ({len(data)} bytes starting {head!r})")
    try:
        image = load_resized(data, size=size, mode=mode, max_pixels=max_pixels)
    except ImageDecodeError as err:
        return ("fail", err.reason, str(err))
    pixels = image.pixels
    return ("ok", encode_jpeg(pixels, quality), pixels.shape[1], pixels.shape[0], image.orig_width, image.orig_height)
