"""Decode image bytes and resize them to a square model input; encode the result as JPEG.

Shared by fetch (bytes from the network -> 224x224 JPEG in an image shard) and preprocess (bytes
from a shard or a folder -> pixels in the cache), so both stages produce the same pixels.

Decoders, chosen per image by measurement (on 2 cores, decode dominates the fetch's CPU):

- **JPEG** (most of Conceptual Captions): libjpeg-turbo through `simplejpeg`, decoding straight to
  a reduced size with DCT-domain scaling that is still at least the target size; CMYK/YCCK ones are
  converted as PIL does (Adobe's inverted CMYK). The EXIF orientation is read from the APP1 header
  and applied (as `exif_transpose` would) to the resized square, where transposing is cheap.
- **PNG**, 8-bit RGB, RGBA, opaque palette and grey: libspng through `pyspng` (1.6-2x faster than
  PIL) when installed.
- **PIL** for everything else: GIF, WebP, 16-bit and 1-4-bit PNGs, transparent palettes, PNGs with
  EXIF.

Images with transparency are composited over white before resizing (as the obvious full-size
pipeline does; only the part a crop keeps is composited); 16-bit images are scaled to 8 bits; grey
and palette become RGB.

Resize modes (`RESIZE_MODES`): `center-crop` (shorter side to `size`, then the centre square),
`pad` (longer side to `size`, centred on black), `stretch` (both sides to `size`). The filter is
antialiased bicubic (the kernel of `torch.nn.functional.interpolate(antialias=True)`, PIL's filter
with a SIMD uint8 kernel: 3-5x faster than PIL's own resize here), reading the crop in place and
writing HWC pixels.

The gate: before any decoder sees bytes, their leading bytes must announce one of `IMAGE_FORMATS`
(JPEG, PNG, WebP, GIF, BMP, TIFF) and PIL may only open that one format (`Image.open(formats=...)`);
anything else (HTML, EPS, which PIL would hand to Ghostscript, PSD, ...) raises
`ImageDecodeError(reason="not-an-image")`. Every source passes through it: fetch bodies, fetch
shards, dataset files. A GIF gives its first frame.

Decompression bombs: the pixel count is read from the header before any pixel is decoded; more than
`max_pixels` raises `ImageDecodeError(reason="too-large")`.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from vilbert.cache.format import aligned_empty
from vilbert.errors import DataError

try:  # libspng: decodes PNG about twice as fast as PIL; optional, PIL is the fallback
    import pyspng
except ImportError:  # pragma: no cover - exercised only where pyspng is missing
    pyspng = None

__all__ = [
    "RESIZE_MODES",
    "MAX_PIXELS",
    "IMAGE_FORMATS",
    "image_format",
    "ImageDecodeError",
    "ResizedImage",
    "decode_resize",
    "load_resized",
    "encode_jpeg",
    "jpeg_orientation",
    "jpeg_output_buffer",
    "jpeg_output_bytes",
]

RESIZE_MODES = ("center-crop", "pad", "stretch")
MAX_PIXELS = 89_478_485
"""PIL's own default bomb limit (about 0.25 GiB of RGBA); larger sources are refused unread."""

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats any decoder is given (PIL's names); everything else is `not-an-image`."""

# Leading bytes -> format. WebP is RIFF + size + "WEBP" (checked apart); TIFF in both byte orders, and BigTIFF.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)

_Decoded = tuple
"""(pixels (H, W, 3) RGB or (H, W, 4) RGBA with straight alpha, upright width, upright height, EXIF
orientation still to apply after resizing: center-crop, pad and stretch to a square commute with it)."""

# Pillow warns (and raises above 2x) on its own limit; we check first with ours.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(DataError):
    """Bytes that cannot become a model input; `.reason` is a short label used for skip counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ResizedImage:
    """A decoded, resized image and the size of its (upright) source."""

    pixels: np.ndarray
    """uint8, (size, size, 3), RGB, C-contiguous."""
    orig_width: int
    orig_height: int


def image_format(data: bytes) -> str:
    """The format `data`'s leading bytes announce, one of `IMAGE_FORMATS`.

    Raises:
        ImageDecodeError: `reason="not-an-image"`, naming the first bytes.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    head = bytes(data[:40]).decode("latin-1").encode("unicode_escape").decode()
    raise ImageDecodeError(
        "not-an-image",
        f"not an image of an accepted format ({len(data)} bytes starting {head!r}; accepted: "
        f"{', '.join(IMAGE_FORMATS)})",
    )


def decode_resize(
    data: bytes, *, size: int = 224, mode: str = "center-crop", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode `data` (any format PIL reads) to an upright RGB square of `size` pixels.

    Args:
        data: The encoded image.
        size: Side of the square output.
        mode: One of `RESIZE_MODES`.
        max_pixels: Sources with more pixels are refused before decoding.

    Returns:
        uint8 array of shape (size, size, 3).

    Raises:
        ImageDecodeError: `reason` is `"not-an-image"`, `"undecodable"` or `"too-large"`.
    """
    return load_resized(data, size=size, mode=mode, max_pixels=max_pixels).pixels


def load_resized(
    data: bytes, *, size: int = 224, mode: str = "center-crop", max_pixels: int = MAX_PIXELS
) -> ResizedImage:
    """Like `decode_resize`, also returning the source's upright width and height."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode={mode!r} is invalid; valid: {', '.join(RESIZE_MODES)}")
    if size <= 0:
        raise ValueError(f"size={size!r} is invalid; valid: > 0")
    fmt = image_format(data)  # the gate: nothing else reaches a decoder
    decoded = None
    if fmt == "JPEG":
        decoded = _decode_jpeg_fast(data, size, mode, max_pixels)
    elif fmt == "PNG" and pyspng is not None:
        decoded = _decode_png_fast(data, max_pixels)
    if decoded is None:
        decoded = _decode_pil(data, fmt, size, mode, max_pixels)
    pixels, orig_width, orig_height, orientation = decoded
    out = _resize(pixels, size, mode)
    if orientation in _ORIENT:  # turned after resizing: a square is cheap to transpose, a photo is not
        out = np.ascontiguousarray(_ORIENT[orientation](out))
    return ResizedImage(out, orig_width, orig_height)


_UNALIGNED = 8
"""Where a `jpeg_output_buffer` starts: 8 bytes past a 64-byte boundary, so never 16-byte aligned."""


def jpeg_output_buffer(height: int, width: int) -> np.ndarray:
    """An uninitialised `(height, width, 3)` uint8 array for `simplejpeg.decode_jpeg(buffer=...)` that
    libjpeg-turbo fills with ordinary, cached stores.

    Its x86 SIMD colour conversion writes an output row that starts 16-byte (SSE2) or 32-byte (AVX2)
    aligned with non-temporal stores, which go around the cache to memory: the decode itself costs
    more and whoever reads the pixels next reads them from memory. numpy's allocations are 16-byte
    aligned, 32-byte aligned or not by chance, so a decode worker's reused buffer made a whole run
    fast or slow (docs/results.md, appendix C). Here every row starts off alignment where a
    row is a multiple of 16 bytes long (224 pixels: 672 bytes).
    """
    return jpeg_output_bytes(height * width * 3).reshape(height, width, 3)


def jpeg_output_bytes(nbytes: int) -> np.ndarray:
    """`nbytes` uninitialised bytes starting 8 bytes past a 64-byte boundary (`jpeg_output_buffer`'s
    memory: rows of any multiple of 16 bytes laid out from it start off the aligned stores)."""
    return aligned_empty((nbytes + _UNALIGNED,), np.uint8, alignment=64)[_UNALIGNED:]


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 HWC array as a baseline JPEG with full-resolution chroma (4:4:4).

    At 224x224 a small object's colour is a few pixels wide; 4:2:0 would halve it (and save 0.12 ms
    of the encode and 18% of the bytes: docs/results.md, appendix C)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag (1-8) of a JPEG, read from its APP1 segment; None if absent."""
    pos, end = 2, min(len(data), 1 << 20)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more header segments
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == 0x0112:
            (value,) = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)
            return value
    return None


def _min_decoded_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """Smallest (width, height) a reduced decode may have and still be downscaled to the target."""
    if mode == "stretch":
        return size, size
    side = min(width, height) if mode == "center-crop" else max(width, height)
    scale = size / side
    return math.ceil(width * scale), math.ceil(height * scale)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError("undecodable", f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError("too-large", f"image is {width}x{height} = {width * height} pixels, limit {max_pixels}")


def _decode_jpeg_fast(data: bytes, size: int, mode: str, max_pixels: int) -> _Decoded | None:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let PIL try, and name the error
    if colorspace not in ("YCbCr", "Gray", "RGB", "CMYK", "YCCK"):
        return None
    _check_pixels(width, height, max_pixels)
    min_w, min_h = _min_decoded_size(width, height, size, mode)
    # Only the power-of-two DCT scales: libjpeg-turbo's M/8 scales (7/8, 3/4, ...) decode slower
    # than the next larger 1/2^k one plus the extra resize (measured on the synthetic corpus).
    scale = 1
    while scale < 8 and -(-width // (2 * scale)) >= min_w and -(-height // (2 * scale)) >= min_h:
        scale *= 2
    cmyk = colorspace in ("CMYK", "YCCK")
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="CMYK" if cmyk else "RGB", min_width=-(-width // scale), min_height=-(-height // scale)
        )
    except ValueError as err:
        raise ImageDecodeError("undecodable", f"JPEG decode failed: {err}") from err
    if cmyk:  # as PIL reads CMYK JPEGs: Adobe's inverted convention ("CMYK;I"), then PIL's CMYK -> RGB
        h, w = pixels.shape[:2]
        pixels = np.asarray(Image.frombuffer("CMYK", (w, h), pixels, "raw", "CMYK;I", 0, 1).convert("RGB"))
    orientation = jpeg_orientation(data) or 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return pixels, width, height, orientation


# EXIF orientation -> the numpy view that makes the stored pixels upright (PIL's exif_transpose).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}


def _decode_png_fast(data: bytes, max_pixels: int) -> _Decoded | None:
    """8-bit PNGs through libspng (1.6-2x faster than PIL); other depths and EXIF ones through PIL.

    The output matches PIL's conversion exactly: palette expanded to RGB (palettes with transparency go
    to PIL), grey to RGB (grey + alpha to RGBA; a grey tRNS is ignored, as PIL's convert("RGB") does).
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in _SPNG_FORMAT or b"eXIf" in data:
        return None  # PIL handles other depths, and applies EXIF orientation
    if colour == 3 and _png_has_chunk(data, b"tRNS"):
        return None  # pyspng does not apply a palette's transparency (libspng's decode flags stay 0)
    _check_pixels(width, height, max_pixels)
    try:
        pixels = pyspng.load(data, _SPNG_FORMAT[colour])
    except Exception as err:  # pyspng raises RuntimeError/ValueError with libspng's message
        raise ImageDecodeError("undecodable", f"PNG decode failed: {err}") from err
    return pixels, width, height, 1


# PNG colour type -> libspng output format: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA.
_SPNG_FORMAT = {0: "RGB", 2: "RGB", 3: "RGB", 4: "RGBA", 6: "RGBA"}


def _png_has_chunk(data: bytes, kind: bytes) -> bool:
    """Whether a chunk of `kind` comes before the image data (where tRNS must be)."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunk = data[pos + 4 : pos + 8]
        if chunk == kind:
            return True
        if chunk == b"IDAT":
            return False
        pos += 12 + length
    return False


def _decode_pil(data: bytes, fmt: str, size: int, mode: str, max_pixels: int) -> _Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter on dirty web images
            image = Image.open(io.BytesIO(data), formats=(fmt,))  # only the format the gate saw
            width, height = image.size
            _check_pixels(width, height, max_pixels)
            if image.format == "JPEG":
                image.draft("RGB", _min_decoded_size(width, height, size, mode))
            quarter_turn = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            pixels = _to_rgb_array(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError("undecodable", f"cannot decode image: {err}") from err
    return (pixels, height, width, 1) if quarter_turn else (pixels, width, height, 1)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB, or RGBA for images with transparency (composited over white later)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((array >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La"):
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _resize(pixels: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Antialiased bicubic resize of an (H, W, 3|4) array; 4 channels are RGBA, composited over white."""
    import torch  # deferred: importing torch costs a second; callers that never resize skip it

    height, width = pixels.shape[:2]
    if mode == "center-crop":
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        pixels, inner = pixels[top : top + side, left : left + side], (size, size)
    elif mode == "stretch":
        inner = (size, size)
    else:
        scale = size / max(width, height)
        inner = (max(1, round(height * scale)), max(1, round(width * scale)))
    if pixels.shape[2] == 4:
        pixels = _over_white(pixels)
    if pixels.shape[:2] == inner:
        out = np.array(pixels, order="C")  # already the target size: a writable copy, no resampling
    else:
        # An HWC array, or a crop of one, is a channels-last tensor: torch's uint8 kernel for that
        # layout is the fast one. It reads the crop in place (torch needs writable memory and strides
        # that are not negative), and writes into an HWC array given as `out`: `interpolate` would
        # return planes, to be interleaved by another pass (docs/results.md, appendix C).
        if not pixels.flags.writeable or min(pixels.strides) < 0:
            pixels = np.array(pixels, order="C")
        out = np.empty((*inner, 3), np.uint8)
        planes = torch.from_numpy(out).permute(2, 0, 1)[None]  # (1, 3, h, w) over `out`
        torch.ops.aten._upsample_bicubic2d_aa.out(  # interpolate(mode="bicubic", antialias=True)'s kernel
            torch.from_numpy(pixels).permute(2, 0, 1)[None], list(inner), False, None, None, out=planes
        )
    if mode != "pad":
        return np.ascontiguousarray(out)
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - inner[0]) // 2, (size - inner[1]) // 2
    canvas[top : top + inner[0], left : left + inner[1]] = out
    return canvas


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA over white (PIL's paste with the alpha as mask: one C pass)."""
    height, width = rgba.shape[:2]
    image = Image.frombuffer("RGBA", (width, height), np.ascontiguousarray(rgba), "raw", "RGBA", 0, 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(image, (0, 0), image)
    return np.asarray(canvas)
