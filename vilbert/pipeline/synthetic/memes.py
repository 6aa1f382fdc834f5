"""A synthetic downstream task in the Hateful Memes layout whose label needs image and text together.

Each text is a claim about its image ("the red shape is on the left"); the label says whether the
claim is true. Samples come in groups of four built from a scene S and its confounder S' (the same
background, one attribute changed): five families of claim,

- `horizontal`, `vertical`: where one shape is ("the red shape is on the left", "the star is above the
  circle"); S' swaps the two shapes' places;
- `colour`: which colour a shape has ("the circle is red"); S' swaps the two shapes' colours (binding);
- `size`: which shape is bigger; S' swaps their sizes;
- `presence`: whether the image shows a colour at all ("there is a red circle"); S' repaints that shape
  in a colour absent from S (grounding: what the captions of the synthetic corpus teach),

    (S, claim, 1)   (S, counter-claim, 0)   (S', claim, 0)   (S', counter-claim, 1)

so every text and every image occurs once with each label: text alone and image alone are exactly at
chance, as with Hateful Memes' benign confounders. A group stays within one split.

Layout: DIR/img/<id>.png (a few .jpg), DIR/{train,dev_seen,test_seen}.jsonl with lines
{"id", "img", "label", "text"}, and DIR/synth.jsonl (id, group, family, shapes) for inspection.
"""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from vilbert.errors import UsageError
from vilbert.pipeline.synthetic.corpus import prepare_out_dir
from vilbert.pipeline.synthetic.scenes import COLOURS, SHAPES, Shape, render_scene

