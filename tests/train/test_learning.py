"""Pretraining learns: the tiny preset on synthetic scenes, on the CPU, within a few minutes.

The captions say "a small red circle to the left of a blue square", so a masked colour word can only be
recovered by looking at the image: one training run, then the held-out masked-word accuracy with each
sample's own image against the same captions with another sample's image (the control), and the
curves `vilbert plot` draws. Alignment prediction leaves chance (with the image-text contrastive task)
but does not reach 0.9 in this budget, and masked shape words stay near chance: those two tests are
strict xfails, so they fail loudly once a recipe makes them pass.
"""

from __future__ import annotations

import time

import pytest
import torch

from vilbert.cache import CacheReader
from vilbert.config import CPU_RECIPE, apply_overrides, tiny
from vilbert.model import ViLBERT
from vilbert.train.checkpoint import load_checkpoint
from vilbert.train.masking import PixelNormalizer
from vilbert.train.plot import plot_runs
from vilbert.train.pretrain import PretrainOptions, pretrain, run_config

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
CHANCE = 1 / 6

SAMPLES = 4000
OVERRIDES = [*CPU_RECIPE, "pretrain.epochs=10", "pretrain.log_every=10"]


def masked_word_accuracy(
    model: ViLBERT, reader: CacheReader, words: tuple[str, ...], *, other_image: bool = False
) -> tuple[float, int]:
    """Mask each occurrence of `words` in the split's captions, one at a time; the top-1 accuracy over the
    whole vocabulary at that position, with the sample's own image (or, with `other_image`, the next
    sample's: the control that shows the word is read off the picture)."""
    tokenizer = reader.tokenizer()
    targets = torch.tensor([tokenizer.token_to_id(w) for w in words])
    assert (targets >= 0).all(), "every word is one token of the cache's tokenizer"
    data = reader.gather(list(range(len(reader))))
    ids = torch.from_numpy(data["input_ids"]).long()
    lengths = torch.from_numpy(data["num_tokens"]).long()
    pixels = PixelNormalizer(model.image_mean, model.image_std, "cpu").model_input(torch.from_numpy(data["pixels"]))
    if other_image:
        pixels = pixels.roll(1, dims=0)
    rows, cols = torch.nonzero(torch.isin(ids, targets), as_tuple=True)
    mask_id = reader.manifest.special_token_ids["mask"]
    hits = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            r, c = rows[start : start + 256], cols[start : start + 256]
            n = torch.arange(len(r))
            masked = ids[r].clone()
            masked[n, c] = mask_id
            attention = (torch.arange(ids.shape[1])[None, :] < lengths[r][:, None]).long()
            out = model(masked, attention, pixels[r])
            hits += (model.mlm_logits(out.text[n, c]).argmax(-1) == ids[r, c]).sum().item()
    return hits / len(rows), len(rows)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny pretraining run on 4,000 synthetic scenes, and its held-out figures."""
    from .conftest import build_synthetic_cache

    root = tmp_path_factory.mktemp("learning")
    start = time.monotonic()
    cache = build_synthetic_cache(root / "cache", SAMPLES, seed=1)
    run = root / "run"
    result = pretrain(apply_overrides(tiny(), OVERRIDES), PretrainOptions(data=cache, run_dir=run, device="cpu"))
    trained_s = time.monotonic() - start
    model = ViLBERT(run_config(run).model)
    model.load_state_dict(load_checkpoint(run)["model"])
    test = CacheReader(cache / "test")
    figures = {
        "colour": masked_word_accuracy(model, test, COLOURS)[0],
        "shape": masked_word_accuracy(model, test, SHAPES)[0],
        "colour_other_image": masked_word_accuracy(model, test, COLOURS, other_image=True)[0],
        "shape_other_image": masked_word_accuracy(model, test, SHAPES, other_image=True)[0],
    }
    print(
        f"\nlearning test: {trained_s:.0f} s to build the cache and train {result.step} steps; held-out "
        f"AP acc {result.last_eval['ap_acc']:.3f}, MLM acc {result.last_eval['mlm_acc']:.3f}; masked word acc "
        f"with the own image / another image: colour {figures['colour']:.3f} / {figures['colour_other_image']:.3f}, "
        f"shape {figures['shape']:.3f} / {figures['shape_other_image']:.3f}; chance {CHANCE:.3f}"
    )
    return {"root": root, "run": run, "result": result, **figures}


@pytest.mark.slow
def test_masked_colour_words_are_read_off_the_image(learned: dict) -> None:
    assert learned["result"].stopped == "completed"
    assert learned["colour"] >= 2 * CHANCE
    # The image is what gives the word away: with another sample's image the same captions fall back.
    assert learned["colour"] >= learned["colour_other_image"] + 0.15


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="shape words stay near chance (0.17-0.22 after 1,000-3,000 steps): the cross stack reads shapes from a "
    "frozen vision stream trained on shape labels (0.805 in one-shape captions), but pretraining neither builds nor "
    "keeps shape features in the patches (see vilbert/train/README.md, 'What learns on a CPU')",
)
def test_masked_shape_words_are_read_off_the_image(learned: dict) -> None:
    assert learned["shape"] >= 2 * CHANCE
    assert learned["shape"] >= learned["shape_other_image"] + 0.15


@pytest.mark.slow
def test_alignment_prediction_leaves_chance(learned: dict) -> None:
    assert learned["result"].last_eval["ap_acc"] >= 0.7


@pytest.mark.slow
def test_plot_writes_the_curves_of_the_run(learned: dict) -> None:
    written = plot_runs([learned["run"]], learned["root"] / "plots")
    assert written and all(path.stat().st_size > 5000 for path in written)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="with ITC the tiny model leaves chance on alignment prediction but stops short of 0.9 in the CPU "
    "budget (held-out AP 0.75-0.87 after 1,000 steps, 0.90 after ~2,100; a colour-only judge would score 0.91; see "
    "vilbert/train/README.md, 'What learns on a CPU')",
)
def test_alignment_prediction_reaches_090(learned: dict) -> None:
    assert learned["result"].last_eval["ap_acc"] >= 0.9
