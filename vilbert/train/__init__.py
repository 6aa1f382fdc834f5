"""Consumers of the cache: on-device pretraining tasks, the pretraining loop, and the generic loop
pieces (optimizer and schedule, checkpoints, metrics, plots, DDP, pre-emption) that fine-tuning reuses.
See README.md beside this file."""

from vilbert.train.ablate import AblationOptions, run_ablation
from vilbert.train.analyse import AnalysisReport, analyse, analyse_model, plot_analysis
from vilbert.train.checkpoint import (
    CheckpointManager,
    capture_rng,
    export_checkpoint,
    find_checkpoint,
    load_checkpoint,
    restore_rng,
    unwrap_model,
)
from vilbert.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sums,
    any_rank,
    init_distributed,
    resolve_device,
    shutdown_distributed,
    wrap_ddp,
)
from vilbert.train.evaluate import LoadedModel, evaluate, load_model, predict
from vilbert.train.export import ExportResult, export_run
from vilbert.train.finetune import FinetuneOptions, FinetuneResult, finetune
from vilbert.train.masking import (
    ALIGNED,
    IGNORE_INDEX,
    NOT_ALIGNED,
    PixelNormalizer,
    SpecialTokens,
    augment_images,
    mask_patches,
    mask_tokens,
    mismatch_captions,
)
from vilbert.train.metrics import Accumulator, MetricsWriter, StepClock, peak_memory_mb, read_metrics
from vilbert.train.optim import build_optimizer, build_scheduler, lr_multiplier
from vilbert.train.preemption import StopRequest
from vilbert.train.pretrain import PretrainOptions, PretrainResult, open_split, pretrain, run_config
from vilbert.train.scoring import accuracy, auroc, binary_metrics, retrieval_recall
from vilbert.train.tasks import PretrainObjective, TaskBatch, TaskOutput, build_task_batch, summarize

__all__ = [
    # tasks on the device
    "ALIGNED",
    "NOT_ALIGNED",
    "IGNORE_INDEX",
    "SpecialTokens",
    "mask_tokens",
    "mismatch_captions",
    "mask_patches",
    "augment_images",
    "PixelNormalizer",
    "TaskBatch",
    "TaskOutput",
    "build_task_batch",
    "PretrainObjective",
    "summarize",
    # the pretraining loop
    "PretrainOptions",
    "PretrainResult",
    "pretrain",
    "run_config",
    "open_split",
    # generic loop pieces
    "build_optimizer",
    "build_scheduler",
    "lr_multiplier",
    "CheckpointManager",
    "load_checkpoint",
    "find_checkpoint",
    "export_checkpoint",
    "ExportResult",
    "export_run",
    "capture_rng",
    "restore_rng",
    "unwrap_model",
    "MetricsWriter",
    "read_metrics",
    "Accumulator",
    "StepClock",
    "peak_memory_mb",
    "plot_runs",
    "StopRequest",
    "DistContext",
    "init_distributed",
    "shutdown_distributed",
    "resolve_device",
    "wrap_ddp",
    "all_reduce_sums",
    "any_rank",
    "all_gather_objects",
    # downstream: fine-tuning, evaluation, analysis, the task ablation
    "auroc",
    "accuracy",
    "binary_metrics",
    "retrieval_recall",
    "LoadedModel",
    "load_model",
    "predict",
    "evaluate",
    "FinetuneOptions",
    "FinetuneResult",
    "finetune",
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
