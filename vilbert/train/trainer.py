"""The training loop, written once; pretraining and fine-tuning are objectives plugged into it.

    Objective.build -> model (on the device) -> compile -> DDP -> BatchLoader (this rank's slice)
        -> per optimizer step: grad_accum micro-batches of Objective.step (bf16 on CUDA)
           -> loss / window -> backward -> clip -> AdamW -> schedule
        -> every log_every: a train record (Objective.summarize of the summed counters)
        -> every eval_every and each epoch's end: Objective.evaluate -> an eval record
        -> every checkpoint_every, each epoch's end, at max_steps and on SIGTERM/SIGINT: a checkpoint
        -> at the end of the last epoch: Objective.finish (e.g. the test split, results.json)

A step is one optimizer step. A checkpoint holds everything a step depends on (weights, optimizer,
schedule, loader position, every RNG state of every rank including the objective's generators, and
the objective's own state), so `resume=True` continues exactly: N steps + resume + N steps give the
same parameters as 2N steps. The schedule spans `epochs`; `max_steps` only stops early. Under
`torchrun` each process runs the loop on its slice of every batch; rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vilbert.cache import BatchLoader, CacheReader
from vilbert.config import Config
from vilbert.errors import CacheError, CheckpointError
from vilbert.model import ViLBERT
from vilbert.overrides import config_to_dict
from vilbert.train.checkpoint import CheckpointManager, capture_rng, checkpoint_kind, load_checkpoint, restore_rng
from vilbert.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sums,
    any_rank,
    init_distributed,
    shutdown_distributed,
    wrap_ddp,
)
from vilbert.train.metrics import Accumulator, MetricsWriter, StepClock, peak_memory_mb
from vilbert.train.optim import build_optimizer, build_scheduler, pretrained_encoder_scale, warmup_steps_of
from vilbert.train.preemption import StopRequest

__all__ = ["LoopSettings", "StepOutput", "Objective", "TrainOptions", "TrainResult", "Trainer", "train"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """What the loop reads from a config section (`pretrain` or `finetune`); see their fields."""

    epochs: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    grad_clip: float
    seed: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_last: int
    compile: bool
    compile_mode: str
    drop_last: bool
    """Pretraining drops the short last batch (every task sub-batch full); fine-tuning sees every row."""
    log_sample_indices: bool
    warmup_ratio: float = 0.0
    """Warmup as a share of the run's steps, where `warmup_steps` is 0 (Lu et al.: 0.1)."""
    pretrained_lr_scale: float = 1.0
    """Learning-rate factor of the encoders that loaded pretrained weights (Lu et al.: 0.1 for BERT)."""
    tensorboard: bool = False
    """Also write every metric as a TensorBoard scalar under `RUN/tensorboard/`."""

    @classmethod
    def from_section(cls, section: Any, **fixed: Any) -> LoopSettings:
        """The loop's fields of a config section (`pretrain`, `finetune`), and `fixed` ones it lacks;
        a field with a default may be missing from the section."""
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in fixed:
                continue
            if field.default is dataclasses.MISSING or hasattr(section, field.name):
                values[field.name] = getattr(section, field.name)
        return cls(**fixed, **values)


@dataclass
class StepOutput:
    """One micro-batch: the loss to backpropagate and counters to sum (`Accumulator`) until logged."""

    loss: torch.Tensor
    sums: dict[str, Any]


