"""Pretraining learns: the tiny preset on synthetic scenes, on the CPU, within a few minutes.

The captions say "a small red circle to the left of a blue square", so a masked colour or shape word can only be
recovered by looking at the image. Two runs on the same 4,000 scenes, each followed by held-out figures: masked-word
accuracy with each sample's own image against the same captions with another sample's image (the control), and the
alignment head on whole captions (`ap_whole_acc`, half of them another sample's).

- **On a pretrained vision stream** (`PRETRAINED_VISION`), the recipe this project is about: the original ViLBERT
  reads a detector trained on labelled objects, the thesis a timm ViT trained on ImageNet, both frozen. The tiny
  preset has no such weights offline, so the test makes them: a ViT with a conv stem trained on labelled one-object
  scenes that are not in the corpus (`train_vision_backbone`), then frozen. Alignment accuracy reaches 0.9, and
  colour and shape words are read off the image.
- **From scratch** (the `cpu` recipe, the demo's): colour words are read off the image and alignment prediction leaves
  chance, but the vision stream does not learn shapes from pretraining in this budget, so shape words stay near
  chance: a strict xfail, which fails loudly once a recipe makes it pass.
"""

from __future__ import annotations

import time

import pytest
import torch

from vilbert.cache import CacheReader
from vilbert.config import tiny
from vilbert.model import ViLBERT
from vilbert.overrides import apply_overrides
from vilbert.pipeline.synthetic.caches import scene_caches
from vilbert.recipes import CPU
from vilbert.train.backbone import save_vision_weights, train_on_synthetic_objects
from vilbert.train.checkpoint import load_checkpoint
from vilbert.train.pixels import PixelNormalizer
from vilbert.train.plot import plot_runs
from vilbert.train.pretrain import PretrainOptions, pretrain, run_config

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
CHANCE = 1 / 6

SAMPLES = 4000
OVERRIDES = [*CPU.overrides, "pretrain.epochs=10", "pretrain.log_every=10"]
PRETRAINED_VISION = [
    "model.vision.stem=conv",  # the tiny ViT alone reaches only 0.26-0.37 on shape labels in 800-2,000 steps
    "model.freeze=[vision]",  # trainable, pretraining overwrites the shape features (docs/results.md, appendix A)
    "pretrain.lr=2e-3",  # fewer parameters to train: 1e-3 read shape words at 0.29-0.64 by caption kind, 2e-3 0.36-0.73
    # MIM could only train the cross stack's side of a frozen stream, and its target view costs a second forward:
    "pretrain.tasks=[mlm,ap,itc]",
    "pretrain.ap_batch_size=32",
    "pretrain.epochs=8",  # held-out alignment 0.94 at step 800 of 1,000 already; this keeps the run inside 5 minutes
]
BACKBONE_IMAGES = 3200  # labelled one-object scenes (and 800 held out)
BACKBONE_STEPS = 600


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


def held_out_figures(run, test: CacheReader) -> dict[str, float]:
    """Masked colour and shape words with the own image and another one, from the run's last checkpoint."""
    model = ViLBERT(run_config(run).model)
    model.load_state_dict(load_checkpoint(run)["model"])
    return {
        "colour": masked_word_accuracy(model, test, COLOURS)[0],
        "shape": masked_word_accuracy(model, test, SHAPES)[0],
        "colour_other_image": masked_word_accuracy(model, test, COLOURS, other_image=True)[0],
        "shape_other_image": masked_word_accuracy(model, test, SHAPES, other_image=True)[0],
    }


