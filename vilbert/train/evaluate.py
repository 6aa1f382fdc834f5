"""Load a model from any checkpoint, and evaluate it on a cache split.

    CHECKPOINT (pretraining or fine-tuning run dir / step-*.pt, or an exported model dir)
        -> load_model -> LoadedModel(model, config, kind)
    CACHE_DIR -> predict (one pass, eval mode) -> classifier and alignment logits per row
        -> binary_metrics (loss, accuracy, exact AUROC) of the classifier when the cache has labels,
           the alignment head's score as a zero-shot classifier of the same labels,
           and for a pretraining checkpoint the per-task pretraining metrics (MLM, AP, MIM)

Nothing here writes files or prints: `evaluate` returns a JSON-ready dict the CLI renders.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vilbert.cache import MANIFEST_NAME, BatchLoader, CacheReader, is_cache
from vilbert.config import Config, config_from_dict
from vilbert.errors import CacheError, CheckpointError
from vilbert.model import ViLBERT
from vilbert.model.vilbert import CONFIG_NAME, WEIGHTS_NAME
from vilbert.train.checkpoint import load_checkpoint, model_from_checkpoint
from vilbert.train.distributed import resolve_device
from vilbert.train.masking import PixelNormalizer, SpecialTokens
from vilbert.train.metrics import Accumulator
from vilbert.train.pretrain import CHECKPOINT_FORMAT as PRETRAIN_FORMAT
from vilbert.train.pretrain import _normalizer, open_split
from vilbert.train.scoring import binary_metrics
from vilbert.train.tasks import PretrainObjective, build_task_batch, summarize, whole_caption_alignment

__all__ = [
    "FINETUNE_FORMAT",
    "LoadedModel",
    "Predictions",
    "load_model",
    "open_cache",
    "check_compatible",
    "pixel_normalizer",
    "model_inputs",
    "predict",
    "pretraining_metrics",
    "evaluate",
]

log = logging.getLogger(__name__)

FINETUNE_FORMAT = "vilbert-finetune/1"
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model and where it came from.

    Attributes:
        model: The model, in eval mode, on the requested device.
        kind: `pretrain`, `finetune` or `export` (a `save_pretrained` directory).
        path: The checkpoint file or export directory read.
        config: The run's whole config (None for an export, which stores only the model section).
        step: Optimizer steps of the run at that checkpoint (None for an export).
        state: The checkpoint dict minus the weights (metadata: data path, epoch, ...).
    """

    model: ViLBERT
    kind: str
    path: Path
    config: Config | None
    step: int | None
    state: dict[str, Any]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a pretraining or fine-tuning checkpoint (file or run directory: its newest), or of
    a directory written by `save_pretrained` / `vilbert export`.

    Raises:
        CheckpointError: Nothing loadable at `path`, a checkpoint of an unknown format, or weights that
            do not fit its config.
    """
    path = Path(path)
    device = torch.device(device)
    if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
        model = ViLBERT.from_pretrained(path).to(device).eval()
        return LoadedModel(model=model, kind="export", path=path, config=None, step=None, state={})
    state = load_checkpoint(path, map_location="cpu")
    fmt = state.get("format")
    kinds = {PRETRAIN_FORMAT: "pretrain", FINETUNE_FORMAT: "finetune"}
    if fmt not in kinds:
        raise CheckpointError(
            f"{state['path']} has format {fmt!r}; valid: {', '.join(kinds)} (or an exported model directory "
            f"with {WEIGHTS_NAME} and {CONFIG_NAME})"
        )
    model = model_from_checkpoint(state)
    config = config_from_dict(state["config"])
    state.pop("model")
    for key in ("optimizer", "scheduler", "rng"):
        state.pop(key, None)
    model.to(device).eval()
    return LoadedModel(
        model=model, kind=kinds[fmt], path=Path(state["path"]), config=config, step=int(state["step"]), state=state
    )


def open_cache(path: str | Path) -> CacheReader:
    """One cache directory; a cache *root* gets an error naming the splits inside it.

    Raises:
        CacheError: `path` is not a cache.
    """
    path = Path(path)
    if is_cache(path):
        return CacheReader(path)
    splits = sorted(p.name for p in path.iterdir() if is_cache(p)) if path.is_dir() else []
    hint = f"; it holds the caches {', '.join(splits)}: pass one, e.g. {path / splits[0]}" if splits else ""
    raise CacheError(f"{path} is not a cache directory (no {MANIFEST_NAME}){hint}")


def pixel_normalizer(reader: CacheReader, model: ViLBERT, device: torch.device) -> PixelNormalizer:
    """Stored pixels -> model input, refusing a float16 cache normalized unlike the vision weights."""
    return _normalizer(reader, model, device)


def model_inputs(batch: Any, normalizer: PixelNormalizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask, pixels)` for `ViLBERT.forward` from a cache `Batch`."""
    ids = batch.input_ids.long()
    positions = torch.arange(ids.shape[1], device=ids.device)
    attention_mask = (positions[None, :] < batch.num_tokens.long()[:, None]).long()
    return ids, attention_mask, normalizer.model_input(batch.pixels)


