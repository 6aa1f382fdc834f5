"""Scenes of coloured shapes on a textured, noisy background: the pixels behind the synthetic corpus
and the synthetic memes.

A scene is a list of `Shape`s placed on a 3x3 grid inside the image's central square (the region a
shorter-side resize plus centre crop keeps), so every shape survives fetch's default crop. Shapes are
solid, saturated and at least a tenth of that square across, so they stay recognisable at 64x64.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

__all__ = ["COLOURS", "SHAPES", "SIZES", "Shape", "render_scene", "random_shapes", "cell_phrase", "contrasting_grey"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 25),
    "purple": (135, 45, 185),
    "orange": (250, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# Radius as a fraction of the central square's side: large shapes fill most of a grid cell (1/3),
# small ones are still ~13 px across at 64x64.
SIZES: dict[str, float] = {"small": 0.10, "large": 0.155}

_MAX_SIDE = 1200  # the largest image side the grain tile covers

_CELL_PHRASES = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}


@dataclass(frozen=True, kw_only=True)
class Shape:
    """One shape of a scene; `row`/`col` is its grid cell (0 = top/left), `cx`/`cy`/`radius` are
    in pixels of the upright image."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    cx: int = 0
    cy: int = 0
    radius: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def cell_phrase(row: int, col: int) -> str:
    """Where a grid cell is, in words ("on the left", "in the top right corner")."""
    return _CELL_PHRASES[(row, col)]


def random_shapes(rng: np.random.Generator, count: int) -> list[Shape]:
    """`count` shapes in distinct grid cells with distinct (colour, shape) pairs."""
    cells = rng.permutation(9)[:count]
    pairs: set[tuple[str, str]] = set()
    shapes = []
    for cell in cells:
        while True:
            pair = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
            if pair not in pairs:
                break
        pairs.add(pair)
        size = "large" if rng.random() < 0.5 else "small"
        shapes.append(Shape(shape=pair[1], colour=pair[0], size=size, row=int(cell // 3), col=int(cell % 3)))
    return shapes


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    shapes: list[Shape],
    *,
    noise: int = 4,
    grey: tuple[float, float] = (70.0, 200.0),
) -> tuple[Image.Image, list[Shape]]:
    """Draw `shapes` on a fresh background.

    Args:
        noise: Film grain amplitude (0: none).
        grey: Range of the background's grey level (see `contrasting_grey` for grayscale images).

    Returns:
        The upright RGB image and the shapes with their pixel centres and radii.
    """
    image = _background(rng, width, height, grey)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    placed = []
    for shape in shapes:
        radius = SIZES[shape.size] * side
        slack = side / 6 - radius  # keep the shape inside its cell
        cx = left + (shape.col + 0.5) * side / 3 + rng.uniform(-slack, slack)
        cy = top + (shape.row + 0.5) * side / 3 + rng.uniform(-slack, slack)
        angle = rng.uniform(-12, 12)
        _draw_shape(draw, shape.shape, cx, cy, radius, angle, COLOURS[shape.colour])
        placed.append(Shape(**{**asdict(shape), "cx": round(cx), "cy": round(cy), "radius": round(radius)}))
    if noise > 0:
        # Film grain: a window of one fixed grain tile at a random offset (much cheaper than fresh
        # random numbers per image, and still deterministic).
        tile = _grain_tile(noise)
        ox, oy = int(rng.integers(tile.width - width + 1)), int(rng.integers(tile.height - height + 1))
        image = ImageChops.add(image, tile.crop((ox, oy, ox + width, oy + height)), scale=1.0, offset=-128)
    return image, placed


def contrasting_grey(shapes: list[Shape]) -> tuple[float, float]:
    """A background grey range far from every shape's luminance, so shapes stay visible in a
    grayscale image (where red on mid-grey would vanish)."""
    lumas = sorted(0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (COLOURS[s.colour] for s in shapes))
    # Candidate greys: the darkest and lightest backgrounds, and the middle of each gap between shapes.
    candidates = [20.0, 235.0] + [(a + b) / 2 for a, b in itertools.pairwise(lumas)]
    best = max(candidates, key=lambda g: min(abs(g - luma) for luma in lumas))
    return (max(20.0, best - 10), min(235.0, best + 10))


def _background(rng: np.random.Generator, width: int, height: int, grey_range: tuple[float, float]) -> Image.Image:
    """A muted two-colour gradient plus low-frequency texture: photo-like, never saturated.

    Built on a coarse grid and upsampled once (bilinear keeps a linear gradient linear), which is
    ~10x cheaper than full-resolution float arithmetic.
    """
    gw, gh = int(rng.integers(4, 10)), int(rng.integers(4, 10))
    grey = rng.uniform(*grey_range, size=2)
    c0, c1 = (grey[:, None] + rng.uniform(-25, 25, size=(2, 3))).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, math.sin(angle), gh)[:, None] + np.linspace(0, math.cos(angle), gw)[None, :]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    texture = rng.uniform(-1, 1, size=(gh, gw, 3)) * rng.uniform(6, 26)
    grid = c0 + t[..., None] * (c1 - c0) + texture
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    return small.resize((width, height), Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=4)
def _grain_tile(noise: int) -> Image.Image:
    """Uniform grain in [128 - noise, 128 + noise], 2x2-pixel grains, big enough for any image."""
    rng = np.random.default_rng([5_000_011, noise])
    grain = rng.integers(
        128 - noise, 128 + noise + 1, size=(_MAX_SIDE // 2 + 64, _MAX_SIDE // 2 + 64, 3), dtype=np.uint8
    )
    return Image.fromarray(grain).resize((grain.shape[1] * 2, grain.shape[0] * 2), Image.Resampling.NEAREST)


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill: tuple
) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        points = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif kind == "diamond":
        points = [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)]
    elif kind == "triangle":
        points = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    elif kind == "star":
        points = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = 1.0 if i % 2 == 0 else 0.45
            points.append((rr * math.cos(a), rr * math.sin(a)))
    elif kind == "cross":
        w = 0.36
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                  (-1, w), (-1, -w), (-w, -w)]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {kind!r}; valid: {', '.join(SHAPES)}")
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]
