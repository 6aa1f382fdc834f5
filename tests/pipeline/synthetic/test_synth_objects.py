"""Labelled one-object scenes: deterministic, and every label is true of its image."""

from __future__ import annotations

import numpy as np
import pytest

from vilbert.pipeline.synthetic.objects import LABELS, render_objects
from vilbert.pipeline.synthetic.scenes import COLOURS


def test_same_seed_same_images_and_another_seed_others():
    first, again, other = render_objects(12, 32, seed=3), render_objects(12, 32, seed=3), render_objects(12, 32, seed=4)
    assert first.pixels.shape == (12, 3, 32, 32) and first.pixels.dtype == np.uint8 and len(first) == 12
    assert np.array_equal(first.pixels, again.pixels)
    assert all(np.array_equal(first.labels[k], again.labels[k]) for k in LABELS)
    assert not np.array_equal(first.pixels, other.pixels)


def test_labels_are_class_ids_and_the_colour_label_is_the_shapes_colour():
    images = render_objects(60, 64, seed=0)
    for name, classes in LABELS.items():
        assert images.labels[name].min() >= 0 and images.labels[name].max() < len(classes)
    assert len(set(images.labels["shape"].tolist())) == 6  # 60 draws cover the six shapes
    palette = np.array(list(COLOURS.values()), dtype=np.float64)  # (6, 3), in LABELS["colour"] order
    for pixels, colour in zip(images.pixels, images.labels["colour"], strict=True):
        rgb = pixels.reshape(3, -1).T.astype(np.float64)
        distance = np.linalg.norm(rgb[:, None, :] - palette[None], axis=-1)  # (pixels, 6)
        near = (distance < 30).sum(0)  # pixels within grain of each palette colour
        assert near.argmax() == colour and near[colour] >= 40  # a small shape is ~130 px at 64x64


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="count >= 1"):
        render_objects(0, 64, seed=0)
