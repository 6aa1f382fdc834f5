"""Console output shared by every command: logging, progress, and the one-line error.

Two audiences. On a terminal: rich log lines and live progress bars. Off one (a batch job whose
output goes to a file or a pipe): whole lines that are never wrapped, one timestamp format (the
same as `train.log`'s), and a progress line every `VILBERT_PROGRESS_EVERY` seconds (default 30)
with done/total, rate and ETA, so a job's log shows it is alive and how far it got.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vilbert.errors import UsageError

__all__ = [
    "console",
    "err_console",
    "setup_logging",
    "add_log_file",
    "print_error",
    "ProgressDisplay",
    "progress_interval",
]

_BATCH_WIDTH = 10_000
"""Off a terminal rich would wrap at 80 columns, splitting paths; lines are as long as they are."""


def _console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, soft_wrap=True, width=_BATCH_WIDTH)


console = _console(stderr=False)
err_console = _console(stderr=True)

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
"""The one timestamp format of batch logs and of every `train.log`."""


def _plain_formatter() -> logging.Formatter:
    return logging.Formatter(_LOG_FORMAT, datefmt=_DATE_FORMAT)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Route the `vilbert` loggers to stderr: through rich on a terminal, as plain lines otherwise."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("vilbert")
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_vilbert_console", False):
            root.removeHandler(handler)
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(
            console=err_console, show_path=verbose, rich_tracebacks=True, markup=False, log_time_format=_DATE_FORMAT
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_plain_formatter())
    handler._vilbert_console = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    root.addHandler(handler)
    root.propagate = False


def add_log_file(path: Path) -> logging.Handler:
    """Also write plain log lines to `path` (a run directory's `train.log`, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_plain_formatter())
    handler.setLevel(logging.DEBUG)
    logging.getLogger("vilbert").addHandler(handler)
    return handler


def print_error(message: str) -> None:
    """One red line on stderr."""
    err_console.print(f"error: {message}", style="bold red", markup=False, highlight=False, soft_wrap=True)


def progress_interval() -> float:
    """Seconds between progress lines off a terminal (`VILBERT_PROGRESS_EVERY`, default 30)."""
    raw = os.environ.get("VILBERT_PROGRESS_EVERY", "30")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise UsageError(f"VILBERT_PROGRESS_EVERY={raw!r}: expected a positive number of seconds")
    return seconds


class ProgressDisplay:
    """How far a long command got: a rich bar on a terminal, a log line at a steady interval otherwise.

    `update(done, total, info)` is cheap to call often; `note(text)` prints a whole line either way
    (above the bar on a terminal). Use as a context manager.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "items",
        force_lines: bool = False,
        heartbeat: bool = False,
    ) -> None:
        """
        Args:
            force_lines: Log lines even on a terminal (where something else draws the live view).
            heartbeat: Off a terminal, also log a line when the interval passes without an update (a
                thread does it): for work whose single steps can outlast the interval. Not for commands
                that fork worker processes while the display is open.
        """
        self.label, self.unit, self.total = label, unit, total
        self.done, self.info = 0, ""
        self.lines = force_lines or not err_console.is_terminal
        self._log = logging.getLogger("vilbert.progress")
        self._every = progress_interval()
        self._start = self._last_line = time.monotonic()
        self._bar: Progress | None = None
        self._task: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beats, daemon=True) if heartbeat and self.lines else None

    def __enter__(self) -> ProgressDisplay:
        self._start = self._last_line = time.monotonic()
        if self._beat is not None:
            self._beat.start()
        if not self.lines:
            self._bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
                auto_refresh=False,
            )
            self._task = self._bar.add_task(self.label, total=self.total, info="")
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None and self._beat.is_alive():
            self._beat.join()
        if self._bar is not None:
            self._bar.stop()
        elif exc[0] is None and self.done:
            self._log.info("%s", self.line(final=True))

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        """Record progress; draws the bar, or logs a line when the interval has passed."""
        self.done, self.info = done, info
        if total is not None:
            self.total = total
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, info=info)
            if now - self._last_line > 0.2:
                self._last_line = now
                self._bar.refresh()
        else:
            self._line_if_due(now)

    def _line_if_due(self, now: float) -> None:
        with self._lock:
            if now - self._last_line < self._every:
                return
            self._last_line = now
        self._log.info("%s", self.line())

    def _beats(self) -> None:
        while not self._stop.wait(self._every / 4):
            self._line_if_due(time.monotonic())

    def note(self, text: str) -> None:
        """A whole line: printed above the bar on a terminal, logged otherwise."""
        if self._bar is not None:
            self._bar.console.print(text, soft_wrap=True, markup=False, highlight=False)
        else:
            self._log.info("%s", text)

    def line(self, final: bool = False) -> str:
        """`label: done/total (pct) rate/s, ETA h:mm:ss | info`."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total:,} ({self.done / self.total:.0%})" if self.total else ""
        eta = ""
        if self.total and rate > 0 and not final:
            eta = f", ETA {_clock((self.total - self.done) / rate)}"
        word = "done in " + _clock(elapsed) if final else f"{_clock(elapsed)} elapsed"
        tail = f" | {self.info}" if self.info else ""
        return f"{self.label}: {self.done:,}{of} {self.unit}, {rate:,.1f} {self.unit}/s, {word}{eta}{tail}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
