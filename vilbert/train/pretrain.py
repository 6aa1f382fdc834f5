"""The pretraining loop: cache batches -> tasks built on the device -> ViLBERT -> AdamW.

    BatchLoader (this rank's slice) -> build_task_batch (AP swap, MLM, MIM masks; generator)
        -> PretrainObjective (DDP) -> loss / grad_accum -> backward -> clip -> AdamW -> schedule
        -> every log_every: metrics.jsonl; every eval_every and each epoch's end: eval on the test
           split; every checkpoint_every, each epoch's end, at max_steps and on SIGTERM/SIGINT:
           an atomic checkpoint

A step is one optimizer step (`grad_accum` micro-batches). A checkpoint holds everything a step
depends on (weights, optimizer, schedule, loader position, every RNG state including the masking
generator's, per rank), so `resume=True` continues exactly: N steps + resume + N steps give the same
parameters as 2N steps. The schedule spans `epochs`; `max_steps` only stops early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vilbert.cache import BatchLoader, CacheReader, is_cache, verify_cache
from vilbert.config import Config, config_from_dict, config_to_dict
from vilbert.errors import CacheError, CheckpointError
from vilbert.model import ViLBERT
from vilbert.train.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng
from vilbert.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sums,
    any_rank,
    init_distributed,
    shutdown_distributed,
    wrap_ddp,
)
from vilbert.train.masking import PixelNormalizer, SpecialTokens
from vilbert.train.metrics import Accumulator, MetricsWriter, StepClock, peak_memory_mb
from vilbert.train.optim import build_optimizer, build_scheduler
from vilbert.train.preemption import StopRequest
from vilbert.train.tasks import PretrainObjective, build_task_batch, summarize, whole_caption_alignment

__all__ = ["PretrainOptions", "PretrainResult", "pretrain", "run_config", "open_split", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vilbert-pretrain/1"
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class PretrainOptions:
    """What a run needs besides its `Config`.

    Attributes:
        data: A cache root with `train/` (and `test/`, or `config.pretrain.eval_split`), or one cache.
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
class PretrainResult:
    """How a run ended: `stopped` is `completed`, `max_steps` or a signal name (`SIGTERM`)."""

    run_dir: Path
    step: int
    epoch: int
    stopped: str
    checkpoint: Path | None
    last_eval: dict[str, float] | None


def run_config(run_dir: str | Path) -> Config:
    """The config stored in a run's newest checkpoint (the base for `--resume` with `--set`)."""
    state = load_checkpoint(run_dir)
    return config_from_dict(state["config"])


def open_split(data: Path, split: str, *, verify: bool = False, num_labels: int | None = None) -> CacheReader | None:
    """`data/split` as a cache, `data` itself for `train` when it is a cache, or None when missing.

    `verify` checks every shard first (`verify_cache`: checksums, values, keys) and refuses a corrupt
    cache; `num_labels` bounds the labels the reader hands out (it range-checks every batch anyway).
    """
    data = Path(data)
    if is_cache(data / split):
        path = data / split
    elif split == "train" and is_cache(data):
        path = data
    elif split == "train":
        raise CacheError(f"no cache at {data}/train (nor {data} itself); build one with `vilbert preprocess`")
    else:
        return None
    if verify:
        verify_cache(path).raise_if_bad()
    return CacheReader(path, num_labels=num_labels)


def pretrain(config: Config, options: PretrainOptions, progress: Progress | None = None) -> PretrainResult:
    """Pretrain (or continue pretraining) a ViLBERT on a cache; see the module docstring.

    Launched by `torchrun`, each process runs this; rank 0 writes the run directory.

    Raises:
        CacheError: The cache does not fit the model (image size, normalization, vocabulary).
        CheckpointError: `resume` without a usable checkpoint, or one from an incompatible run.
    """
    ctx = init_distributed(options.device)
    try:
        session = _Session(config, options, ctx, progress)
        with StopRequest() as stop:
            return session.run(stop)
    finally:
        shutdown_distributed(ctx)


