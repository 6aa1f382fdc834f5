"""`vilbert pretrain`: pretrain on a cache with a live table; `--resume` continues a run exactly.

vilbert pretrain --data data/cache --out runs/tiny --preset tiny
vilbert pretrain --resume runs/tiny                         # same data, same config
torchrun --nproc-per-node 2 -m vilbert pretrain --data data/cache --out runs/ddp --preset tiny
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.live import Live
from rich.table import Table

from vilbert.cli._options import (
    CONFIG_OPTION,
    DEVICE_OPTION,
    MAX_STEPS_OPTION,
    RECIPE_OPTION,
    SET_OPTION,
    VERIFY_CACHE_OPTION,
    resolve_config,
)
from vilbert.cli.console import ProgressDisplay, add_log_file, console
from vilbert.config import Config, check_frozen_parts
from vilbert.errors import UsageError
from vilbert.overrides import apply_overrides, load_config

if TYPE_CHECKING:
    from vilbert.train.trainer import TrainResult

records_log = logging.getLogger("vilbert.cli.pretrain.records")
"""Metric records go to train.log only (the terminal shows them as a table or plain lines)."""
records_log.propagate = False
records_log.setLevel(logging.INFO)

_METRIC_ORDER = (
    "loss", "mlm_loss", "mlm_acc", "ap_loss", "ap_acc", "ap_whole_acc", "mim_loss", "mim_top1", "mim_content_top1",
    "itc_loss", "itc_acc",
)  # fmt: skip


def pretrain_command(
    run_arg: Path = typer.Argument(None, metavar="[RUN]", help="The run directory (same as --out)."),
    data: Path = typer.Option(
        None, "--data", exists=True, help="Cache root with train/ and test/ (from vilbert preprocess)."
    ),
    run: Path = typer.Option(None, "--out", help="Run directory: checkpoints, metrics.jsonl, config.json, train.log."),
    preset_name: str = typer.Option(None, "--preset", help="tiny, vilbert_base (default) or vilbert_original."),
    recipe_name: str = RECIPE_OPTION,
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from its newest checkpoint, exactly."),
    device: str = DEVICE_OPTION,
    max_steps: int = MAX_STEPS_OPTION,
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the model (CUDA graphs: --set pretrain.compile_mode=reduce-overhead)."
    ),
    verify_cache: bool = VERIFY_CACHE_OPTION,
) -> None:
    """Pretrain ViLBERT (MLM, alignment prediction, contrastive MIM) on a cache."""
    run_dir = _run_dir(run_arg, run)
    config, data = _config_and_data(run_dir, data, preset_name, recipe_name, config_file, overrides or [], resume)
    flags = {"pretrain.compile=true": compile_model, "data.verify_cache=true": verify_cache}
    config = apply_overrides(config, [override for override, given in flags.items() if given])
    check_frozen_parts(config.model)  # the run's own check, here before torch and the model load
    from vilbert.train.pretrain import PretrainOptions, pretrain

    main_rank = int(os.environ.get("RANK", "0")) == 0
    handler = None
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = add_log_file(run_dir / "train.log")
        records_log.addHandler(handler)
    options = PretrainOptions(data=data, run_dir=run_dir, resume=resume, device=device, max_steps=max_steps)
    try:
        with _Display() if main_rank else nullcontext() as display:  # other ranks show nothing
            result = pretrain(config, options, progress=display.update if display else None)
    finally:
        if handler is not None:
            _remove_log_file(handler)
    _finish(result, run_dir, main_rank)


def _remove_log_file(handler: logging.Handler) -> None:
    for logger in (records_log, logging.getLogger("vilbert")):
        logger.removeHandler(handler)
    handler.close()


def _run_dir(run_arg: Path | None, run: Path | None) -> Path:
    if run_arg is not None and run is not None and run_arg != run:
        raise UsageError(f"two run directories given: {run_arg} and --out {run}; give one")
    if run_arg is None and run is None:
        raise UsageError("no run directory: pass --out runs/NAME (or --resume runs/NAME)")
    return run_arg or run


def _config_and_data(
    run_dir: Path,
    data: Path | None,
    preset_name: str | None,
    recipe_name: str | None,
    config_file: Path | None,
    overrides: list[str],
    resume: bool,
) -> tuple[Config, Path]:
    """A new run: preset, TOML, --set. A resumed one: the run's stored config, then TOML and --set."""
    if not resume:
        if data is None:
            raise UsageError("--data is required for a new run (a cache root with train/ and test/)")
        return resolve_config(preset_name or "vilbert_base", config_file, overrides, recipe_name), data
    for option, given in (("--preset", preset_name), ("--recipe", recipe_name)):
        if given is not None:
            raise UsageError(
                f"{option} does not apply to --resume: the run keeps its config (use --set to change keys)"
            )
    from vilbert.train.checkpoint import load_checkpoint
    from vilbert.train.pretrain import run_config

    config = load_config(config_file, overrides, base=run_config(run_dir))
    if data is None:
        data = Path(load_checkpoint(run_dir)["data"])
    return config, data


