"""vilbert: a data-pipeline-first toolkit for pretraining ViLBERT.

Packages by role (data flows one way):
`pipeline` (producers) -> `cache` (the on-disk contract) -> `train` (consumers) <- `model`;
`cli` is the only place with typer and rich.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vilbert")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
