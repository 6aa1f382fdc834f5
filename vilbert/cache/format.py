"""The cache's on-disk format: schema, manifest, normalization presets and version.

Shared by the writer, the reader and verify; imports nothing of the project but `vilbert.errors`.
See `docs/cache-format.md` for the format written out in full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vilbert.errors import CacheError, UsageError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "LEGACY_MANIFEST_NAMES",
    "is_cache",
    "PIXEL_DTYPES",
    "SPECIAL_TOKENS",
    "Normalization",
    "NORMALIZATIONS",
    "normalization",
    "ShardInfo",
    "Manifest",
    "shard_schema",
    "shard_metadata",
    "sha256_bytes",
    "sha256_file",
    "CHECKSUM_ALGORITHMS",
    "aligned_empty",
    "default_checksum_algorithm",
    "checksum_algorithm",
    "new_digest",
    "file_checksum",
    "read_manifest",
    "write_json_atomic",
    "write_bytes_atomic",
    "fsync_dir",
    "numpy_column",
    "arrow_array",
    "arrow_strings",
    "CHANNELS",
    "SETTINGS_KEYS",
    "LAYOUT",
]

FORMAT_NAME = "vilbert-cache"
FORMAT_VERSION = 2
"""Bumped on any change a reader of the previous version would misread. Version 2 renamed the side
files `_manifest.json` and `_tokenizer.json`, so that Arrow dataset readers skip them (they ignore
names starting with `_` or `.`) and a cache directory opens as a dataset of its shards."""
MANIFEST_NAME = "_manifest.json"
TOKENIZER_NAME = "_tokenizer.json"
LEGACY_MANIFEST_NAMES = ("manifest.json",)
"""Where older format versions kept the manifest: such a cache is refused with a rebuild hint."""
PIXEL_DTYPES = ("float16", "uint8")
SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask")
LAYOUT = "CHW"
CHANNELS = 3
_CHUNK = 8 << 20


# ----------------------------------------------------------------------------------- normalization


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std a float cache was normalized with: `(pixel / 255 - mean) / std`."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != CHANNELS or len(self.std) != CHANNELS:
            raise UsageError(
                f"normalization {self.name!r}: mean and std need 3 values (RGB), got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise UsageError(f"normalization {self.name!r}: std must be > 0, got {self.std}")

    def matches(self, other: Normalization, tol: float = 1e-6) -> bool:
        """Same mean and std (names may differ: `half` equals a custom 0.5/0.5)."""
        return all(abs(a - b) <= tol for a, b in zip(self.mean + self.std, other.mean + other.std, strict=True))

    def lut(self) -> np.ndarray:
        """float16 `[3, 256]`: `lut[c, v] = (v / 255 - mean[c]) / std[c]`, rounded once from float64."""
        values = np.arange(256, dtype=np.float64) / 255.0
        mean, std = np.asarray(self.mean)[:, None], np.asarray(self.std)[:, None]
        return ((values[None, :] - mean) / std).astype(np.float16)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels `[N, 3, H, W]` -> normalized float16 (through `lut`: exact, one pass)."""
        lut = self.lut()
        out = np.empty(pixels.shape, np.float16)
        for c in range(pixels.shape[-3]):
            np.take(lut[c], pixels[..., c, :, :], out=out[..., c, :, :], mode="clip")
        return out

    def describe(self) -> str:
        fmt = ", ".join
        return f"{self.name!r} (mean=({fmt(f'{v:g}' for v in self.mean)}), std=({fmt(f'{v:g}' for v in self.std)}))"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": Normalization(name="imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # timm's default ViT-B/16 weights (augreg) were trained with mean = std = 0.5.
    "half": Normalization(name="half", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "clip": Normalization(
        name="clip",
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
    ),
}


def normalization(
    value: str | Normalization | Mapping[str, Any] | tuple[Sequence[float], Sequence[float]],
) -> Normalization:
    """A preset by name, a `Normalization`, a `{"name", "mean", "std"}` dict or `(mean, std)`.

    Raises:
        UsageError: an unknown preset name or malformed values.
    """
    if isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        if value not in NORMALIZATIONS:
            raise UsageError(
                f"unknown normalization {value!r}; valid: {', '.join(NORMALIZATIONS)} or explicit (mean, std)"
            )
        return NORMALIZATIONS[value]
    if isinstance(value, Mapping):
        return Normalization(name=str(value.get("name", "custom")), mean=value["mean"], std=value["std"])
    mean, std = value
    preset = Normalization(name="custom", mean=mean, std=std)
    named = next((n for n in NORMALIZATIONS.values() if n.matches(preset)), None)
    return named or preset


SETTINGS_KEYS = (
    "split",
    "image_size",
    "channels",
    "pixel_dtype",
    "normalization",
    "tokenizer_fingerprint",
    "vocab_size",
    "special_token_ids",
    "max_len",
    "has_labels",
    "has_captions",
    "rows_per_shard",
)
"""Manifest keys that must not change when a build is resumed."""

