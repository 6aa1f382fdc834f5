"""Consumers of the cache: one training loop (`Trainer`) with pretraining and fine-tuning plugged in,
evaluation, analysis and the task ablation. See README.md beside this file; the pieces (masking,
tasks, checkpoints, metrics, DDP) are imported from their modules."""

from vilbert.train.ablate import AblationOptions, run_ablation
from vilbert.train.analyse import AnalysisReport, analyse, analyse_model, plot_analysis
from vilbert.train.checkpoint import export_checkpoint, load_checkpoint
from vilbert.train.evaluate import evaluate, predict
from vilbert.train.export import ExportResult, export_run
from vilbert.train.finetune import FinetuneOptions, Finetuning, finetune
from vilbert.train.loading import LoadedModel, load_model
from vilbert.train.metrics import read_metrics
from vilbert.train.pretrain import Pretraining, PretrainOptions, pretrain, run_config
from vilbert.train.trainer import Objective, Trainer, TrainOptions, TrainResult, train

__all__ = [
    # the loop and its two objectives
    "Trainer",
    "Objective",
    "TrainOptions",
    "TrainResult",
    "train",
    "PretrainOptions",
    "Pretraining",
    "pretrain",
    "run_config",
    "FinetuneOptions",
    "Finetuning",
    "finetune",
    # runs and models
    "load_checkpoint",
    "export_checkpoint",
    "ExportResult",
    "export_run",
    "read_metrics",
    "plot_runs",
    "LoadedModel",
    "load_model",
    # downstream: evaluation, analysis, the task ablation
    "evaluate",
    "predict",
    "AnalysisReport",
    "analyse",
    "analyse_model",
    "plot_analysis",
    "AblationOptions",
    "run_ablation",
]


def __getattr__(name: str):
    if name == "plot_runs":  # matplotlib loads only when plotting
        from vilbert.train.plot import plot_runs

        return plot_runs
    raise AttributeError(f"module 'vilbert.train' has no attribute {name!r}")
