"""Natural-sentence captions for scenes: every colour, shape, size and position word in a caption is
true of the image, so masked-word prediction and image-caption alignment are learnable."""

from __future__ import annotations

import numpy as np

from vilbert.pipeline.synthetic.scenes import Shape, cell_phrase

__all__ = ["describe", "noun_phrase", "relation"]

_ONE = (
    "{a} {pos}",
    "a photo of {a} {pos}",
    "there is {a} {pos}",
    "{a} {pos} on a textured background",
    "an image with {a} {pos}",
)
_TWO = (
    "{a} {rel} {b}",
    "a photo of {a} {rel} {b}",
    "there is {a} {rel} {b}",
    "{a} and {b}, with the {na} {rel} the {nb}",
)
_THREE = (
    "{a} {rel} {b}, and {c} {pos}",
    "a photo of {a} {rel} {b} and {c} {pos}",
    "three shapes: {a}, {b} and {c}",
)


def noun_phrase(shape: Shape, *, with_size: bool = True, with_colour: bool = True) -> str:
    """'a large red circle', 'an orange star', 'a small square'."""
    words = ([shape.size] if with_size else []) + ([shape.colour] if with_colour else []) + [shape.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def relation(a: Shape, b: Shape) -> str:
    """Where `a` is relative to `b`: left/right when their columns differ, else above/below."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def describe(shapes: list[Shape], rng: np.random.Generator, *, colour: bool = True) -> str:
    """A caption for a scene of one to three shapes (`colour=False` for grayscale images)."""
    order = [shapes[i] for i in rng.permutation(len(shapes))]
    phrases = [noun_phrase(s, with_size=rng.random() < 0.75, with_colour=colour) for s in order]
    fields = {"a": phrases[0], "pos": cell_phrase(order[-1].row, order[-1].col)}
    if len(order) == 1:
        templates = _ONE
    else:
        fields.update(b=phrases[1], rel=relation(order[0], order[1]))
        fields.update(_short_names(order[0], order[1], colour))
        if len(order) == 3:
            fields["c"] = phrases[2]
            templates = _THREE
        else:
            templates = _TWO if "na" in fields else _TWO[:3]
    if not colour:
        return "a black and white photo of " + templates[0].format(**fields)
    return templates[int(rng.integers(len(templates)))].format(**fields)


def _short_names(a: Shape, b: Shape, colour: bool) -> dict[str, str]:
    """How to refer back to two shapes ('the circle ... the square'), if they can be told apart."""
    if a.shape != b.shape:
        return {"na": a.shape, "nb": b.shape}
    if colour:
        return {"na": f"{a.colour} {a.shape}", "nb": f"{b.colour} {b.shape}"}
    return {}