class Objective(Protocol):
    """What pretraining or fine-tuning plugs into the `Trainer`.

    Attributes:
        format: The checkpoint format it writes and resumes (`checkpoint.PRETRAIN_FORMAT`, ...).
        config: The run's config, final once `build` returned (written to config.json).
        settings: The loop settings of its config section.
        train_reader: The train split.
        outputs: Files it writes into the run directory, removed when a fresh run starts there.
        module: Set by `build`: the module DDP wraps; its forward is what `step` calls.
        generators: Set by `build`: named `torch.Generator`s whose states the checkpoint keeps per rank.
    """

    format: str
    config: Config
    settings: LoopSettings
    train_reader: CacheReader
    outputs: tuple[str, ...]
    module: nn.Module
    generators: dict[str, torch.Generator]

    def build(self, ctx: DistContext, resumed: dict[str, Any] | None) -> ViLBERT:
        """The model on `ctx.device` (from `resumed`'s config when resuming); sets `module`, `generators`."""
        ...

    def step(self, batch: Any, forward: Callable[..., Any]) -> StepOutput:
        """Loss of one micro-batch; `forward(*args)` runs `module` (DDP-wrapped, autocast)."""
        ...

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """The train record's metrics from the summed `StepOutput.sums` of all ranks."""
        ...

    def evaluate(self, trainer: Trainer, *, epoch_end: bool) -> dict[str, Any] | None:
        """The eval record's fields (None: nothing evaluated); called on every rank."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Extra checkpoint entries (called on every rank: it may gather)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Extra fields of the `start` progress record."""
        ...

    def finish(self, trainer: Trainer) -> dict[str, Any]:
        """After the last epoch: the run's results (the test split, files beside the run)."""
        ...


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """What a run needs besides its `Config`.

    Attributes:
        data: A cache root (`train/` and the evaluated splits), or one cache for pretraining.
        run_dir: `runs/NAME`: checkpoints, metrics.jsonl, config.json.
        resume: Continue from the newest checkpoint in `run_dir` (its weights, optimizer, position, RNG).
        device: `auto`, `cpu` or `cuda`.
        max_steps: Stop (with a checkpoint) after this many optimizer steps in total; None: all epochs.
    """

    data: Path
    run_dir: Path
    resume: bool = False
    device: str = "auto"
    max_steps: int | None = None


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """How a run ended: `stopped` is `completed`, `max_steps` or a signal name (`SIGTERM`); the last
    evaluation's fields, and what `Objective.finish` returned (empty unless completed)."""

    run_dir: Path
    step: int
    epoch: int
    stopped: str
    checkpoint: Path | None
    last_eval: dict[str, Any] | None
    results: dict[str, Any]


def train(
    objective_for: Callable[[DistContext], Objective], options: TrainOptions, progress: Progress | None
) -> TrainResult:
    """Join the process group (under torchrun), build the objective and run the loop to its end.

    Raises:
        CacheError: The cache does not fit the model or the batch size.
        CheckpointError: `resume` without a usable checkpoint, or one of another kind or version.
    """
    ctx = init_distributed(options.device)
    try:
        trainer = Trainer(objective_for(ctx), options, ctx, progress)
        with StopRequest() as stop:
            return trainer.run(stop)
    finally:
        shutdown_distributed(ctx)


