"""The synthetic Conceptual-Captions-like corpus: images of shapes with captions, and a CC-style TSV.

Layout of a corpus directory:

    DIR/images/<name>.jpg|.png   the image files (what the server serves under /images/)
    DIR/cc.tsv                   caption<TAB>url, no header, ~2% URLs of images that do not exist
    DIR/corpus.jsonl             one line per image: name, file, caption, width, height, format, mode,
                                 exif_orientation, quality, bytes, shapes (written last)

Image `i` is made from its own seed `(seed, i)`, so the tree is byte-identical for a seed whatever
the number of worker processes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from vilbert.errors import DataError, UsageError
from vilbert.pipeline.synthetic.captions import describe
from vilbert.pipeline.synthetic.scenes import contrasting_grey, random_shapes, render_scene

__all__ = ["DEFAULT_BASE_URL", "generate_corpus", "write_cc_tsv", "read_corpus", "prepare_out_dir"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8765"
MISSING_FRACTION = 0.02

# Every block of 40 consecutive images holds exactly this mix (shuffled per block), so any corpus of
# 40 or more images has every kind of file a fetcher must cope with.
_VARIANT_BLOCK = (
    ("jpeg-rgb", 23),
    ("jpeg-rgb-exif", 3),
    ("jpeg-l", 2),
    ("jpeg-cmyk", 2),
    ("png-rgb", 4),
    ("png-rgba", 3),
    ("png-p", 3),
)
_BLOCK = [name for name, count in _VARIANT_BLOCK for _ in range(count)]
_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 2.5)
# PIL's exif_transpose applies these to a stored image; we store the inverse of the upright scene.
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # the tag means "rotate 270 to view"; store rotated by 90
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def generate_corpus(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> Path:
    """Write a corpus of `n` captioned images into `out_dir`.

    Args:
        out_dir: Target directory; must be absent or empty unless `overwrite`.
        n: Number of images (>= 1).
        seed: Same seed, same bytes.
        workers: Processes to render with (default: up to 2, one per core).
        overwrite: Replace a previous corpus's files (`images/`, `cc.tsv`, `corpus.jsonl`).
        progress: Called with `{"done": i, "total": n}` as images are finished.

    Returns:
        The corpus directory.
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    out = prepare_out_dir(out_dir, overwrite, ("images", "cc.tsv", "corpus.jsonl"))
    (out / "images").mkdir()
    jobs = [(seed, i, _variant(seed, i), str(out / "images")) for i in range(n)]
    workers = workers or min(2, os.cpu_count() or 1)
    records = []
    if workers <= 1 or n < 32:
        iterator = map(_make_image, jobs)
        records = _collect(iterator, n, progress)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            records = _collect(pool.map(_make_image, jobs, chunksize=16), n, progress)
    _write_tsv(out / "cc.tsv", records, seed, DEFAULT_BASE_URL)
    _write_jsonl(out / "corpus.jsonl", records)
    log.info("wrote %d images to %s", n, out)
    return out


def write_cc_tsv(corpus_dir: str | Path, base_url: str, out_path: str | Path, *, copies: int = 1) -> Path:
    """Rewrite the corpus's `cc.tsv` with URLs under `base_url` (e.g. a server on a random port).

    Args:
        copies: Write the whole list this many times, copy k under /copy/<k>/images/... (a server
            with `ServerOptions(copies=...)` at least as large plans and serves each copy).
    """
    source = Path(corpus_dir) / "cc.tsv"
    if not source.is_file():
        raise UsageError(f"{corpus_dir} is not a synthetic corpus: {source} is missing")
    if copies < 1:
        raise UsageError(f"copies must be >= 1, got {copies}")
    base = base_url.rstrip("/")
    pairs = [line.split("\t") for line in source.read_text(encoding="utf-8").splitlines()]
    lines = []
    for copy in range(copies):
        prefix = f"/copy/{copy}" if copy else ""
        lines += [f"{caption}\t{base}{prefix}{urlsplit(url).path}\n" for caption, url in pairs]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return out


def read_corpus(corpus_dir: str | Path) -> list[dict]:
    """The records of `corpus.jsonl`, in image order."""
    path = Path(corpus_dir) / "corpus.jsonl"
    if not path.is_file():
        raise UsageError(
            f"{corpus_dir} is not a synthetic corpus: {path} is missing (make one with "
            "`vilbert synth corpus --n N --out DIR`)"
        )
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not JSON ({err})") from err
    return records


