"""Pretraining as an objective of the `Trainer`: cache batches -> tasks built on the device -> losses.

    batch -> build_task_batch (AP swap, MLM, MIM masks; the `masking` generator) -> PretrainObjective
        -> the weighted sum of the task losses; eval: the same tasks on `pretrain.eval_split` with
           fixed masks, plus the alignment head on whole captions

The loop itself (resume, SIGTERM, DDP, accumulation, checkpoints, metrics) is `trainer.py`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vilbert.cache import BatchLoader
from vilbert.config import Config, check_frozen_parts
from vilbert.errors import CacheError, CheckpointError
from vilbert.model import ViLBERT
from vilbert.overrides import config_from_dict, config_to_dict
from vilbert.train.checkpoint import PRETRAIN_FORMAT, load_checkpoint
from vilbert.train.distributed import DistContext, all_reduce_sums
from vilbert.train.evaluate import pretraining_sums
from vilbert.train.masking import SpecialTokens
from vilbert.train.pixels import pixel_normalizer
from vilbert.train.splits import fit_config_to_cache, open_split
from vilbert.train.tasks import PretrainObjective, build_task_batch, summarize
from vilbert.train.trainer import LoopSettings, StepOutput, Trainer, TrainOptions, TrainResult, train

__all__ = ["PretrainOptions", "Pretraining", "pretrain", "run_config"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


class PretrainOptions(TrainOptions):
    """A pretraining run's options: those of every run (`data` may also be one cache)."""


def pretrain(config: Config, options: TrainOptions, progress: Progress | None = None) -> TrainResult:
    """Pretrain (or continue pretraining) a ViLBERT on a cache; `last_eval` holds the held-out metrics.

    Launched by `torchrun`, each process runs this; rank 0 writes the run directory.

    Raises:
        CacheError: The cache does not fit the model (image size, normalization, vocabulary).
        CheckpointError: `resume` without a usable checkpoint, or one from an incompatible run.
    """
    return train(lambda ctx: Pretraining(config, options.data), options, progress)


def run_config(run_dir: str | Path) -> Config:
    """The config stored in a run's newest checkpoint (the base for `--resume` with `--set`)."""
    return config_from_dict(load_checkpoint(run_dir)["config"])


class Pretraining:
    """MLM, AP, MIM and ITC on a cache's `train` split, evaluated on `pretrain.eval_split`."""

    format = PRETRAIN_FORMAT
    outputs = ()

    def __init__(self, config: Config, data: Path) -> None:
        self.data = Path(data)
        self.train_reader = open_split(self.data, "train", verify=config.data.verify_cache)
        self.config = fit_config_to_cache(config, self.train_reader)
        self.cfg = cfg = self.config.pretrain
        self.settings = LoopSettings.from_section(cfg, drop_last=True)
        split = cfg.eval_split
        self.eval_reader = open_split(self.data, split, verify=config.data.verify_cache) if split != "train" else None
        if self.eval_reader is None:
            log.warning("no %r split under %s: training without evaluation", split, self.data)
        elif self.eval_reader.tokenizer_fingerprint != self.train_reader.tokenizer_fingerprint:
            raise CacheError(f"{self.eval_reader.paths[0]} was built with another tokenizer than the train split")
        self.special = SpecialTokens.from_dict(self.train_reader.manifest.special_token_ids)
        self.vocab_size = self.train_reader.manifest.vocab_size

    def build(self, ctx: DistContext, resumed: dict[str, Any] | None) -> ViLBERT:
        check_frozen_parts(self.config.model)
        requested = config_to_dict(self.config)["model"]
        self.ctx = ctx
        self.model = ViLBERT(self.config.model).to(ctx.device)
        self.config = dataclasses.replace(self.config, model=self.model.config)  # + the weights' normalization
        if resumed is not None and resumed["config"]["model"] not in (config_to_dict(self.config)["model"], requested):
            raise CheckpointError(
                f"{resumed['path']} was written with another model config; resume with the "
                "run's own config (only pretrain.* keys may change)"
            )
        self.normalizer = pixel_normalizer(self.train_reader, self.model, ctx.device)
        self.module = PretrainObjective(self.model, self.cfg)
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + ctx.rank)
        self.generators = {"masking": self.generator}
        return self.model

    def step(self, batch: Any, forward: Callable[..., Any]) -> StepOutput:
        tasks = build_task_batch(
            batch.pixels,
            batch.input_ids,
            batch.num_tokens,
            config=self.cfg,
            special=self.special,
            vocab_size=self.vocab_size,
            num_patches=self.model.num_patches,
            normalizer=self.normalizer,
            generator=self.generator,
        )
        out = forward(tasks)
        return StepOutput(loss=out.loss, sums=out.sums)

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return summarize(totals, self.cfg)

    def evaluate(self, trainer: Trainer, *, epoch_end: bool) -> dict[str, Any] | None:
        """The same masks and caption swaps at every evaluation (generators seeded per rank)."""
        if self.eval_reader is None:
            return None
        cfg, ctx = self.cfg, self.ctx
        loader = BatchLoader(
            self.eval_reader,
            cfg.batch_size,
            shuffle=False,
            drop_last=False,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
        )
        totals = pretraining_sums(
            self.module,
            loader,
            special=self.special,
            vocab_size=self.vocab_size,
            normalizer=self.normalizer,
            generator=torch.Generator(device=ctx.device).manual_seed(cfg.seed + 7919 * (ctx.rank + 1)),
            swaps=torch.Generator(device=ctx.device).manual_seed(cfg.seed + 104_729 * (ctx.rank + 1)),
            max_batches=cfg.eval_max_batches,
        )
        return summarize(all_reduce_sums(totals, ctx), cfg)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def finish(self, trainer: Trainer) -> dict[str, Any]:
        return {}
