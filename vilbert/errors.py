"""The project's exceptions.

Every error a user can cause or meet (a bad path, a bad option, dirty data, a corrupt cache) is a
`VilbertError`. Its message names what failed, where, and what to do; the CLI prints it as one red
line and exits with `exit_code`: 2 for usage mistakes, 1 for runtime and data failures.
"""

from __future__ import annotations

__all__ = [
    "VilbertError",
    "UsageError",
    "ConfigError",
    "DataError",
    "CacheError",
    "FetchError",
    "ModelError",
    "CheckpointError",
]


class VilbertError(Exception):
    """Base class: a failure the user can understand and act on."""

    exit_code: int = 1


class UsageError(VilbertError):
    """A wrong argument, path or combination of options given by the user."""

    exit_code = 2


class ConfigError(UsageError):
    """An unknown config key or a value outside its valid range."""


class DataError(VilbertError):
    """Input data that cannot be used as a whole (a malformed file, an empty corpus)."""


class CacheError(VilbertError):
    """A cache directory that is missing, incomplete, corrupt or incompatible."""


class FetchError(VilbertError):
    """A download run that cannot proceed (unreadable URL list, unusable output directory)."""


class ModelError(VilbertError):
    """Weights or a model configuration that cannot be loaded or combined."""


class CheckpointError(VilbertError):
    """A run directory or checkpoint that is missing, corrupt or incompatible."""
