"""`vilbert.pipeline.images`: decode + resize against an independent PIL reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from vilbert.errors import DataError
from vilbert.pipeline.images import (
    IMAGE_FORMATS,
    RESIZE_MODES,
    ImageDecodeError,
    decode_resize,
    encode_jpeg,
    image_format,
    jpeg_orientation,
    jpeg_output_buffer,
    load_resized,
)

TOLERANCE = 3.0
"""Mean absolute difference (0-255) allowed against the reference; JPEG re-encoding alone is ~1."""


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image with a bright marker in the top-left corner."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6)
        channels.append(127 + 100 * np.sin(fx * x / width * 6.28 + phase) * np.cos(fy * y / height * 6.28))
    rgb = np.stack(channels, axis=-1)
    rgb[: height // 4, : width // 4] = (255, 0, 0)
    return rgb.clip(0, 255).astype(np.uint8)


def to_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def reference(data: bytes, size: int, mode: str) -> np.ndarray:
    """The obvious full-resolution PIL pipeline, written independently of the code under test."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB")
    w, h = image.size
    if mode == "stretch":
        return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
    if mode == "center-crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)))
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.resize((nw, nh), Image.Resampling.LANCZOS), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("shape", [(640, 480), (300, 1100), (1200, 1200), (150, 100)])
def test_jpeg_matches_reference(mode: str, shape: tuple[int, int]) -> None:
    data = to_bytes(Image.fromarray(photo(*shape)), "JPEG", quality=95)
    out = load_resized(data, size=224, mode=mode)
    assert out.pixels.shape == (224, 224, 3) and out.pixels.dtype == np.uint8
    assert (out.orig_width, out.orig_height) == shape
    assert mad(out.pixels, reference(data, 224, mode)) < TOLERANCE


@pytest.mark.parametrize(
    "make",
    [
        lambda a: to_bytes(Image.fromarray(a), "PNG"),
        lambda a: to_bytes(Image.fromarray(a).convert("RGBA"), "PNG"),
        lambda a: to_bytes(Image.fromarray(a).convert("L"), "JPEG", quality=95),
        lambda a: to_bytes(Image.fromarray(a).convert("L"), "PNG"),
        lambda a: to_bytes(Image.fromarray(a).convert("P"), "GIF"),
        lambda a: to_bytes(Image.fromarray(a).convert("CMYK"), "JPEG", quality=95),
        lambda a: to_bytes(Image.fromarray(a), "WEBP", quality=95),
    ],
    ids=["png", "rgba-png", "gray-jpeg", "gray-png", "palette-gif", "cmyk-jpeg", "webp"],
)
def test_other_formats_and_modes_become_rgb(make) -> None:
    data = make(photo(500, 380, seed=1))
    out = decode_resize(data, size=128)
    assert out.shape == (128, 128, 3)
    assert mad(out, reference(data, 128, "center-crop")) < TOLERANCE


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    data = to_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    assert decode_resize(data, size=32).min() == 255


def png_variants() -> dict[str, bytes]:
    rgb = photo(90, 70, seed=3)
    palette = Image.fromarray(rgb).quantize(64)
    alpha = np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (70, 1))
    grey_alpha = Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), "LA")
    return {
        "palette": to_bytes(palette, "PNG"),
        "palette-trns": to_bytes(palette, "PNG", transparency=bytes(range(0, 256, 4))),
        "palette-one-transparent": to_bytes(palette, "PNG", transparency=5),
        "grey": to_bytes(Image.fromarray(rgb[:, :, 1]), "PNG"),
        "grey-trns": to_bytes(Image.fromarray(rgb[:, :, 1]), "PNG", transparency=7),
        "grey-alpha": to_bytes(grey_alpha, "PNG"),
        "rgb-gamma": to_bytes(Image.fromarray(rgb), "PNG", gamma=0.5),  # PIL ignores gAMA; so must libspng
    }


@pytest.mark.parametrize("name", sorted(png_variants()))
def test_png_fast_path_equals_pil(name: str) -> None:
    """libspng's output is exactly what the PIL path makes of the same PNG (alpha included)."""
    from vilbert.pipeline import images

    data = png_variants()[name]
    fast = images._decode_png_fast(data, images.MAX_PIXELS)
    if name.startswith("palette-"):  # a palette with transparency goes to PIL (pyspng drops its alpha)
        assert fast is None
        return
    assert fast is not None, "8-bit PNGs take the libspng path"
    slow = images._decode_pil(data, "PNG", 224, "center-crop", images.MAX_PIXELS)
    assert fast[0].shape == slow[0].shape and fast[1:] == slow[1:]
    np.testing.assert_array_equal(fast[0], slow[0])