def report(name: str, seconds: float, result, figures: dict[str, float]) -> None:
    """One line of a run's figures; `seconds` is what it took to train, the cache (and backbone) included."""
    last = result.last_eval
    print(
        f"\nlearning test, {name}: {seconds:.0f} s to train ({result.step} steps); held-out alignment acc "
        f"{last['ap_whole_acc']:.3f} with whole captions "
        f"({last['ap_acc']:.3f} on the task's masked captions), MLM acc {last['mlm_acc']:.3f}; masked word acc with "
        f"the own image / another image: colour {figures['colour']:.3f} / {figures['colour_other_image']:.3f}, "
        f"shape {figures['shape']:.3f} / {figures['shape_other_image']:.3f}; chance {CHANCE:.3f}"
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 4,000 synthetic scenes both runs train on, and how long the cache took."""
    root = tmp_path_factory.mktemp("learning")
    start = time.monotonic()
    cache = scene_caches(root / "cache", SAMPLES, seed=1)
    return {"root": root, "cache": cache, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def learned(scenes: dict) -> dict:
    """One tiny pretraining run from scratch (the `cpu` recipe), and its held-out figures."""
    start = time.monotonic()
    run = scenes["root"] / "run-from-scratch"
    options = PretrainOptions(data=scenes["cache"], run_dir=run, device="cpu")
    result = pretrain(apply_overrides(tiny(), OVERRIDES), options)
    seconds = scenes["seconds"] + time.monotonic() - start
    figures = held_out_figures(run, CacheReader(scenes["cache"] / "test"))
    report("from scratch", seconds, result, figures)
    return {"root": scenes["root"], "run": run, "result": result, **figures}


@pytest.fixture(scope="module")
def learned_on_pretrained_vision(scenes: dict) -> dict:
    """A vision stream trained on labelled one-object scenes, then frozen for pretraining (`PRETRAINED_VISION`)."""
    start = time.monotonic()
    config = apply_overrides(tiny(), [*OVERRIDES, *PRETRAINED_VISION])
    backbone = train_on_synthetic_objects(
        config.model.vision, images=BACKBONE_IMAGES, steps=BACKBONE_STEPS, init_std=config.model.initializer_range
    )
    weights = save_vision_weights(backbone.encoder, scenes["root"] / "vision" / "objects.safetensors")
    print(f"\nvision backbone: held-out accuracy {backbone.accuracy}, {backbone.steps} steps, {backbone.seconds:.0f} s")
    run = scenes["root"] / "run-pretrained-vision"
    config = apply_overrides(config, [f"model.vision.pretrained={weights}"])
    result = pretrain(config, PretrainOptions(data=scenes["cache"], run_dir=run, device="cpu"))
    seconds = scenes["seconds"] + time.monotonic() - start
    figures = held_out_figures(run, CacheReader(scenes["cache"] / "test"))
    report("on a pretrained, frozen vision stream", seconds, result, figures)
    return {"run": run, "result": result, **figures}


@pytest.mark.slow
def test_on_pretrained_vision_alignment_reaches_090(learned_on_pretrained_vision: dict) -> None:
    assert learned_on_pretrained_vision["result"].stopped == "completed"
    assert learned_on_pretrained_vision["result"].last_eval["ap_whole_acc"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["colour", "shape"])
def test_on_pretrained_vision_masked_words_are_read_off_the_image(learned_on_pretrained_vision: dict, kind) -> None:
    assert learned_on_pretrained_vision[kind] >= 2 * CHANCE
    assert learned_on_pretrained_vision[kind] >= learned_on_pretrained_vision[f"{kind}_other_image"] + 0.15


@pytest.mark.slow
def test_masked_colour_words_are_read_off_the_image(learned: dict) -> None:
    assert learned["result"].stopped == "completed"
    assert learned["colour"] >= 2 * CHANCE
    # The image is what gives the word away: with another sample's image the same captions fall back.
    assert learned["colour"] >= learned["colour_other_image"] + 0.15


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="from scratch, shape words stay near chance (0.17-0.22 after 1,000-3,000 steps): the cross stack reads "
    "shapes from a frozen vision stream trained on shape labels (the run above), but pretraining neither builds nor "
    "keeps shape features in the patches (see docs/results.md, appendix A)",
)
def test_masked_shape_words_are_read_off_the_image(learned: dict) -> None:
    assert learned["shape"] >= 2 * CHANCE
    assert learned["shape"] >= learned["shape_other_image"] + 0.15


@pytest.mark.slow
def test_alignment_prediction_leaves_chance(learned: dict) -> None:
    assert learned["result"].last_eval["ap_acc"] >= 0.7


@pytest.mark.slow
def test_plot_writes_the_curves_of_the_run(learned: dict, learned_on_pretrained_vision: dict) -> None:
    written = plot_runs([learned["run"], learned_on_pretrained_vision["run"]], learned["root"] / "plots")
    assert written and all(path.stat().st_size > 5000 for path in written)