class Trainer:
    """One process's state for a run; `run()` is the loop."""

    def __init__(self, objective: Objective, options: TrainOptions, ctx: DistContext, progress: Progress | None):
        self.objective, self.options, self.ctx = objective, options, ctx
        self.settings = settings = objective.settings
        self.run_dir = Path(options.run_dir)
        self.progress = progress if ctx.is_main else None
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=settings.keep_last, enabled=ctx.is_main)
        self.metrics = MetricsWriter(
            self.run_dir / "metrics.jsonl" if ctx.is_main else None, self.progress, tensorboard=settings.tensorboard
        )
        resumed = self._resume_state() if options.resume else None
        torch.manual_seed(settings.seed)  # the same initial weights on every rank
        self.model = objective.build(ctx, resumed)
        if settings.compile:
            self.model.compile(mode=settings.compile_mode)  # in place: parameter names stay uncompiled
        self.wrapped = wrap_ddp(objective.module, ctx)
        self.loader = self._loader()
        self.steps_per_epoch = -(-len(self.loader) // settings.grad_accum)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(
            self.model,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            lr_scale=pretrained_encoder_scale(self.model.config, settings.pretrained_lr_scale),
        )
        warmup = warmup_steps_of(settings.warmup_steps, settings.warmup_ratio, self.total_steps)
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=warmup, total_steps=self.total_steps, schedule=settings.schedule
        )
        torch.manual_seed(settings.seed + ctx.rank)  # dropout differs between ranks
        self.step = 0
        self.last_eval: dict[str, Any] | None = None
        if resumed is not None:
            self._resume(resumed)
        elif ctx.is_main:
            self._start_fresh()

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def _loader(self) -> BatchLoader:
        settings, ctx, reader = self.settings, self.ctx, self.objective.train_reader
        loader = BatchLoader(
            reader,
            settings.batch_size,
            shuffle=True,
            seed=settings.seed,
            drop_last=settings.drop_last,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
        )
        if len(loader) == 0:
            raise CacheError(
                f"the train split has {len(reader)} rows: fewer than one batch of "
                f"{settings.batch_size} per rank x {ctx.world_size} ranks"
            )
        return loader

    # ------------------------------------------------------------------------------- run dir

    def _start_fresh(self) -> None:
        if self.checkpoints.latest() is not None:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it, "
                "or choose another --out directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", *self.objective.outputs):
            (self.run_dir / name).unlink(missing_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(self.objective.config), indent=2) + "\n")

    def _resume_state(self) -> dict[str, Any]:
        state = load_checkpoint(self.run_dir)
        checkpoint_kind(state, self.objective.format)
        return state

    def _resume(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.objective.load_state_dict(state)
        self.step = int(state["step"])
        rng, generators = state["rng"], self.objective.generators
        if len(rng) == self.ctx.world_size:
            restore_rng(rng[self.ctx.rank], generators)
        else:
            log.warning(
                "checkpoint has RNG states of %d ranks, this run has %d: reseeding, so the run "
                "continues but not bit-exactly",
                len(rng),
                self.ctx.world_size,
            )
            for generator in generators.values():
                generator.manual_seed(self.settings.seed * 1_000_003 + self.ctx.rank + self.step)
        dropped = self.metrics.truncate_after(self.step)
        log.info(
            "resumed %s at step %d (epoch %d)%s",
            state["path"],
            self.step,
            self.epoch,
            f"; dropped {dropped} metric records written after it" if dropped else "",
        )

    def save(self, *, complete: bool = False) -> Path | None:
        """Checkpoint this step (every rank takes part; rank 0 writes)."""
        rng = all_gather_objects(capture_rng(self.objective.generators), self.ctx)
        state = {
            "format": self.objective.format,
            "step": self.step,
            "epoch": self.epoch,
            "complete": complete,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "config": config_to_dict(self.objective.config),
            "data": str(self.options.data),
            "world_size": self.ctx.world_size,
            **self.objective.state_dict(),
        }
        path = self.checkpoints.save(state, self.step)
        self._saved_step = self.step
        if path is not None:
            log.info("checkpoint %s", path)
        return path

    # ---------------------------------------------------------------------------------- loop

    def run(self, stop: StopRequest) -> TrainResult:
        self._saved_step, stopped = -1, "completed"
        self._announce()
        self.clock, self.window = StepClock(), Accumulator()
        self.objective.module.train()
        if self.options.max_steps is not None and self.step >= self.options.max_steps:
            stopped = "max_steps"
        while self.epoch < self.settings.epochs and stopped == "completed":
            stopped = self._epoch(stop)
        path = self.save(complete=stopped == "completed") if self._saved_step != self.step else None
        path = path or self.checkpoints.latest()
        results = self.objective.finish(self) if stopped == "completed" else {}
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            epoch=self.epoch,
            stopped=stopped,
            checkpoint=path,
            last_eval=self.last_eval,
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
                "epoch": self.epoch,
                "epochs": self.settings.epochs,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "max_steps": self.options.max_steps,
                "parameters": report["total"],
                "trainable": report["trainable"],
                "world_size": self.ctx.world_size,
                "device": str(self.ctx.device),
                **self.objective.describe(),
            }
        )

    def _epoch(self, stop: StopRequest) -> str:
        """Train the rest of the current epoch; returns `completed` or why it stopped."""
        batches = iter(self.loader)
        remaining = len(self.loader) - self.loader.state_dict()["position"]
        try:
            while remaining > 0:
                window = min(self.settings.grad_accum, remaining)
                self._optimizer_step(batches, window)
                remaining -= window
                reason = self._after_step(stop)
                if reason is not None:
                    return reason
        finally:
            _close(batches)
        self.evaluate(epoch_end=True)
        self.loader.set_epoch(self.epoch + 1)
        self.save()
        return "completed"

    def _optimizer_step(self, batches: Any, window: int) -> None:
        samples = 0
        for micro in range(window):
            if self.settings.compile:  # CUDA graphs (reduce-overhead) may reuse the last step's outputs now
                torch.compiler.cudagraph_mark_step_begin()
            batch = self.clock.next_from(batches)
            self._log_samples(batch.indices)
            sync = micro == window - 1 or not self.ctx.distributed
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                out = self.objective.step(batch, self.forward)
                (out.loss / window).backward()
            self.window.add(out.sums)
            samples += len(batch)
        if self.settings.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.window.add({"grad_norm": norm, "grad_norm_count": 1.0})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.clock.step_done(samples)

    def forward(self, *args: Any) -> Any:
        """The (DDP-wrapped) objective module on `args`, in bf16 autocast on CUDA."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.ctx.device.type == "cuda"):
            return self.wrapped(*args)

    def _after_step(self, stop: StopRequest) -> str | None:
        settings, step = self.settings, self.step
        if self.progress is not None:  # for progress displays only; metrics.jsonl gets the logged records
            self.progress({"kind": "step", "step": step, "total_steps": self.total_steps, "epoch": self.epoch})
        if step % settings.log_every == 0:
            self._log_train()
        if settings.eval_every and step % settings.eval_every == 0:
            self.evaluate(epoch_end=False)
        reason = None
        if any_rank(stop.requested, self.ctx):
            reason = signal.Signals(stop.signum).name if stop.signum is not None else "SIGTERM"
        elif self.options.max_steps is not None and step >= self.options.max_steps:
            reason = "max_steps"
        if reason is not None or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            self.save()
        return reason

    # ------------------------------------------------------------------------------ metrics

    def _log_train(self) -> None:
        totals = all_reduce_sums(self.window.totals(), self.ctx)
        record: dict[str, Any] = {"kind": "train", "step": self.step, "epoch": self.epoch}
        record.update(self.objective.summarize(totals))
        if totals.get("grad_norm_count"):
            record["grad_norm"] = totals["grad_norm"] / totals["grad_norm_count"]
        record["lr"] = self.scheduler.get_last_lr()[0]
        clock = self.clock.summary()
        clock["samples_per_s"] *= self.ctx.world_size
        record.update(clock)
        record["peak_mem_mb"] = peak_memory_mb(self.ctx.device)
        self.metrics.write(record)
        self.window.reset()
        self.clock.reset()

    def evaluate(self, *, epoch_end: bool) -> None:
        """Let the objective evaluate; write its fields as an eval record."""
        fields = self.objective.evaluate(self, epoch_end=epoch_end)
        if fields is None:
            return
        self.last_eval = fields
        self.write_eval(fields)

    def write_eval(self, fields: dict[str, Any]) -> None:
        """An eval record at this step (`fields` may set its own `epoch`)."""
        self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.epoch, **fields})
        self.clock.reset()  # evaluation time is not training throughput

    def _log_samples(self, indices: torch.Tensor) -> None:
        if not self.settings.log_sample_indices:
            return
        path = self.run_dir / "samples" / f"rank-{self.ctx.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": self.step, "epoch": self.epoch, "indices": indices.tolist()}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _close(batches: Any) -> None:
    """Stop a loader iterator's prefetch thread now rather than at garbage collection."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()