def check_compatible(loaded: LoadedModel, reader: CacheReader) -> None:
    """Refuse a cache the model cannot read: a larger vocabulary, another image size, or (when the
    checkpoint's training data can still be opened) another tokenizer than the model was trained with.

    Raises:
        CacheError: Naming both sides of the mismatch.
    """
    config, where = loaded.model.config, reader.paths[0]
    if reader.manifest.vocab_size > config.text.vocab_size:
        raise CacheError(
            f"{where} has a {reader.manifest.vocab_size}-token tokenizer but {loaded.path} a "
            f"{config.text.vocab_size}-token vocabulary; use a cache built with the model's tokenizer"
        )
    if reader.image_size != config.vision.image_size:
        raise CacheError(
            f"{where} holds {reader.image_size}px images, {loaded.path} expects {config.vision.image_size}px"
        )
    source = loaded.state.get("data")
    trained_on = _try_open_train(source) if source else None
    if trained_on is None:
        log.info("cannot compare tokenizers with %s's training data (%s)", loaded.path, source or "not recorded")
    elif trained_on.tokenizer_fingerprint != reader.tokenizer_fingerprint:
        raise CacheError(
            f"{where} was built with another tokenizer than {loaded.path}'s training data {source}; "
            "use the same tokenizer.json for both"
        )


def _try_open_train(path: str) -> CacheReader | None:
    try:
        return open_split(Path(path), "train")
    except (CacheError, OSError):
        return None


@dataclass(frozen=True)
class Predictions:
    """Per-row outputs of one pass over a split: `classify` and `alignment` logits `(N, 2)`, `labels`
    `(N,)` or None, and the mean classifier `loss` is left to `binary_metrics`."""

    classify: torch.Tensor
    alignment: torch.Tensor
    labels: torch.Tensor | None


@torch.no_grad()
def predict(
    model: ViLBERT,
    reader: CacheReader,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    normalizer: PixelNormalizer | None = None,
) -> Predictions:
    """Classifier and alignment logits of every row (in row order), in eval mode; restores the mode."""
    device = torch.device(device)
    normalizer = normalizer or pixel_normalizer(reader, model, device)
    loader = BatchLoader(reader, batch_size, shuffle=False, drop_last=False, device=device)
    was_training = model.training
    model.eval()
    classify, alignment, labels = [], [], []
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                out = model(*model_inputs(batch, normalizer))
                classify.append(model.classify(out).float().cpu())
                alignment.append(model.alignment_logits(out).float().cpu())
                if batch.labels is not None:
                    labels.append(batch.labels.cpu())
    finally:
        model.train(was_training)
    empty = torch.empty(0, 2)
    return Predictions(
        classify=torch.cat(classify) if classify else empty,
        alignment=torch.cat(alignment) if alignment else empty,
        labels=torch.cat(labels) if labels else None,
    )


@torch.no_grad()
def pretraining_metrics(
    model: ViLBERT,
    reader: CacheReader,
    config: Config,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Per-task loss and accuracy of the pretraining tasks (`config.pretrain.tasks`) on a split, with
    masks drawn from a generator seeded with `seed` (the same masks on every call); with AP also
    `ap_whole_acc`, the alignment head on whole captions (`tasks.whole_caption_alignment`)."""
    device = torch.device(device)
    normalizer = pixel_normalizer(reader, model, device)
    cfg = dataclasses.replace(config.pretrain, augment=False)  # measure the task, not the augmentation
    objective = PretrainObjective(model, cfg).eval()
    special = SpecialTokens.from_dict(reader.manifest.special_token_ids)
    generator = torch.Generator(device=device).manual_seed(seed)
    swaps = torch.Generator(device=device).manual_seed(seed + 104_729)
    loader = BatchLoader(reader, batch_size, shuffle=False, drop_last=False, device=device)
    sums = Accumulator()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            tasks = build_task_batch(
                batch.pixels,
                batch.input_ids,
                batch.num_tokens,
                config=cfg,
                special=special,
                vocab_size=reader.manifest.vocab_size,
                num_patches=model.num_patches,
                normalizer=normalizer,
                generator=generator,
            )
            sums.add(objective(tasks).sums)
            if "ap" in cfg.tasks:
                pixels = normalizer.model_input(batch.pixels)
                sums.add(whole_caption_alignment(model, pixels, batch.input_ids, batch.num_tokens, generator=swaps))
    return summarize(sums.totals(), cfg)


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    batch_size: int = 64,
    device: str = "auto",
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Metrics of a checkpoint on one cache split.

    Returns:
        `{"checkpoint", "kind", "step", "data", "split", "rows", "classifier", "alignment",
        "pretraining"}`: `classifier` (loss, accuracy, AUROC of `model.classify`) and `alignment`
        (the alignment head's score as a zero-shot classifier of the labels) when the cache has
        labels, else None; `pretraining` (per-task metrics) for pretraining checkpoints, else None.
    """
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev)
    reader = open_cache(data)
    check_compatible(loaded, reader)
    report: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "kind": loaded.kind,
        "step": loaded.step,
        "data": str(Path(data)),
        "split": reader.manifest.split,
        "rows": len(reader),
        "classifier": None,
        "alignment": None,
        "pretraining": None,
    }
    if reader.has_labels:
        preds = predict(loaded.model, reader, batch_size=batch_size, device=dev, max_batches=max_batches)
        report["classifier"] = binary_metrics(preds.classify, preds.labels)
        report["alignment"] = binary_metrics(preds.alignment, preds.labels)
        if progress is not None:
            progress({"kind": "stage", "done": "classification"})
    if loaded.kind == "pretrain" and loaded.config is not None:
        report["pretraining"] = pretraining_metrics(
            loaded.model,
            reader,
            loaded.config,
            batch_size=batch_size,
            device=dev,
            max_batches=max_batches,
            seed=loaded.config.pretrain.seed,
        )
    return report
