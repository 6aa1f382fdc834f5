"""vilbert: a data-pipeline-first toolkit for pretraining ViLBERT.

Packages by role (data flows one way):
`pipeline` (producers) -> `cache` (the on-disk contract) -> `train` (consumers) <- `model`;
`cli` is the only place with typer and rich.
"""

__version__ = "0.1.0"
"""The one place the version is written: pyproject.toml reads it (`dynamic = ["version"]`), and so does the
installed package's metadata."""

__all__ = ["__version__"]