__all__ = ["generate_memes", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = (("train", 0.85), ("dev_seen", 0.05), ("test_seen", 0.10))
_FAMILIES = ("horizontal", "vertical", "colour", "size", "presence")
_TEMPLATES = ("{claim}", "look at this: {claim}", "i swear {claim}", "{claim}, obviously", "trust me, {claim}")


def generate_memes(out_dir: str | Path, n: int, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write about `n` samples (rounded down to a multiple of 4, at least 12) in the HM layout.

    Returns:
        The dataset directory.
    """
    groups = n // 4
    if groups < 3:
        raise UsageError(f"--n must be at least 12 (groups of 4, one per split at least), got {n}")
    out = prepare_out_dir(out_dir, overwrite, ("img", "synth.jsonl", *(f"{s}.jsonl" for s, _ in SPLITS)))
    (out / "img").mkdir()
    rng = np.random.default_rng([seed, 3_000_017])
    ids = 1000 + rng.permutation(4 * groups)
    jobs = [(seed, g, [int(i) for i in ids[4 * g : 4 * g + 4]], str(out / "img")) for g in range(groups)]
    workers = min(2, os.cpu_count() or 1)
    if groups >= 100 and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            samples = [s for group in pool.map(_make_group, jobs, chunksize=8) for s in group]
    else:
        samples = [s for group in map(_make_group, jobs) for s in group]
    split_of = _assign_splits(rng, groups)
    for split, _ in SPLITS:
        rows = [s for s in samples if split_of[s["group"]] == split]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        lines = [json.dumps({k: r[k] for k in ("id", "img", "label", "text")}) + "\n" for r in rows]
        (out / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    meta = [json.dumps({**s, "split": split_of[s["group"]]}, sort_keys=True) + "\n" for s in samples]
    (out / "synth.jsonl").write_text("".join(meta), encoding="utf-8")
    log.info("wrote %d memes (%d groups) to %s", 4 * groups, groups, out)
    return out


def _assign_splits(rng: np.random.Generator, groups: int) -> dict[int, str]:
    n_test = max(1, round(SPLITS[2][1] * groups))
    n_dev = max(1, round(SPLITS[1][1] * groups))
    order = rng.permutation(groups)
    names = ["test_seen"] * n_test + ["dev_seen"] * n_dev + ["train"] * (groups - n_test - n_dev)
    return {int(g): name for g, name in zip(order, names, strict=True)}


def _make_group(job: tuple[int, int, list[int], str]) -> list[dict]:
    """Render scene S and its confounder S', write four image files, return the four samples."""
    seed, group, ids, img_dir = job
    rng = np.random.default_rng([seed, 4_000_037, group])
    family = _FAMILIES[int(rng.integers(len(_FAMILIES)))]
    scene, confounder, claim, counter = _scene_pair(rng, family)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    size = int(rng.integers(256, 449))
    ext = "jpg" if rng.random() < 0.15 else "png"
    render_seed = int(rng.integers(2**63))
    images = [_encode(_render(render_seed, size, shapes), ext) for shapes in (scene, confounder)]
    plan = [(0, claim, 1), (0, counter, 0), (1, claim, 0), (1, counter, 1)]
    samples = []
    for sample_id, (which, text, label) in zip(ids, plan, strict=True):
        img = f"img/{sample_id:05d}.{ext}"
        Path(img_dir, f"{sample_id:05d}.{ext}").write_bytes(images[which])
        samples.append({"id": sample_id, "img": img, "label": label, "text": template.format(claim=text),
                        "group": group, "family": family,
                        "shapes": [s.to_json() for s in (scene, confounder)[which]]})  # fmt: skip
    return samples


def _scene_pair(rng: np.random.Generator, family: str) -> tuple[list[Shape], list[Shape], str, str]:
    """Two shapes (distinct colours and kinds), the confounder scene, a claim true of the first scene
    and its counter-claim (true of the confounder)."""
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    kinds = rng.choice(SHAPES, size=2, replace=False)
    sizes = ("large", "small") if rng.random() < 0.5 else ("small", "large")
    if family == "vertical":
        col = int(rng.integers(3))
        cells = [(0, col), (2, col)]
    else:
        row = int(rng.integers(3))
        cells = [(row, 0), (row, 2)]
    a, b = (Shape(shape=str(k), colour=str(c), size=s if family == "size" else "large", row=r, col=cc)
            for k, c, s, (r, cc) in zip(kinds, colours, sizes, cells, strict=True))  # fmt: skip
    ref_a, ref_b = _ref(rng, a), _ref(rng, b)
    if family == "horizontal":
        mirror = [replace(a, col=b.col), replace(b, col=a.col)]
        return [a, b], mirror, f"{ref_a} is on the left", f"{ref_a} is on the right"
    if family == "vertical":
        mirror = [replace(a, row=b.row), replace(b, row=a.row)]
        return [a, b], mirror, f"{ref_a} is above {ref_b}", f"{ref_a} is below {ref_b}"
    if family == "presence":
        absent = str(rng.choice([c for c in COLOURS if c not in (a.colour, b.colour)]))
        noun = a.shape if rng.random() < 0.5 else "shape"
        claim, counter = (f"there is {'an' if c[0] in 'aeiou' else 'a'} {c} {noun}" for c in (a.colour, absent))
        return [a, b], [replace(a, colour=absent), b], claim, counter
    if family == "colour":
        mirror = [replace(a, colour=b.colour), replace(b, colour=a.colour)]
        return [a, b], mirror, f"the {a.shape} is {a.colour}", f"the {a.shape} is {b.colour}"
    mirror = [replace(a, size=b.size), replace(b, size=a.size)]
    bigger = "bigger" if a.size == "large" else "smaller"
    smaller = "smaller" if bigger == "bigger" else "bigger"
    return [a, b], mirror, f"{ref_a} is {bigger} than {ref_b}", f"{ref_a} is {smaller} than {ref_b}"


def _ref(rng: np.random.Generator, shape: Shape) -> str:
    """A unique way to name one of the two shapes: by colour, by kind, or both."""
    choice = int(rng.integers(3))
    return (f"the {shape.colour} shape", f"the {shape.shape}", f"the {shape.colour} {shape.shape}")[choice]


def _render(render_seed: int, size: int, shapes: list[Shape]) -> Image.Image:
    # The same seed for S and S': identical background and jitter, only the swapped attribute differs.
    image, _ = render_scene(np.random.default_rng(render_seed), size, size, shapes, noise=3)
    return image


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
