"""Fine-tuning for binary classification (Hateful Memes) as an objective of the `Trainer`.

    DATA/train (labels) -> ViLBERT.classify -> cross-entropy
        each epoch's end: accuracy and exact AUROC of the epoch's training predictions (all ranks') and
            of DATA/dev_seen (an eval record, and an entry of results.json's `epochs`)
        the end: DATA/test_seen once, results.json, plots/*.png

The loop (resume, SIGTERM, DDP, accumulation, checkpoints, metrics) is `trainer.py`'s; a checkpoint
also holds the epoch's training predictions so far, so a resumed run reports the same epoch metrics.

`init` is a pretraining run directory or checkpoint (its architecture and weights; the classifier is
redrawn from `finetune.seed`), an exported model directory, a fine-tuning checkpoint, or None for a
model initialized from scratch with `config.model` (text vocabulary from the cache's tokenizer).
`config.model.freeze` says which parts stay frozen. Train metrics are those of the predictions made
while training through the epoch, as the thesis logged them; dev and test are measured in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vilbert.cache import CacheReader
from vilbert.config import Config, check_frozen_parts
from vilbert.errors import UsageError
from vilbert.model import ViLBERT
from vilbert.model.attention import init_bert_weights
from vilbert.overrides import config_from_dict, config_to_dict
from vilbert.train.checkpoint import FINETUNE_FORMAT, model_from_checkpoint
from vilbert.train.distributed import DistContext, all_gather_objects
from vilbert.train.evaluate import model_inputs, predict
from vilbert.train.loading import check_compatible, load_model
from vilbert.train.pixels import pixel_normalizer
from vilbert.train.plot import plot_runs
from vilbert.train.scoring import binary_metrics
from vilbert.train.splits import check_same_tokenizer, fit_config_to_cache, open_split, require_labels
from vilbert.train.trainer import LoopSettings, StepOutput, Trainer, TrainOptions, TrainResult, train

__all__ = ["FinetuneOptions", "Finetuning", "finetune", "RESULTS_NAME"]

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(TrainOptions):
    """A fine-tuning run's options: those of every run, and

    Attributes:
        init: A pretraining run dir or checkpoint, an exported model dir, or None (from scratch).
        plots: Write `plots/*.png` at the end.
    """

    init: Path | None = None
    plots: bool = True


def finetune(config: Config, options: FinetuneOptions, progress: Progress | None = None) -> TrainResult:
    """Fine-tune (or continue fine-tuning) a classifier; `results` holds results.json's data.

    Raises:
        CacheError: Splits without labels, of different tokenizers, or not fitting the model.
        CheckpointError: An unusable `init`, or `resume` without a fine-tuning checkpoint in `run_dir`.
    """
    return train(lambda ctx: Finetuning(config, options), options, progress)


class _Classify(nn.Module):
    """The model's classifier logits: the forward DDP wraps."""

    def __init__(self, model: ViLBERT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.classify(self.model(input_ids, attention_mask, pixels))


class Finetuning:
    """Cross-entropy of the classifier on labelled `train`; dev every epoch, test at the end."""

    format = FINETUNE_FORMAT
    outputs = (RESULTS_NAME,)

    def __init__(self, config: Config, options: FinetuneOptions) -> None:
        self.config, self.options, self.cfg = config, options, config.finetune
        self.settings = LoopSettings.from_section(self.cfg, drop_last=False, eval_every=0, log_sample_indices=False)
        opened = partial(open_split, options.data, verify=config.data.verify_cache, num_labels=config.model.num_labels)
        self.train_reader = require_labels(opened("train"), "train")
        self.dev_reader = require_labels(opened(self.cfg.dev_split), self.cfg.dev_split)
        self.test_reader = require_labels(opened(self.cfg.test_split), self.cfg.test_split)
        check_same_tokenizer([r for r in (self.train_reader, self.dev_reader, self.test_reader) if r is not None])
        for name, reader in ((self.cfg.dev_split, self.dev_reader), (self.cfg.test_split, self.test_reader)):
            if reader is None:
                log.warning("no %r split under %s: it will not be evaluated", name, options.data)

    def build(self, ctx: DistContext, resumed: dict[str, Any] | None) -> ViLBERT:
        self.ctx, config = ctx, self.config
        self.init_path, self.init_kind = None, "scratch"
        if resumed is not None:  # the architecture is the checkpoint's; finetune.* may change
            self.config = dataclasses.replace(config, model=config_from_dict(resumed["config"]).model)
            model = model_from_checkpoint(resumed)
            self.init_path, self.init_kind = resumed["init"], resumed["init_kind"]
        elif self.options.init is None:
            self.config = fit_config_to_cache(config, self.train_reader)
            check_frozen_parts(self.config.model)
            model = ViLBERT(self.config.model)
            self.config = dataclasses.replace(self.config, model=model.config)  # + the weights' normalization
        else:
            model = self._initial_model(config)
        model.freeze(self.config.model.freeze)
        self.model = model.to(ctx.device).train()
        self.normalizer = pixel_normalizer(self.train_reader, self.model, ctx.device)
        self.module, self.generators = _Classify(self.model), {}
        self.history: list[dict[str, Any]] = []
        self.epoch_logits: list[torch.Tensor] = []
        self.epoch_labels: list[torch.Tensor] = []
        return self.model

    def _initial_model(self, config: Config) -> ViLBERT:
        loaded = load_model(self.options.init, "cpu")
        check_compatible(loaded, self.train_reader)
        log.info("initialized from %s (%s, step %s)", loaded.path, loaded.kind, loaded.step)
        model_config = dataclasses.replace(loaded.model.config, freeze=config.model.freeze)
        self.config = dataclasses.replace(config, model=model_config)
        model, model.config = loaded.model, model_config
        self.init_path, self.init_kind = str(loaded.path), loaded.kind
        if self.cfg.reinit_classifier:
            model.classifier.apply(partial(init_bert_weights, std=model_config.initializer_range))
        return model

    def step(self, batch: Any, forward: Callable[..., Any]) -> StepOutput:
        logits = forward(*model_inputs(batch, self.normalizer)).float()
        loss = F.cross_entropy(logits, batch.labels)
        self.epoch_logits.append(logits.detach().cpu())
        self.epoch_labels.append(batch.labels.detach().cpu())
        n = len(batch)
        return StepOutput(loss=loss, sums={"loss_sum": loss.detach() * n, "count": float(n)})

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return {"loss": totals["loss_sum"] / max(totals["count"], 1.0)}

    def _epoch_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's training logits and labels so far, of all ranks (rank order)."""
        mine = (torch.cat(self.epoch_logits), torch.cat(self.epoch_labels)) if self.epoch_logits else None
        parts = [p for p in all_gather_objects(mine, self.ctx) if p is not None]
        if not parts:
            return torch.empty(0, 2), torch.empty(0, dtype=torch.long)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _split_metrics(self, reader: CacheReader | None) -> dict[str, float] | None:
        if reader is None:
            return None
        preds = predict(
            self.model, reader, batch_size=self.cfg.eval_batch_size, device=self.ctx.device, normalizer=self.normalizer
        )
        return binary_metrics(preds.classify, preds.labels)

    def evaluate(self, trainer: Trainer, *, epoch_end: bool) -> dict[str, Any] | None:
        if not epoch_end:
            return None
        logits, labels = self._epoch_predictions()
        entry = {"epoch": trainer.epoch + 1, "step": trainer.step, "train": binary_metrics(logits, labels)}
        entry["dev"] = self._split_metrics(self.dev_reader)
        self.history.append(entry)
        self.epoch_logits, self.epoch_labels = [], []
        return {"epoch": entry["epoch"], **_flat(entry)}

    def state_dict(self) -> dict[str, Any]:
        logits, labels = self._epoch_predictions()
        return {
            "history": self.history,
            "epoch_logits": logits,
            "epoch_labels": labels,
            "init": self.init_path,
            "init_kind": self.init_kind,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        held = self.ctx.is_main and state["epoch_logits"].numel() > 0  # all ranks' so far, kept by rank 0
        self.epoch_logits = [state["epoch_logits"]] if held else []
        self.epoch_labels = [state["epoch_labels"]] if held else []

    def describe(self) -> dict[str, Any]:
        return {"init": self.init_path}

    def finish(self, trainer: Trainer) -> dict[str, Any]:
        test = self._split_metrics(self.test_reader)
        if test is not None:
            trainer.write_eval(_flat({"test": test}))
        dev_epochs = [e for e in self.history if e.get("dev")]
        best = max(dev_epochs, key=lambda e: e["dev"]["auroc"], default=None)
        results = {
            "init": self.init_path,
            "init_kind": self.init_kind,
            "data": str(self.options.data),
            "steps": trainer.step,
            "epochs": self.history,
            "final": {
                "train": self.history[-1]["train"] if self.history else None,
                "dev": self.history[-1]["dev"] if self.history else None,
                "test": test,
            },
            "best_dev": {"epoch": best["epoch"], "auroc": best["dev"]["auroc"]} if best else None,
            "parameters": self.model.parameter_report(),
            "config": config_to_dict(self.config),
        }
        if self.ctx.is_main:
            self._write_results(trainer.run_dir, results)
        return results

    def _write_results(self, run_dir: Path, results: dict[str, Any]) -> None:
        (run_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        if self.options.plots:
            try:
                plot_runs([run_dir], run_dir / "plots")
            except UsageError as err:  # too short a run to have anything to draw
                log.warning("no plots: %s", err)


def _flat(entry: dict[str, Any]) -> dict[str, float]:
    """`{"dev": {"accuracy": a, ...}}` -> `{"dev_acc": a, "dev_auroc": ..., "dev_loss": ...}`."""
    names = {"accuracy": "acc", "auroc": "auroc", "loss": "loss"}
    return {
        f"{split}_{names[k]}": v
        for split, m in entry.items()
        if isinstance(m, dict)
        for k, v in m.items()
        if k in names
    }
