"""The synthetic corpus: determinism, file variety, upright EXIF, captions true of the pixels."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image, ImageOps

from vilbert.errors import UsageError
from vilbert.pipeline.synthetic import generate_corpus, read_corpus, write_cc_tsv
from vilbert.pipeline.synthetic.captions import describe, relation
from vilbert.pipeline.synthetic.scenes import COLOURS, SHAPES, Shape


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    one = generate_corpus(tmp_path / "one", 40, seed=7, workers=1)
    two = generate_corpus(tmp_path / "two", 40, seed=7, workers=2)
    other = generate_corpus(tmp_path / "other", 40, seed=8, workers=1)
    assert _tree(one) == _tree(two)
    assert len(_tree(one)) == 40 + 2
    assert _tree(one)["cc.tsv"] != _tree(other)["cc.tsv"]


def test_every_kind_of_file_is_present(synth_corpus):
    records = read_corpus(synth_corpus)
    assert len(records) == 60  # conftest.CORPUS_N
    kinds = {(r["format"], r["mode"]) for r in records}
    assert kinds >= {("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P")}
    assert any(r["exif_orientation"] for r in records)
    assert {len(r["shapes"]) for r in records} == {1, 2, 3}
    assert len({r["quality"] for r in records if r["format"] == "JPEG"}) > 10
    for r in records:
        assert min(r["width"], r["height"]) >= 200 and max(r["width"], r["height"]) <= 1200
        with Image.open(synth_corpus / "images" / r["file"]) as image:
            assert (image.format, image.mode) == (r["format"], r["mode"])
    assert len({round(max(r["width"], r["height"]) / min(r["width"], r["height"]), 1) for r in records}) >= 4


def _upright_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def test_exif_tagged_images_come_out_upright(synth_corpus):
    tagged = [r for r in read_corpus(synth_corpus) if r["exif_orientation"]]
    assert tagged
    for r in tagged:
        with Image.open(synth_corpus / "images" / r["file"]) as raw:
            assert raw.getexif()[0x0112] == r["exif_orientation"]
        image = _upright_rgb(synth_corpus / "images" / r["file"])
        assert image.size == (r["width"], r["height"])
        for s in r["shapes"]:
            assert _near(image.getpixel((s["cx"], s["cy"])), COLOURS[s["colour"]], 60), (r["file"], s)


def _near(pixel, colour, tolerance: int) -> bool:
    return max(abs(int(p) - c) for p, c in zip(pixel, colour, strict=True)) <= tolerance


def test_shapes_survive_centre_crop_to_64(synth_corpus):
    """Resize the shorter side to 64 and centre-crop: every shape's centre keeps its colour."""
    for r in read_corpus(synth_corpus):
        image = _upright_rgb(synth_corpus / "images" / r["file"])
        small = np.asarray(ImageOps.fit(image, (64, 64), Image.Resampling.BICUBIC), dtype=np.int32)
        scale, side = 64 / min(image.size), min(image.size)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        for s in r["shapes"]:
            x, y = round((s["cx"] - left) * scale), round((s["cy"] - top) * scale)
            assert 2 <= x < 62 and 2 <= y < 62, (r["file"], s)
            patch = small[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            if r["mode"] == "L":
                luma = np.dot(COLOURS[s["colour"]], [0.299, 0.587, 0.114])
                assert abs(patch.mean() - luma) < 25, (r["file"], s)
                assert abs(patch.mean() - np.median(small)) > 40, "visible against the background"
            else:
                assert _near(patch, COLOURS[s["colour"]], 70), (r["file"], s, patch)


_NOUN = re.compile(r"\b(?:a|an) (?:(small|large) )?(?:(" + "|".join(COLOURS) + r") )?(" + "|".join(SHAPES) + r")\b")
_REL = re.compile(r"\b(to the left of|to the right of|above|below)\b")


def test_captions_name_exactly_the_shapes(synth_corpus):
    for r in read_corpus(synth_corpus):
        shapes = [Shape(**s) for s in r["shapes"]]
        nouns = _NOUN.findall(r["caption"])
        assert len(nouns) == len(shapes), r["caption"]
        for size, colour, kind in nouns:
            matches = [s for s in shapes if s.shape == kind and colour in ("", s.colour) and size in ("", s.size)]
            assert matches, (r["caption"], r["shapes"])
        if r["mode"] == "L":
            assert r["caption"].startswith("a black and white photo of ") and not any(n[1] for n in nouns)
        else:
            assert all(n[1] for n in nouns), r["caption"]
        assert "\t" not in r["caption"] and "\n" not in r["caption"]


def test_relation_words_are_true():
    rng = np.random.default_rng(0)
    a = Shape(shape="circle", colour="red", size="large", row=1, col=0)
    b = Shape(shape="square", colour="blue", size="small", row=1, col=2)
    c = Shape(shape="star", colour="green", size="small", row=0, col=0)
    assert relation(a, b) == "to the left of" and relation(b, a) == "to the right of"
    assert relation(c, a) == "above" and relation(a, c) == "below"
    for _ in range(50):
        caption = describe([a, b], rng)
        first = _NOUN.search(caption).group(3)
        expected = "to the left of" if first == "circle" else "to the right of"
        assert _REL.search(caption).group(1) == expected, caption


def test_cc_tsv_lists_every_image_and_some_missing(synth_corpus, tmp_path):
    records = {r["file"]: r for r in read_corpus(synth_corpus)}
    lines = (synth_corpus / "cc.tsv").read_text(encoding="utf-8").splitlines()
    urls = [line.split("\t") for line in lines]
    assert all(len(parts) == 2 for parts in urls)
    files = [urlsplit(url).path.removeprefix("/images/") for _, url in urls]
    assert all(url.startswith("http://127.0.0.1:8765/images/") for _, url in urls)
    assert sorted(f for f in files if f in records) == sorted(records)
    missing = [f for f in files if f not in records]
    assert 1 <= len(missing) <= 0.05 * len(records) + 1
    assert not any((synth_corpus / "images" / f).exists() for f in missing)
    for caption, url in urls:
        name = urlsplit(url).path.rsplit("/", 1)[1]
        if name in records:
            assert caption == records[name]["caption"]
    out = write_cc_tsv(synth_corpus, "http://127.0.0.1:9999/", tmp_path / "moved.tsv")
    moved = out.read_text(encoding="utf-8").splitlines()
    assert moved == [line.replace("127.0.0.1:8765", "127.0.0.1:9999") for line in lines]


def test_out_dir_must_be_empty_unless_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        generate_corpus(out, 3)
    generate_corpus(out, 3, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert len(read_corpus(out)) == 3
    with pytest.raises(UsageError, match="at least 1"):
        generate_corpus(tmp_path / "d", 0)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_stored_transpose_is_undone_by_the_exif_tag(orientation, tmp_path):
    from vilbert.pipeline.synthetic.corpus import _UNDO_ORIENTATION

    upright = Image.fromarray(np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3))  # 3 wide, 5 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(_UNDO_ORIENTATION[orientation]).save(tmp_path / "x.png", exif=exif.tobytes())
    with Image.open(tmp_path / "x.png") as stored:
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(stored)), np.asarray(upright))
