"""Run metrics: `metrics.jsonl` (one JSON object per line), running sums, timing.

Each record has `kind` (`train` or `eval`), `step` (optimizer steps done), `epoch`, and flat keys:
`<task>_loss`, `<task>_acc` (`mlm_acc`, `ap_acc`, `mim_top1`, `itc_acc`), `loss` (the weighted total), and for
`train` records `lr`, `grad_norm`, `samples_per_s`, `data_wait_s` (time blocked on the loader per
step), `data_wait_frac`, `step_time_s`, `peak_mem_mb` (CUDA: device memory; CPU: the process's
maximum RSS). The library reports each record to an optional callback as well (the CLI draws its
live table from it), and with `tensorboard` to TensorBoard event files; nothing here prints.

Generic: fine-tuning writes the same file with its own keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from vilbert.errors import ConfigError

__all__ = [
    "MetricsWriter",
    "TensorBoardSink",
    "TENSORBOARD_DIR",
    "read_metrics",
    "Accumulator",
    "StepClock",
    "peak_memory_mb",
]

Callback = Callable[[dict[str, Any]], None]


class MetricsWriter:
    """Appends records to `path` (flushed per line) and passes each to `callback`.

    Args:
        path: The `metrics.jsonl` file; None writes nothing (DDP ranks other than 0).
        callback: Called with every record (a progress display, say).
        tensorboard: Also write each record's numbers as TensorBoard scalars in `tensorboard/` beside `path`
            (`TensorBoardSink`).

    Raises:
        ConfigError: `tensorboard` without the tensorboard package installed.
    """

    def __init__(self, path: str | Path | None, callback: Callback | None = None, *, tensorboard: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.callback = callback
        self.tensorboard = TensorBoardSink(self.path.parent / TENSORBOARD_DIR) if tensorboard and self.path else None

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.callback is not None:
            self.callback(record)

    def truncate_after(self, step: int) -> int:
        """Drop records with `step` greater than `step` (a resumed run redoes them); returns how many."""
        if self.path is None or not self.path.exists():
            return 0
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return len(records) - len(kept)


TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Every number of a metrics record as a TensorBoard scalar `<kind>/<key>` (`train/loss`, `eval/mlm_acc`)
    at the record's `step`, flushed per record, so TensorBoard shows what metrics.jsonl holds.

    The event file opens at the first record; a resumed run purges the events from that step on (as
    `MetricsWriter.truncate_after` drops those records), so a curve never holds a step twice.

    Args:
        directory: The event files' directory (`runs/NAME/tensorboard`).

    Raises:
        ConfigError: The tensorboard package is not installed.
    """

    def __init__(self, directory: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise ConfigError(
                "pretrain.tensorboard / finetune.tensorboard = true needs the tensorboard package: "
                "pip install 'vilbert[tensorboard]'"
            ) from None
        self.directory = Path(directory)
        self._make_writer = SummaryWriter
        self._writer: Any = None

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        if self._writer is None:
            self._writer = self._make_writer(str(self.directory), purge_step=step)
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{kind}/{key}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN/Infinity, which Python's json reads back
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (a run directory is accepted too); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return records


class Accumulator:
    """Sums of named scalars (device tensors or numbers) over a window, synced to the host once, at `totals()`.

    Keeping the sums on the device avoids a host sync per step on a GPU.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for key, value in values.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value

    def totals(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()


class StepClock:
    """Wall time of a logging window, the part spent waiting for data, and samples seen.

    `next_from()` wraps the loader's `next()`; `step_done(samples)` counts one optimizer step.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.steps = 0
        self.samples = 0

    def next_from(self, iterator: Iterator[Any]) -> Any:
        """`next(iterator)`, timed as waiting for data (StopIteration passes through)."""
        t0 = time.perf_counter()
        try:
            return next(iterator)
        finally:
            self.wait += time.perf_counter() - t0

    def step_done(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        return {
            "samples_per_s": self.samples / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_s": self.wait / steps,
            "data_wait_frac": self.wait / elapsed,
        }


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA, allocated device memory since the last reset; on CPU, the
    process's maximum resident set size (the host memory high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
