"""Evaluate a model on a cache split.

    CHECKPOINT (pretraining or fine-tuning run dir / step-*.pt, or an exported model dir)
        -> load_model (loading.py) -> LoadedModel(model, config, kind)
    CACHE_DIR -> predict (one pass, eval mode) -> classifier and alignment logits per row
        -> binary_metrics (loss, accuracy, exact AUROC) of the classifier when the cache has labels,
           the alignment head's score as a zero-shot classifier of the same labels,
           and for a pretraining checkpoint the per-task pretraining metrics (MLM, AP, MIM)

Nothing here writes files or prints: `evaluate` returns a JSON-ready dict the CLI renders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vilbert.cache import BatchLoader, CacheReader
from vilbert.config import Config
from vilbert.model import ViLBERT
from vilbert.train.distributed import resolve_device
from vilbert.train.loading import check_compatible, load_model
from vilbert.train.masking import SpecialTokens
from vilbert.train.metrics import Accumulator
from vilbert.train.pixels import PixelNormalizer, pixel_normalizer
from vilbert.train.scoring import binary_metrics
from vilbert.train.splits import open_cache
from vilbert.train.tasks import PretrainObjective, build_task_batch, summarize, whole_caption_alignment

__all__ = ["Predictions", "model_inputs", "predict", "pretraining_sums", "pretraining_metrics", "evaluate"]

Progress = Callable[[dict[str, Any]], None]


def model_inputs(batch: Any, normalizer: PixelNormalizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask, pixels)` for `ViLBERT.forward` from a cache `Batch`."""
    ids = batch.input_ids.long()
    positions = torch.arange(ids.shape[1], device=ids.device)
    attention_mask = (positions[None, :] < batch.num_tokens.long()[:, None]).long()
    return ids, attention_mask, normalizer.model_input(batch.pixels)


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
def pretraining_sums(
    objective: PretrainObjective,
    loader: BatchLoader,
    *,
    special: SpecialTokens,
    vocab_size: int,
    normalizer: PixelNormalizer,
    generator: torch.Generator,
    swaps: torch.Generator,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Summed counters of the pretraining tasks over `loader` (eval mode, then the mode it was in),
    masks drawn from `generator`; with AP also the alignment head on whole captions, pairs from `swaps`
    (`tasks.whole_caption_alignment`). `tasks.summarize` turns them into metrics."""
    model, config = objective.model, objective.config
    sums = Accumulator()
    was_training = model.training
    objective.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=generator.device.type == "cuda"):
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                tasks = build_task_batch(
                    batch.pixels,
                    batch.input_ids,
                    batch.num_tokens,
                    config=config,
                    special=special,
                    vocab_size=vocab_size,
                    num_patches=model.num_patches,
                    normalizer=normalizer,
                    generator=generator,
                )
                sums.add(objective(tasks).sums)
                if "ap" in config.tasks:
                    pixels = normalizer.model_input(batch.pixels)
                    sums.add(whole_caption_alignment(model, pixels, batch.input_ids, batch.num_tokens, generator=swaps))
    finally:
        objective.train(was_training)
    return sums.totals()


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
    cfg = dataclasses.replace(config.pretrain, augment=False)  # measure the task, not the augmentation
    totals = pretraining_sums(
        PretrainObjective(model, cfg),
        BatchLoader(reader, batch_size, shuffle=False, drop_last=False, device=device),
        special=SpecialTokens.from_dict(reader.manifest.special_token_ids),
        vocab_size=reader.manifest.vocab_size,
        normalizer=pixel_normalizer(reader, model, device),
        generator=torch.Generator(device=device).manual_seed(seed),
        swaps=torch.Generator(device=device).manual_seed(seed + 104_729),
        max_batches=max_batches,
    )
    return summarize(totals, cfg)


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
