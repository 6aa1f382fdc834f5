"""The synthetic memes: Hateful Memes layout, and a label that needs both modalities."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from vilbert.errors import UsageError
from vilbert.pipeline.synthetic import generate_memes
from vilbert.pipeline.synthetic.scenes import COLOURS, SHAPES

SPLITS = ("train", "dev_seen", "test_seen")


@pytest.fixture(scope="module")
def memes(tmp_path_factory) -> Path:
    return generate_memes(tmp_path_factory.mktemp("memes") / "hm", 200, seed=3)


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def test_layout_like_hateful_memes(memes):
    counts = {s: len(_rows(memes, s)) for s in SPLITS}
    assert sum(counts.values()) == 200
    assert counts["train"] / 200 == pytest.approx(0.85, abs=0.03)
    assert counts["test_seen"] / 200 == pytest.approx(0.10, abs=0.02)
    ids = set()
    for split in SPLITS:
        for row in _rows(memes, split):
            assert list(row) == ["id", "img", "label", "text"]
            assert isinstance(row["id"], int) and row["label"] in (0, 1)
            assert re.fullmatch(r"img/\d{5}\.(png|jpg)", row["img"]) and row["img"].startswith(f"img/{row['id']:05d}")
            ids.add(row["id"])
            with Image.open(memes / row["img"]) as image:
                image.verify()
    assert len(ids) == 200


def _label_rate_by(memes: Path, split: str, key) -> dict:
    groups = defaultdict(list)
    for row in _rows(memes, split):
        groups[key(row)].append(row["label"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


@pytest.mark.parametrize("split", SPLITS)
def test_text_alone_and_image_alone_are_at_chance(memes, split):
    """Every text and every image (by content) occurs equally often with each label, so any
    predictor that sees one modality only - a lookup table included - scores exactly 50%."""
    by_text = _label_rate_by(memes, split, lambda r: r["text"])
    by_image = _label_rate_by(memes, split, lambda r: hashlib.sha256((memes / r["img"]).read_bytes()).hexdigest())
    assert set(by_text.values()) == {0.5}
    assert set(by_image.values()) == {0.5}
    rows = _rows(memes, split)
    assert sum(r["label"] for r in rows) * 2 == len(rows)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_a_lookup_table_trained_on_train_scores_chance_on_test(memes, modality):
    """The strongest one-modality predictor: memorise the majority label per text (or per image
    content) on train, fall back to train's majority label, and score it on dev and test."""

    def key(row):
        return row["text"] if modality == "text" else hashlib.sha256((memes / row["img"]).read_bytes()).digest()

    votes = defaultdict(list)
    for row in _rows(memes, "train"):
        votes[key(row)].append(row["label"])
    fallback = int(sum(r["label"] for r in _rows(memes, "train")) * 2 >= len(_rows(memes, "train")))
    for split in ("dev_seen", "test_seen"):
        rows = _rows(memes, split)
        predictions = [int(sum(votes[key(r)]) * 2 > len(votes[key(r)])) if votes[key(r)] else fallback for r in rows]
        assert sum(p == r["label"] for p, r in zip(predictions, rows, strict=True)) / len(rows) == 0.5


def _find(shapes: list[dict], ref: str) -> dict:
    words = ref.removeprefix("the ").split()
    found = [s for s in shapes if all(w in ("shape", s["colour"], s["shape"]) for w in words)]
    assert len(found) == 1, (ref, shapes)
    return found[0]


_REF = r"the (?:\w+ )?\w+"
_CLAIMS = [
    (re.compile(rf"({_REF}) is on the (left|right)"), lambda a, side, s: (a["col"] == 0) == (side == "left")),
    (re.compile(rf"({_REF}) is (above|below) ({_REF})"),
     lambda a, rel, b, s: (a["row"] < b["row"]) == (rel == "above")),
    (re.compile(rf"the ({'|'.join(SHAPES)}) is ({'|'.join(COLOURS)})"),
     lambda kind, colour, s: _find(s, f"the {kind}")["colour"] == colour),
    (re.compile(rf"({_REF}) is (bigger|smaller) than ({_REF})"),
     lambda a, rel, b, s: (a["size"] == "large") == (rel == "bigger")),
    (re.compile(rf"there is an? ({'|'.join(COLOURS)}) (\w+)"),
     lambda colour, noun, s: any(x["colour"] == colour and noun in ("shape", x["shape"]) for x in s)),
]  # fmt: skip


def _oracle(text: str, shapes: list[dict]) -> int:
    """Reads the claim and checks it against the scene: image and text together."""
    for pattern, truth in _CLAIMS:
        match = pattern.search(text)
        if match:
            args = [_find(shapes, g) if g.startswith("the ") else g for g in match.groups()]
            if pattern in (_CLAIMS[2][0], _CLAIMS[4][0]):
                args = list(match.groups())
            return int(truth(*args, shapes))
    raise AssertionError(f"no claim in {text!r}")


def test_both_modalities_together_decide_the_label(memes):
    meta = {m["id"]: m for m in map(json.loads, (memes / "synth.jsonl").read_text().splitlines())}
    for split in SPLITS:
        for row in _rows(memes, split):
            assert _oracle(row["text"], meta[row["id"]]["shapes"]) == row["label"], row
    assert {m["family"] for m in meta.values()} == {"horizontal", "vertical", "colour", "size", "presence"}


def test_same_seed_same_bytes(tmp_path):
    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(generate_memes(tmp_path / "a", 24, seed=1)) == tree(generate_memes(tmp_path / "b", 24, seed=1))


def test_too_few_samples_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="at least 12"):
        generate_memes(tmp_path / "m", 8)