def _effective_config(config: Config, reader: CacheReader) -> Config:
    """The config with the text vocabulary of the cache's tokenizer; refuses caches that cannot fit."""
    manifest = reader.manifest
    text = config.model.text
    if reader.image_size != config.model.vision.image_size:
        raise CacheError(
            f"cache {reader.paths[0]} holds {reader.image_size}px images, the model expects "
            f"model.vision.image_size={config.model.vision.image_size}; rebuild the cache or set it to match"
        )
    if reader.max_len > text.max_position_embeddings:
        raise CacheError(
            f"cache max_len={reader.max_len} exceeds model.text.max_position_embeddings={text.max_position_embeddings}"
        )
    pad = int(manifest.special_token_ids["pad"])
    if text.vocab_size == manifest.vocab_size and text.pad_token_id == pad:
        return config
    if text.pretrained is not None:
        raise CacheError(
            f"cache tokenizer has {manifest.vocab_size} tokens (pad={pad}) but the pretrained text stream "
            f"{text.pretrained} has {text.vocab_size} (pad={text.pad_token_id}); build the cache with its tokenizer"
        )
    log.info("text vocabulary from the cache's tokenizer: %d tokens (pad id %d)", manifest.vocab_size, pad)
    text = dataclasses.replace(text, vocab_size=manifest.vocab_size, pad_token_id=pad)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, text=text))


def _normalizer(reader: CacheReader, model: ViLBERT, device: torch.device) -> PixelNormalizer:
    """float16 caches must be normalized as the vision weights expect; uint8 ones use the model's."""
    want_mean, want_std = tuple(model.image_mean), tuple(model.image_std)
    norm = reader.normalization
    same = all(abs(a - b) < 1e-6 for a, b in zip((*norm.mean, *norm.std), (*want_mean, *want_std), strict=True))
    if not same and reader.pixel_dtype == "float16":
        raise CacheError(
            f"cache {reader.paths[0]} holds float16 pixels normalized with {norm.describe()}, but the vision "
            f"weights expect mean={want_mean} std={want_std}; rebuild it with that normalization or with "
            "--pixel-dtype uint8 (normalized on the device)"
        )
    if not same:
        log.warning(
            "uint8 cache records %s; normalizing with the model's mean=%s std=%s", norm.describe(), want_mean, want_std
        )
    return PixelNormalizer(want_mean, want_std, device)