# What a camera stores for each EXIF orientation, given the upright scene (PIL's exif_transpose undoes it).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_rotated_sources_come_out_upright(orientation: int, fmt: str) -> None:
    upright = photo(400, 300, seed=2)  # red marker top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = to_bytes(Image.fromarray(upright).transpose(STORED[orientation]), fmt, exif=exif.tobytes())
    if fmt == "JPEG":
        assert jpeg_orientation(data) == orientation
    out = load_resized(data, size=224, mode="stretch")
    assert (out.orig_width, out.orig_height) == (400, 300)
    expected = np.asarray(Image.fromarray(upright).resize((224, 224), Image.Resampling.LANCZOS))
    assert mad(out.pixels, expected) < TOLERANCE
    red = out.pixels[:40, :40].mean(axis=(0, 1))
    assert red[0] > 200 and red[1] < 60, "the marker must stay top-left"


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    grey = (photo(120, 90)[:, :, 0].astype(np.uint16) * 257).astype(np.uint16)
    data = to_bytes(Image.fromarray(grey), "PNG")
    out = decode_resize(data, size=64, mode="stretch")
    expected = np.asarray(Image.fromarray((grey >> 8).astype(np.uint8)).resize((64, 64), Image.Resampling.LANCZOS))
    assert mad(out[:, :, 0], expected) < TOLERANCE


def test_plain_jpeg_has_no_orientation() -> None:
    assert jpeg_orientation(to_bytes(Image.fromarray(photo(32, 32)), "JPEG")) is None


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "WEBP", "JPEG", "PNG"])
def test_the_gate_accepts_each_allowed_format(fmt: str) -> None:
    data = to_bytes(Image.fromarray(photo(90, 60, seed=2)), fmt)
    assert image_format(data) == fmt and fmt in IMAGE_FORMATS
    assert mad(decode_resize(data, size=48), reference(data, 48, "center-crop")) < TOLERANCE


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.fromarray(photo(64, 64, seed=s)).convert("P") for s in (3, 4)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    first = to_bytes(frames[0], "GIF")
    assert np.array_equal(decode_resize(buffer.getvalue(), size=64), decode_resize(first, size=64))


NOT_IMAGES = {
    "empty": b"",
    "html": b"<html>not found</html>",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "eps-binary": b"\xc5\xd0\xd3\xc6" + bytes(28) + b"%!PS-Adobe-3.0 EPSF-3.0\n",
    "pdf": b"%PDF-1.7\n",
    "psd": b"8BPS\x00\x01" + bytes(40),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    "ico": b"\x00\x00\x01\x00\x01\x00\x10\x10",
    "riff-wav": b"RIFF\x24\x00\x00\x00WAVEfmt ",
}


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_anything_else_is_not_an_image_before_any_decoder(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoder(*args, **kwargs):
        raise AssertionError("a decoder was reached")

    monkeypatch.setattr(Image, "open", no_decoder)  # PIL (and through it Ghostscript) is never asked
    with pytest.raises(ImageDecodeError) as info:
        decode_resize(NOT_IMAGES[name])
    assert info.value.reason == "not-an-image" and "accepted: JPEG, PNG" in str(info.value)


def test_bytes_that_claim_one_format_are_opened_as_that_format_only() -> None:
    """PIL may not fall back to another plugin: a BMP magic in front of a PNG is not read as PNG."""
    png = to_bytes(Image.fromarray(photo(20, 20)), "PNG")
    with pytest.raises(ImageDecodeError) as info:
        decode_resize(b"BM" + png)
    assert info.value.reason == "undecodable"


@pytest.mark.parametrize("data", [b"\xff\xd8\xff\xe0garbage", b"\x89PNG\r\n\x1a\nxx", b"GIF89a nope"])
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_resize(data)
    assert info.value.reason == "undecodable"
    assert isinstance(info.value, DataError)


def test_truncated_jpeg_is_undecodable() -> None:
    data = to_bytes(Image.fromarray(photo(400, 400)), "JPEG")
    with pytest.raises(ImageDecodeError, match="decode"):
        decode_resize(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decompression_bomb_is_refused_before_decoding(fmt: str) -> None:
    data = to_bytes(Image.new("L", (4000, 3000)), fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode_resize(data, max_pixels=10_000_000)
    assert info.value.reason == "too-large" and "4000x3000" in str(info.value)


def test_bad_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="center-crop, pad, stretch"):
        decode_resize(b"", mode="crop")


def test_encode_jpeg_round_trips() -> None:
    pixels = photo(224, 224)
    data = encode_jpeg(pixels, quality=90)
    assert data[:2] == b"\xff\xd8"
    assert simplejpeg.decode_jpeg_header(data)[2:] == ("YCbCr", "444")  # full-resolution colour
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert mad(back, pixels) < TOLERANCE
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(pixels.astype(np.float32))


@pytest.mark.parametrize("size", [224, 32])
def test_jpeg_output_buffers_keep_every_row_off_the_aligned_stores(size: int) -> None:
    # libjpeg-turbo's SIMD colour conversion stores a 16- or 32-byte aligned row non-temporally; a
    # buffer whose rows all start 8 bytes past a 16-byte boundary gets cached stores, and the same pixels.
    rgb = np.random.default_rng(5).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = encode_jpeg(rgb, quality=95)
    buffers = [jpeg_output_buffer(size, size) for _ in range(8)]
    for buffer in buffers:
        assert buffer.shape == (size, size, 3) and buffer.dtype == np.uint8 and buffer.flags.writeable
        assert {(buffer.ctypes.data + row * buffer.strides[0]) % 16 for row in range(size)} == {8}
        decoded = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=buffer)
        assert np.shares_memory(decoded, buffer)
        np.testing.assert_array_equal(decoded, simplejpeg.decode_jpeg(data, colorspace="RGB"))