# ----------------------------------------------------------------------------------------- schema


def shard_schema(
    *,
    image_size: int,
    pixel_dtype: str,
    max_len: int,
    has_labels: bool,
    has_captions: bool,
    metadata: Mapping[str, str] | None = None,
) -> pa.Schema:
    """The Arrow schema of every shard of a cache with these settings (columns in this order)."""
    pixel_type = pa.float16() if pixel_dtype == "float16" else pa.uint8()
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field(
            "pixels",
            pa.list_(pixel_type, CHANNELS * image_size * image_size),
            nullable=False,
        ),
        pa.field("input_ids", pa.list_(pa.int32(), max_len), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
    ]
    if has_labels:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    if has_captions:
        fields.append(pa.field("caption", pa.string(), nullable=False))
    return pa.schema(fields, metadata=dict(metadata) if metadata else None)


def shard_metadata(
    *, pixel_dtype: str, norm: Normalization, tokenizer_fingerprint: str, image_size: int
) -> dict[str, str]:
    """Schema metadata that makes each shard self-describing (and lets the reader catch a shard
    copied in from another cache). Deterministic: no timestamps."""
    return {
        "vilbert.format": FORMAT_NAME,
        "vilbert.format_version": str(FORMAT_VERSION),
        "vilbert.layout": LAYOUT,
        "vilbert.image_size": str(image_size),
        "vilbert.pixel_dtype": pixel_dtype,
        "vilbert.normalization": json.dumps(norm.to_dict(), sort_keys=True),
        "vilbert.tokenizer_fingerprint": tokenizer_fingerprint,
    }


