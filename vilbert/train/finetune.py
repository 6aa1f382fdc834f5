"""Fine-tuning for binary classification (Hateful Memes): from a pretraining checkpoint or from scratch.

    DATA/train (labels) -> BatchLoader -> ViLBERT.classify -> cross-entropy -> AdamW -> schedule
        every log_every steps: a train record in metrics.jsonl (loss, lr, throughput)
        each epoch's end: accuracy and exact AUROC of the epoch's training predictions and of DATA/dev_seen
            (an eval record), then a checkpoint
        the end: DATA/test_seen once, results.json, plots/*.png

The pieces are the pretraining loop's (`optim`, `checkpoint`, `metrics`, `plot`, `preemption`): AdamW
without decay on biases and LayerNorms, warmup then decay, atomic keep-last-K checkpoints that hold
everything a step depends on (weights, optimizer, schedule, loader position, RNG states and the epoch's
predictions so far), so `resume=True` continues exactly, and SIGTERM/SIGINT checkpoint and stop.

`init` is a pretraining run directory or checkpoint (its architecture and weights; the classifier is
redrawn from `finetune.seed`), an exported model directory, a fine-tuning checkpoint, or None for a
model initialized from scratch with `config.model` (text vocabulary from the cache's tokenizer).
`config.model.freeze` says which parts stay frozen.

Train metrics are those of the predictions made while training through the epoch (dropout on, weights
moving), as the thesis logged them; dev and test are measured in eval mode.
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

from vilbert.cache import BatchLoader, CacheReader
from vilbert.config import Config, config_from_dict, config_to_dict
from vilbert.errors import CacheError, CheckpointError, UsageError
from vilbert.model import ViLBERT
from vilbert.model.attention import init_bert_weights
from vilbert.train.checkpoint import CheckpointManager, capture_rng, load_checkpoint, model_from_checkpoint, restore_rng
from vilbert.train.distributed import resolve_device
from vilbert.train.evaluate import (
    FINETUNE_FORMAT,
    LoadedModel,
    check_compatible,
    load_model,
    model_inputs,
    pixel_normalizer,
    predict,
)
from vilbert.train.metrics import Accumulator, MetricsWriter, StepClock, peak_memory_mb
from vilbert.train.optim import build_optimizer, build_scheduler
from vilbert.train.plot import plot_runs
from vilbert.train.preemption import StopRequest
from vilbert.train.pretrain import _effective_config, open_split
from vilbert.train.scoring import binary_metrics

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune", "RESULTS_NAME"]

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    """What a fine-tuning run needs besides its `Config`.

    Attributes:
        data: A cache root with `train/` and (optionally) the dev and test splits, all labelled.
        run_dir: `runs/NAME`: checkpoints, metrics.jsonl, config.json, results.json, plots/.
        init: A pretraining run dir or checkpoint, an exported model dir, or None (from scratch).
        resume: Continue from the newest checkpoint in `run_dir`.
        device: `auto`, `cpu` or `cuda`.
        max_steps: Stop (with a checkpoint, without the test evaluation) after this many steps.
        plots: Write `plots/*.png` at the end.
    """

    data: Path
    run_dir: Path
    init: Path | None = None
    resume: bool = False
    device: str = "auto"
    max_steps: int | None = None
    plots: bool = True


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    """How a run ended (`stopped`: `completed`, `max_steps` or a signal name) and `results.json`'s data."""

    run_dir: Path
    step: int
    epoch: int
    stopped: str
    checkpoint: Path | None
    results: dict[str, Any]


