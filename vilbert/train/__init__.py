"""Consumers of the cache: one training loop (`Trainer`) with pretraining and fine-tuning plugged in,
evaluation, analysis and the task ablation. See README.md beside this file; the pieces (masking,
tasks, checkpoints, metrics, DDP) are imported from their modules.

The names below load on first use (PEP 562), so `vilbert.train.splits` or `vilbert.train.scoring`
cost what they import themselves, not torch, timm and matplotlib for everything here: a CLI usage
error answers in about a second instead of after the whole training stack has loaded."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the loop and its two objectives
    "trainer": ("Trainer", "Objective", "TrainOptions", "TrainResult", "train"),
    "pretrain": ("PretrainOptions", "Pretraining", "pretrain", "run_config"),
    "finetune": ("FinetuneOptions", "Finetuning", "finetune"),
    # runs and models
    "checkpoint": ("load_checkpoint", "export_checkpoint"),
    "export": ("ExportResult", "export_run"),
    "metrics": ("read_metrics",),
    "plot": ("plot_runs",),
    "loading": ("LoadedModel", "load_model"),
    # downstream: evaluation, analysis, the task ablation
    "evaluate": ("evaluate", "predict"),
    "analyse": ("AnalysisReport", "analyse", "analyse_model", "plot_analysis"),
    "ablate": ("AblationOptions", "run_ablation"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'vilbert.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vilbert.train.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