# ---------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One shard as the manifest lists it."""

    name: str
    rows: int
    bytes: int
    checksum: str
    """`<algorithm>:<hex>` of the whole file: `xxh3_128:` (written where the xxhash package is
    installed) or `sha256:`; each shard names its own algorithm (`CHECKSUM_ALGORITHMS`)."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """`_manifest.json`: everything a consumer must know to trust and interpret the shards."""

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    split: str
    num_rows: int
    image_size: int
    channels: int = CHANNELS
    layout: str = LAYOUT
    pixel_dtype: str
    normalization: Normalization
    tokenizer_file: str = TOKENIZER_NAME
    tokenizer_fingerprint: str
    """`sha256:<hex>` of `_tokenizer.json`'s bytes."""
    vocab_size: int
    special_token_ids: dict[str, int]
    max_len: int
    has_labels: bool
    has_captions: bool
    rows_per_shard: int
    shards: tuple[ShardInfo, ...]
    command: str
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["normalization"] = self.normalization.to_dict()
        data["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> Manifest:
        """Parse a manifest dict; raises `CacheError` naming `source` and the bad key."""
        version = data.get("format_version")
        if data.get("format") != FORMAT_NAME or version != FORMAT_VERSION:
            raise CacheError(
                f"{source}: unknown format {data.get('format')!r} version {version!r}; "
                f"this vilbert reads {FORMAT_NAME!r} version {FORMAT_VERSION} (rebuild the cache with "
                "`vilbert preprocess ... --overwrite`)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in names}
            kwargs["normalization"] = normalization(data["normalization"])
            kwargs["shards"] = tuple(ShardInfo(**s) for s in data["shards"])
            kwargs["special_token_ids"] = {str(k): int(v) for k, v in data["special_token_ids"].items()}
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError, UsageError) as err:
            raise CacheError(f"{source}: malformed manifest ({type(err).__name__}: {err})") from err

    def schema(self) -> pa.Schema:
        """The schema every shard must have, including its metadata."""
        meta = shard_metadata(
            pixel_dtype=self.pixel_dtype,
            norm=self.normalization,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            image_size=self.image_size,
        )
        return shard_schema(
            image_size=self.image_size,
            pixel_dtype=self.pixel_dtype,
            max_len=self.max_len,
            has_labels=self.has_labels,
            has_captions=self.has_captions,
            metadata=meta,
        )


def read_manifest(directory: Path) -> Manifest:
    """Load and parse `directory/_manifest.json`.

    Raises:
        CacheError: no manifest (not a cache, or an unfinished build), bad JSON, unknown version.
    """
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise CacheError(f"not a cache (no such directory): {directory}")
    if not path.is_file():
        _refuse_legacy(Path(directory))
        raise CacheError(
            f"not a cache (no {MANIFEST_NAME}): {directory} "
            "(an unfinished build leaves no manifest; rebuild or resume it)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(data, dict):
        raise CacheError(f"{path}: malformed manifest (not a JSON object)")
    return Manifest.from_dict(data, source=str(path))


def is_cache(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` holds a finished cache of this format version (its manifest exists)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def _refuse_legacy(directory: Path) -> None:
    for name in LEGACY_MANIFEST_NAMES:
        if (directory / name).is_file():
            try:
                version = json.loads((directory / name).read_text(encoding="utf-8")).get("format_version")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                version = "unknown"
            raise CacheError(
                f"{directory} is a cache of format version {version} ({name}); this vilbert reads version "
                f"{FORMAT_VERSION}: rebuild it with `vilbert preprocess ... --overwrite` (see docs/cache-format.md)"
            )


# ---------------------------------------------------------------------------------------- files


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """`sha256:<hex>` of a file, streamed in 8 MiB chunks."""
    return file_checksum(path, "sha256")


CHECKSUM_ALGORITHMS = ("xxh3_128", "sha256")
"""Shard checksums, as the prefix of `ShardInfo.checksum`. They catch corruption (a flipped byte, a
torn copy), not tampering: xxh3_128 hashes ~8x faster than SHA-256 here (0.1 against 0.7 ms per
150 KB row on this 2-core VM), so writing a cache costs less than decoding its images. SHA-256 is
written where the xxhash package is missing, and is still read everywhere."""


def default_checksum_algorithm() -> str:
    """`xxh3_128` where the xxhash package is installed, else `sha256`."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def checksum_algorithm(checksum: str) -> str:
    """The algorithm a `<algorithm>:<hex>` checksum names; `CacheError` if unknown or not installed."""
    algorithm = checksum.split(":", 1)[0] if ":" in checksum else ""
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise CacheError(f"unknown checksum {checksum[:40]!r}; known algorithms: {', '.join(CHECKSUM_ALGORITHMS)}")
    return algorithm


def new_digest(algorithm: str) -> Any:
    """A hashlib-style object (`update`, `hexdigest`) for one of `CHECKSUM_ALGORITHMS`."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise CacheError(
                "this cache's shards carry xxh3_128 checksums; checking them needs the xxhash package "
                "(pip install xxhash)"
            ) from None
        return xxhash.xxh3_128()
    raise CacheError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(CHECKSUM_ALGORITHMS)}")


def file_checksum(path: Path, algorithm: str) -> str:
    """`<algorithm>:<hex>` of a file, streamed in 8 MiB chunks."""
    digest = new_digest(algorithm)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return f"{algorithm}:{digest.hexdigest()}"


def write_json_atomic(path: Path, data: Mapping[str, Any], *, ensure_ascii: bool = True) -> None:
    """Write JSON to a temporary name, fsync, rename over `path`, fsync the directory."""
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=ensure_ascii) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type, alignment: int = 4096) -> np.ndarray:
    """An uninitialized array whose first byte is at a multiple of `alignment` in memory."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name, fsync, rename over `path`, fsync the directory: after a crash
    `path` holds the old content or the new, never a torn mix, and the new survives a power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def numpy_column(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric, boolean or fixed-size-list Arrow column without nulls as numpy: a view of the Arrow
    buffer where it can be (one chunk), else a copy. Unlike `to_numpy`, it does not import pandas
    (pyarrow looks it up on the first call; the cost: docs/results.md, appendix C). A fixed-size
    list comes back as `[rows, width]`."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return numpy_column(column.chunk(0))
        width = column.type.list_size if isinstance(column.type, pa.FixedSizeListType) else None
        empty = np.zeros((0, width) if width else 0, _numpy_dtype(column.type))
        return np.concatenate([numpy_column(chunk) for chunk in column.chunks]) if column.num_chunks else empty
    if column.null_count:
        raise ValueError(f"column of {column.type} has {column.null_count} nulls")
    if isinstance(column, pa.FixedSizeListArray):
        width = column.type.list_size  # flatten(): the values of this slice (a view; `.values` ignores the offset)
        return numpy_column(column.flatten()).reshape(len(column), width)
    if pa.types.is_boolean(column.type):
        bits = np.frombuffer(column.buffers()[1], np.uint8)
        return np.unpackbits(bits, bitorder="little")[column.offset : column.offset + len(column)].astype(bool)
    dtype = _numpy_dtype(column.type)
    buffer = column.buffers()[1]
    if buffer is None:  # an empty array may have no data buffer
        return np.zeros(0, dtype)
    return np.frombuffer(buffer, dtype=dtype, count=len(column), offset=column.offset * dtype.itemsize)


def arrow_array(values: np.ndarray) -> pa.Array:
    """A 1-D numeric numpy array as an Arrow array over the same memory, without `pa.array`, which
    imports pandas on its first call (see `numpy_column`)."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(f"not a 1-D numeric array: {values.dtype}{list(values.shape)}")
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def arrow_strings(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow string array built from its buffers, without `pa.array` (see
    `arrow_array`). Raises UnicodeEncodeError for a string that is not valid Unicode, as `pa.array` would."""
    encoded = [value.encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of strings: more than an Arrow string array holds")
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets.astype(np.int32)), data])


def _numpy_dtype(arrow_type: pa.DataType) -> np.dtype:
    if isinstance(arrow_type, pa.FixedSizeListType):
        arrow_type = arrow_type.value_type
    if not (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)):
        raise TypeError(f"not a numeric column: {arrow_type}")
    return np.dtype(arrow_type.to_pandas_dtype())