def prepare_out_dir(out_dir: str | Path, overwrite: bool, owned: tuple[str, ...]) -> Path:
    """Make `out_dir`, refusing a non-empty one unless `overwrite` (then remove only `owned` entries)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        for name in owned:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _collect(results, n: int, progress: Callable[[dict], None] | None) -> list[dict]:
    records = []
    for record in results:
        records.append(record)
        if progress is not None and (len(records) % 50 == 0 or len(records) == n):
            progress({"done": len(records), "total": n})
    return records


def _variant(seed: int, index: int) -> str:
    block, slot = divmod(index, len(_BLOCK))
    order = np.random.default_rng([seed, 1_000_003, block]).permutation(len(_BLOCK))
    return _BLOCK[order[slot]]


def _make_image(job: tuple[int, int, str, str]) -> dict:
    """Render, encode and write image `index`; return its corpus.jsonl record."""
    seed, index, variant, images_dir = job
    rng = np.random.default_rng([seed, index])
    # Shorter side 200-800 px (PNG up to 600), skewed towards small as on the web.
    short = 200 + int((400 if variant.startswith("png") else 600) * rng.random() ** 1.5)
    long = min(1200, round(short * float(rng.choice(_ASPECTS))))
    width, height = (long, short) if rng.random() < 0.65 else (short, long)
    shapes = random_shapes(rng, int(rng.choice([1, 2, 2, 3])))
    grey = contrasting_grey(shapes) if variant == "jpeg-l" else (70.0, 200.0)
    image, placed = render_scene(rng, width, height, shapes, grey=grey)
    caption = describe(placed, rng, colour=variant != "jpeg-l")
    data, fmt, mode, orientation, quality = _encode(rng, image, variant)
    name = f"{index:06d}"
    file = f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
    Path(images_dir, file).write_bytes(data)
    return {
        "name": name,
        "file": file,
        "caption": caption,
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        "exif_orientation": orientation,
        "quality": quality,
        "bytes": len(data),
        "shapes": [s.to_json() for s in placed],
    }


def _encode(rng: np.random.Generator, image: Image.Image, variant: str):
    """Encode with fixed, seeded parameters; returns (bytes, format, mode, orientation, quality)."""
    buf = io.BytesIO()
    if variant.startswith("png"):
        if variant == "png-rgba":
            image = _with_alpha(image)
        elif variant == "png-p":
            image = image.quantize(colors=int(rng.integers(48, 129)), method=Image.Quantize.FASTOCTREE,
                                   dither=Image.Dither.NONE)  # fmt: skip
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "PNG", image.mode, None, None
    quality = int(rng.integers(55, 96))
    orientation = None
    params = {"quality": quality, "subsampling": int(rng.choice([0, 1, 2])), "progressive": rng.random() < 0.15}
    if variant == "jpeg-l":
        image = image.convert("L")
    elif variant == "jpeg-cmyk":
        image = image.convert("CMYK")
    elif variant == "jpeg-rgb-exif":
        orientation = int(rng.integers(2, 9))
        image = image.transpose(_UNDO_ORIENTATION[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    image.save(buf, format="JPEG", optimize=False, **params)
    return buf.getvalue(), "JPEG", image.mode, orientation, quality


def _with_alpha(image: Image.Image) -> Image.Image:
    """Opaque over the central square (where the shapes are), fading to translucent at the far edges."""
    width, height = image.size
    side = min(width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx = np.maximum(np.abs(xs - width / 2) - side / 2, 0) / max(width / 2 - side / 2, 1)
    dy = np.maximum(np.abs(ys - height / 2) - side / 2, 0) / max(height / 2 - side / 2, 1)
    alpha = (255 - 160 * np.maximum(dx, dy)).astype(np.uint8)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _write_tsv(path: Path, records: list[dict], seed: int, base_url: str) -> None:
    """caption<TAB>url for every image, plus ~2% lines whose image does not exist, interleaved."""
    rng = np.random.default_rng([seed, 2_000_003])
    lines = [f"{r['caption']}\t{base_url}/images/{r['file']}\n" for r in records]
    n_missing = max(1, round(MISSING_FRACTION * len(records)))
    for k in range(n_missing):
        donor = records[int(rng.integers(len(records)))]["caption"]
        at = int(rng.integers(len(lines) + 1))
        lines.insert(at, f"{donor}\t{base_url}/images/missing-{k:05d}.jpg\n")
    path.write_text("".join(lines), encoding="utf-8")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    tmp.replace(path)
