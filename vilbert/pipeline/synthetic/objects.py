"""Labelled one-object scenes: the offline stand-in for the labelled images a real vision backbone is
trained on (ImageNet for timm's ViTs; Visual Genome's objects and attributes for the detector whose
features the original ViLBERT reads).

Each image is a scene of the synthetic corpus with a single shape, labelled with its shape and colour.
The seeds are disjoint from the corpus's (`generate_corpus` seeds its scenes with `[seed, index]`; these
with `[OBJECTS_SEED, seed, index]`), so a backbone trained here never sees a corpus image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vilbert.pipeline.synthetic.scenes import COLOURS, SHAPES, random_shapes, render_scene

__all__ = ["LABELS", "LabelledImages", "render_objects"]

OBJECTS_SEED = 7_919
LABELS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS)}
"""The label sets and their class names, in class-id order."""


@dataclass(frozen=True)
class LabelledImages:
    """`pixels`: `(N, 3, S, S)` uint8; `labels`: label set -> `(N,)` int64 class ids (see `LABELS`)."""

    pixels: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.pixels)


def render_objects(count: int, size: int, seed: int) -> LabelledImages:
    """`count` one-shape scenes of `size` x `size` pixels; same seed, same images."""
    if count < 1 or size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got count={count}, size={size}")
    pixels = np.empty((count, 3, size, size), np.uint8)
    labels = {name: np.empty(count, np.int64) for name in LABELS}
    for i in range(count):
        rng = np.random.default_rng([OBJECTS_SEED, seed, i])
        (shape,) = random_shapes(rng, 1)
        image, _ = render_scene(rng, size, size, [shape])
        pixels[i] = np.asarray(image).transpose(2, 0, 1)
        labels["shape"][i] = SHAPES.index(shape.shape)
        labels["colour"][i] = LABELS["colour"].index(shape.colour)
    return LabelledImages(pixels=pixels, labels=labels)
