"""Console output shared by every command: logging through rich, and the one-line error."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

__all__ = ["console", "err_console", "setup_logging", "add_log_file", "print_error"]

console = Console()
err_console = Console(stderr=True)

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Route the `vilbert` loggers through a rich handler on stderr."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("vilbert")
    root.setLevel(level)
    for handler in list(root.handlers):
        if isinstance(handler, RichHandler):
            root.removeHandler(handler)
    handler = RichHandler(console=err_console, show_path=verbose, rich_tracebacks=True, markup=False)
    handler.setLevel(level)
    root.addHandler(handler)
    root.propagate = False


def add_log_file(path: Path) -> logging.Handler:
    """Also write plain log lines to `path` (a run directory's `train.log`, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.DEBUG)
    logging.getLogger("vilbert").addHandler(handler)
    return handler


def print_error(message: str) -> None:
    """One red line on stderr."""
    err_console.print(f"error: {message}", style="bold red", markup=False, highlight=False, soft_wrap=True)