def _finish(result: TrainResult, run_dir: Path, main_rank: bool) -> None:
    if not main_rank:
        return
    where = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint"
    if result.stopped in ("completed", "max_steps"):
        console.print(
            f"[bold green]{result.stopped}[/] at step {result.step} (epoch {result.epoch}); {where}",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(
        f"[bold yellow]stopped by {result.stopped}[/] at step {result.step}; {where}; "
        f"continue with: vilbert pretrain --resume {run_dir}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(128 + int(getattr(signal.Signals, result.stopped, signal.SIGTERM)))


class _Display:
    """Renders progress records: a live table on a terminal, one line per record otherwise; each
    record also goes to train.log."""

    def __init__(self) -> None:
        self.live: Live | None = None
        self.lines: ProgressDisplay | None = None
        self.start: dict[str, Any] = {}
        self.train: dict[str, Any] = {}
        self.eval: dict[str, Any] = {}

    def __enter__(self) -> _Display:
        if console.is_terminal:
            self.live = Live(self._table(), console=console, refresh_per_second=4, transient=False)
            self.live.start()
        else:  # a batch job: a progress line at a steady interval besides the records
            self.lines = ProgressDisplay("pretrain", unit="steps", force_lines=True, heartbeat=True).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
        if self.lines is not None:
            self.lines.__exit__(*exc)

    def update(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "step":
            if self.lines is not None:
                loss = self.train.get("loss")
                self.lines.update(record["step"], record["total_steps"], "" if loss is None else f"loss {loss:.4f}")
            return
        if kind == "start":
            self.start = record
        else:
            (self.train if kind == "train" else self.eval).update(record)
        line = f"{kind}: {_line(record)}"
        records_log.info(line)
        if self.live is not None:
            self.live.update(self._table())
        else:
            console.print(line, highlight=False, soft_wrap=True)

    def _table(self) -> Table:
        table = Table(title=self._title(), title_justify="left", min_width=72)
        table.add_column("metric")
        table.add_column("train", justify="right")
        table.add_column("eval", justify="right")
        for key in _METRIC_ORDER:
            if key in self.train or key in self.eval:
                table.add_row(key, _fmt(self.train.get(key)), _fmt(self.eval.get(key)))
        return table

    def _title(self) -> str:
        step, total = self.train.get("step", self.start.get("step", 0)), self.start.get("total_steps", "?")
        parts = [f"step {step}/{total}", f"epoch {self.train.get('epoch', self.start.get('epoch', 0))}"]
        if "samples_per_s" in self.train:
            parts += [
                f"{self.train['samples_per_s']:.0f} samples/s",
                f"data wait {100 * self.train['data_wait_frac']:.1f}%",
                f"lr {self.train['lr']:.2e}",
            ]
        if self.train.get("peak_mem_mb"):
            parts.append(f"{self.train['peak_mem_mb'] / 1024:.1f} GiB peak")
        return " | ".join(parts)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _line(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "kind" and v is not None)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