def finetune(config: Config, options: FinetuneOptions, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune (or continue fine-tuning) a classifier; see the module docstring.

    Raises:
        CacheError: Splits without labels, of different tokenizers, or not fitting the model.
        CheckpointError: An unusable `init`, or `resume` without a fine-tuning checkpoint in `run_dir`.
    """
    session = _Session(config, options, progress)
    with StopRequest() as stop:
        return session.run(stop)


def _labelled(reader: CacheReader | None, what: str) -> CacheReader | None:
    if reader is not None and not reader.has_labels:
        raise CacheError(
            f"{reader.paths[0]} ({what}) has no labels; fine-tuning needs a labelled cache "
            "(e.g. `vilbert preprocess --format hateful-memes`)"
        )
    return reader


def _same_tokenizer(readers: list[CacheReader]) -> None:
    first = readers[0]
    for other in readers[1:]:
        if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise CacheError(f"{other.paths[0]} was built with another tokenizer than {first.paths[0]}")


class _Session:
    """One run's state; `run()` is the loop."""

    def __init__(self, config: Config, options: FinetuneOptions, progress: Progress | None) -> None:
        self.options, self.progress = options, progress
        self.cfg = config.finetune
        self.device = resolve_device(options.device)
        opened = partial(open_split, options.data, verify=config.data.verify_cache, num_labels=config.model.num_labels)
        self.train_reader = _labelled(opened("train"), "train")
        self.dev_reader = _labelled(opened(self.cfg.dev_split), self.cfg.dev_split)
        self.test_reader = _labelled(opened(self.cfg.test_split), self.cfg.test_split)
        readers = [r for r in (self.train_reader, self.dev_reader, self.test_reader) if r is not None]
        _same_tokenizer(readers)
        for name, reader in ((self.cfg.dev_split, self.dev_reader), (self.cfg.test_split, self.test_reader)):
            if reader is None:
                log.warning("no %r split under %s: it will not be evaluated", name, options.data)
        self.run_dir = Path(options.run_dir)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=self.cfg.keep_last)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", progress, tensorboard=config.finetune.tensorboard)
        self._build(config)

    # ------------------------------------------------------------------------------- building

    def _build(self, config: Config) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        state = self._resume_state() if self.options.resume else None
        self.init_path, self.init_kind = None, "scratch"
        if state is not None:  # the architecture is the checkpoint's; finetune.* may change
            self.config = dataclasses.replace(config, model=config_from_dict(state["config"]).model)
            self.model = model_from_checkpoint(state)
            self.init_path, self.init_kind = state.get("init"), state.get("init_kind", "scratch")
        elif self.options.init is None:
            self.config = _effective_config(config, self.train_reader)
            self.model = ViLBERT(self.config.model)
        else:
            loaded = self._initial_model()
            model_config = dataclasses.replace(loaded.model.config, freeze=config.model.freeze)
            self.config = dataclasses.replace(config, model=model_config)
            self.model = loaded.model
            self.model.config = model_config
            self.init_path, self.init_kind = str(loaded.path), loaded.kind
            if cfg.reinit_classifier:
                self.model.classifier.apply(partial(init_bert_weights, std=model_config.initializer_range))
        self.model.freeze(self.config.model.freeze)
        self.model.to(self.device).train()
        self.normalizer = pixel_normalizer(self.train_reader, self.model, self.device)
        self.loader = BatchLoader(
            self.train_reader, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=False, device=self.device
        )
        self.total_steps = cfg.epochs * len(self.loader)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=cfg.warmup_steps, total_steps=self.total_steps, schedule=cfg.schedule
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.epoch_logits: list[torch.Tensor] = []
        self.epoch_labels: list[torch.Tensor] = []
        if state is not None:
            self._resume(state)
        else:
            self._start_fresh()

    def _initial_model(self) -> LoadedModel:
        loaded = load_model(self.options.init, "cpu")
        check_compatible(loaded, self.train_reader)
        log.info("initialized from %s (%s, step %s)", loaded.path, loaded.kind, loaded.step)
        return loaded

    def _start_fresh(self) -> None:
        if self.checkpoints.latest() is not None:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it, "
                "or choose another --run directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", RESULTS_NAME):
            (self.run_dir / name).unlink(missing_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=2) + "\n")

    def _resume_state(self) -> dict[str, Any]:
        state = load_checkpoint(self.run_dir)
        if state.get("format") != FINETUNE_FORMAT:
            raise CheckpointError(f"{state['path']} is not a fine-tuning checkpoint ({state.get('format')!r})")
        return state

    def _resume(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.epoch_logits = [state["epoch_logits"]] if state["epoch_logits"].numel() else []
        self.epoch_labels = [state["epoch_labels"]] if state["epoch_labels"].numel() else []
        restore_rng(state["rng"])
        dropped = self.metrics.truncate_after(self.step)
        log.info(
            "resumed %s at step %d (epoch %d)%s",
            state["path"],
            self.step,
            self.loader.epoch,
            f"; dropped {dropped} metric records written after it" if dropped else "",
        )

    def save(self) -> Path | None:
        logits, labels = self._epoch_predictions()
        state = {
            "format": FINETUNE_FORMAT,
            "step": self.step,
            "epoch": self.loader.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": capture_rng(),
            "config": config_to_dict(self.config),
            "history": self.history,
            "epoch_logits": logits,
            "epoch_labels": labels,
            "data": str(self.options.data),
            "init": self.init_path,
            "init_kind": self.init_kind,
        }
        path = self.checkpoints.save(state, self.step)
        self._saved_step = self.step
        return path

    def _epoch_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.epoch_logits:
            return torch.empty(0, 2), torch.empty(0, dtype=torch.long)
        return torch.cat(self.epoch_logits), torch.cat(self.epoch_labels)

    # ----------------------------------------------------------------------------------- loop

    def run(self, stop: StopRequest) -> FinetuneResult:
        self._saved_step, stopped = -1, "completed"
        self._announce()
        self.clock, self.window = StepClock(), Accumulator()
        if self.options.max_steps is not None and self.step >= self.options.max_steps:
            stopped = "max_steps"
        while self.loader.epoch < self.cfg.epochs and stopped == "completed":
            stopped = self._epoch(stop)
        if stopped != "completed":
            path = self.save() if self._saved_step != self.step else self.checkpoints.latest()
            return FinetuneResult(
                run_dir=self.run_dir,
                step=self.step,
                epoch=self.loader.epoch,
                stopped=stopped,
                checkpoint=path,
                results={},
            )
        results = self._finish()
        return FinetuneResult(
            run_dir=self.run_dir,
            step=self.step,
            epoch=self.loader.epoch,
            stopped=stopped,
            checkpoint=self.checkpoints.latest(),
            results=results,
        )

    def _announce(self) -> None:
        if self.progress is None:
            return
        report = self.model.parameter_report()["all"]
        self.progress(
            {
                "kind": "start",
                "step": self.step,
                "epoch": self.loader.epoch,
                "epochs": self.cfg.epochs,
                "steps_per_epoch": len(self.loader),
                "total_steps": self.total_steps,
                "parameters": report["total"],
                "trainable": report["trainable"],
                "device": str(self.device),
                "init": self.init_path,
            }
        )

    def _epoch(self, stop: StopRequest) -> str:
        batches = iter(self.loader)
        remaining = len(self.loader) - self.loader.state_dict()["position"]
        try:
            for _ in range(remaining):
                self._train_step(self.clock.next_from(batches))
                reason = self._after_step(stop)
                if reason is not None:
                    return reason
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        self.loader.set_epoch(self.loader.epoch + 1)
        self._end_of_epoch()
        self.save()
        return "completed"

    def _train_step(self, batch: Any) -> None:
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = self.model.classify(self.model(*model_inputs(batch, self.normalizer))).float()
        loss = F.cross_entropy(logits, batch.labels)
        loss.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.window.add({"grad_norm": norm, "grad_norm_count": 1.0})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        n = len(batch)
        self.window.add({"loss_sum": loss.detach() * n, "count": float(n)})
        self.epoch_logits.append(logits.detach().cpu())
        self.epoch_labels.append(batch.labels.detach().cpu())
        self.clock.step_done(n)

    def _after_step(self, stop: StopRequest) -> str | None:
        if self.step % self.cfg.log_every == 0:
            self._log_train()
        reason = None
        if stop.requested:
            import signal

            reason = signal.Signals(stop.signum).name
        elif self.options.max_steps is not None and self.step >= self.options.max_steps:
            reason = "max_steps"
        if reason is not None or (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0):
            self.save()
        return reason

    def _log_train(self) -> None:
        totals = self.window.totals()
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "epoch": self.loader.epoch,
            "loss": totals["loss_sum"] / max(totals["count"], 1.0),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if totals.get("grad_norm_count"):
            record["grad_norm"] = totals["grad_norm"] / totals["grad_norm_count"]
        record.update(self.clock.summary())
        record["peak_mem_mb"] = peak_memory_mb(self.device)
        self.metrics.write(record)
        self.window.reset()
        self.clock.reset()

    # ---------------------------------------------------------------------------- evaluation

    def _split_metrics(self, reader: CacheReader | None) -> dict[str, float] | None:
        if reader is None:
            return None
        preds = predict(
            self.model, reader, batch_size=self.cfg.eval_batch_size, device=self.device, normalizer=self.normalizer
        )
        return binary_metrics(preds.classify, preds.labels)

    def _end_of_epoch(self) -> None:
        logits, labels = self._epoch_predictions()
        entry: dict[str, Any] = {"epoch": self.loader.epoch, "step": self.step, "train": binary_metrics(logits, labels)}
        entry["dev"] = self._split_metrics(self.dev_reader)
        self.history.append(entry)
        self.epoch_logits, self.epoch_labels = [], []
        self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.loader.epoch, **_flat(entry)})
        self.clock.reset()  # evaluation time is not training throughput

    def _finish(self) -> dict[str, Any]:
        test = self._split_metrics(self.test_reader)
        if test is not None:
            self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.loader.epoch, **_flat({"test": test})})
        dev_epochs = [e for e in self.history if e.get("dev")]
        best = max(dev_epochs, key=lambda e: e["dev"]["auroc"], default=None)
        results = {
            "init": self.init_path,
            "init_kind": self.init_kind,
            "data": str(self.options.data),
            "steps": self.step,
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
        (self.run_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        if self.options.plots:
            try:
                plot_runs([self.run_dir], self.run_dir / "plots")
            except UsageError as err:  # too short a run to have anything to draw
                log.warning("no plots: %s", err)
        return results


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