class _Session:
    """One process's state for a run; `run()` is the loop."""

    def __init__(self, config: Config, options: PretrainOptions, ctx: DistContext, progress: Progress | None):
        self.options, self.ctx = options, ctx
        verify = config.data.verify_cache
        self.train_reader = open_split(options.data, "train", verify=verify)
        self.config = _effective_config(config, self.train_reader)
        self.cfg = self.config.pretrain
        split = self.cfg.eval_split
        self.eval_reader = open_split(options.data, split, verify=verify) if split != "train" else None
        self._check_eval_reader()
        self.special = SpecialTokens.from_dict(self.train_reader.manifest.special_token_ids)
        self.vocab_size = self.train_reader.manifest.vocab_size
        self.run_dir = Path(options.run_dir)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=self.cfg.keep_last, enabled=ctx.is_main)
        self.metrics = MetricsWriter(
            self.run_dir / "metrics.jsonl" if ctx.is_main else None, progress, tensorboard=self.cfg.tensorboard
        )
        self.progress = progress if ctx.is_main else None
        self._build()

    def _check_eval_reader(self) -> None:
        if self.eval_reader is None:
            log.warning("no %r split under %s: training without evaluation", self.cfg.eval_split, self.options.data)
        elif self.eval_reader.tokenizer_fingerprint != self.train_reader.tokenizer_fingerprint:
            raise CacheError(f"{self.eval_reader.paths[0]} was built with another tokenizer than the train split")

    def _build(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = ViLBERT(self.config.model).to(ctx.device)
        self.normalizer = _normalizer(self.train_reader, self.model, ctx.device)
        self.objective = PretrainObjective(self.model, cfg)
        if cfg.compile:
            self.model.compile()  # in place: parameter names (and checkpoints) stay uncompiled
        self.trainer = wrap_ddp(self.objective, ctx)
        self.loader = BatchLoader(
            self.train_reader,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
        )
        if len(self.loader) == 0:
            raise CacheError(
                f"the train split has {len(self.train_reader)} rows: fewer than one batch of "
                f"{cfg.batch_size} per rank x {ctx.world_size} ranks"
            )
        self.steps_per_epoch = -(-len(self.loader) // cfg.grad_accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=cfg.warmup_steps, total_steps=self.total_steps, schedule=cfg.schedule
        )
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + ctx.rank)
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs between ranks
        self.step = 0
        if self.options.resume:
            self._resume()
        elif ctx.is_main:
            self._start_fresh()

    # ------------------------------------------------------------------------------- run dir

    def _start_fresh(self) -> None:
        if self.checkpoints.latest() is not None:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it, "
                "or choose another --run directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=2) + "\n")

    def _resume(self) -> None:
        state = load_checkpoint(self.run_dir)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{state['path']} is not a pretraining checkpoint ({state.get('format')!r})")
        if state["config"]["model"] != config_to_dict(self.config)["model"]:
            raise CheckpointError(
                f"{state['path']} was written with another model config; resume with the "
                "run's own config (only pretrain.* keys may change)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng(rng[self.ctx.rank], {"masking": self.generator})
        else:
            log.warning(
                "checkpoint has RNG states of %d ranks, this run has %d: reseeding, so the run "
                "continues but not bit-exactly",
                len(rng),
                self.ctx.world_size,
            )
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.ctx.rank + self.step)
        dropped = self.metrics.truncate_after(self.step)
        log.info(
            "resumed %s at step %d (epoch %d)%s",
            state["path"],
            self.step,
            self.loader.epoch,
            f"; dropped {dropped} metric records written after it" if dropped else "",
        )

    def save(self, *, complete: bool = False) -> Path | None:
        rng = all_gather_objects(capture_rng({"masking": self.generator}), self.ctx)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.loader.epoch,
            "complete": complete,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "config": config_to_dict(self.config),
            "data": str(self.options.data),
            "world_size": self.ctx.world_size,
        }
        path = self.checkpoints.save(state, self.step)
        self._saved_step = self.step
        if path is not None:
            log.info("checkpoint %s", path)
        return path

    # ---------------------------------------------------------------------------------- loop

    def run(self, stop: StopRequest) -> PretrainResult:
        cfg = self.cfg
        self._saved_step, self.last_eval, stopped, path = -1, None, "completed", None
        self._announce()
        self.clock, self.window = StepClock(), Accumulator()
        self.objective.train()
        if self.options.max_steps is not None and self.step >= self.options.max_steps:
            stopped = "max_steps"
        while self.loader.epoch < cfg.epochs and stopped == "completed":
            stopped = self._epoch(stop)
        if stopped == "completed" and self._saved_step != self.step:
            path = self.save(complete=True)
        elif stopped != "completed" and self._saved_step != self.step:
            path = self.save()
        path = path or self.checkpoints.latest()
        return PretrainResult(
            run_dir=self.run_dir,
            step=self.step,
            epoch=self.loader.epoch,
            stopped=stopped,
            checkpoint=path,
            last_eval=self.last_eval,
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
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "max_steps": self.options.max_steps,
                "parameters": report["total"],
                "trainable": report["trainable"],
                "world_size": self.ctx.world_size,
                "device": str(self.ctx.device),
            }
        )

    def _epoch(self, stop: StopRequest) -> str:
        """Train the rest of the current epoch; returns `completed` or why it stopped."""
        batches = iter(self.loader)
        remaining = len(self.loader) - self.loader.state_dict()["position"]
        while remaining > 0:
            window = min(self.cfg.grad_accum, remaining)
            self._optimizer_step(batches, window)
            remaining -= window
            reason = self._after_step(stop)
            if reason is not None:
                _close(batches)
                return reason
        _close(batches)
        self._evaluate()
        self.loader.set_epoch(self.loader.epoch + 1)
        self.save()
        return "completed"

    def _optimizer_step(self, batches: Any, window: int) -> None:
        cuda = self.ctx.device.type == "cuda"
        samples = 0
        for micro in range(window):
            batch = self.clock.next_from(batches)
            self._log_samples(batch.indices)
            tasks = self._task_batch(batch)
            sync = micro == window - 1 or not self.ctx.distributed
            with (
                contextlib.nullcontext() if sync else self.trainer.no_sync(),
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda),
            ):
                out = self.trainer(tasks)
                (out.loss / window).backward()
            self.window.add(out.sums)
            samples += len(batch)
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.window.add({"grad_norm": norm, "grad_norm_count": 1.0})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.clock.step_done(samples)

    def _task_batch(self, batch: Any, generator: torch.Generator | None = None) -> Any:
        return build_task_batch(
            batch.pixels,
            batch.input_ids,
            batch.num_tokens,
            config=self.cfg,
            special=self.special,
            vocab_size=self.vocab_size,
            num_patches=self.model.num_patches,
            normalizer=self.normalizer,
            generator=generator or self.generator,
        )

    def _after_step(self, stop: StopRequest) -> str | None:
        cfg, step = self.cfg, self.step
        if step % cfg.log_every == 0:
            self._log_train()
        if cfg.eval_every and step % cfg.eval_every == 0:
            self._evaluate()
        reason = None
        if any_rank(stop.requested, self.ctx):
            reason = _signal_name(stop.signum) if stop.signum is not None else "SIGTERM"
        elif self.options.max_steps is not None and step >= self.options.max_steps:
            reason = "max_steps"
        if reason is not None or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            self.save()
        return reason

    # ------------------------------------------------------------------------------ metrics

    def _log_train(self) -> None:
        totals = all_reduce_sums(self.window.totals(), self.ctx)
        record: dict[str, Any] = {"kind": "train", "step": self.step, "epoch": self.loader.epoch}
        record.update(summarize(totals, self.cfg))
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

    def _evaluate(self) -> None:
        if self.eval_reader is None:
            return
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
        generator = torch.Generator(device=ctx.device)
        generator.manual_seed(cfg.seed + 7919 * (ctx.rank + 1))  # the same masks at every evaluation
        swaps = torch.Generator(device=ctx.device)
        swaps.manual_seed(cfg.seed + 104_729 * (ctx.rank + 1))  # the same whole-caption pairs every time
        sums = Accumulator()
        self.objective.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            for i, batch in enumerate(loader):
                if cfg.eval_max_batches is not None and i >= cfg.eval_max_batches:
                    break
                sums.add(self.objective(self._task_batch(batch, generator)).sums)
                if "ap" in cfg.tasks:
                    pixels = self.normalizer.model_input(batch.pixels)
                    sums.add(whole_caption_alignment(
                        self.model, pixels, batch.input_ids, batch.num_tokens, generator=swaps
                    ))  # fmt: skip
        self.objective.train()
        totals = all_reduce_sums(sums.totals(), ctx)
        self.last_eval = summarize(totals, cfg)
        self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.loader.epoch, **self.last_eval})
        self.clock.reset()  # evaluation time is not training throughput

    def _log_samples(self, indices: torch.Tensor) -> None:
        if not self.cfg.log_sample_indices:
            return
        path = self.run_dir / "samples" / f"rank-{self.ctx.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": self.step, "epoch": self.loader.epoch, "indices": indices.tolist()}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _close(batches: Any) -> None:
    """Stop a loader iterator's prefetch thread now rather than at garbage collection."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name
