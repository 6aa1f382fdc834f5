"""Weight files: reading state dicts (safetensors, or torch files loaded with `weights_only=True`), loading
them exactly into a module, and the pixel normalization vilbert records in the vision files it writes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from vilbert.errors import ModelError

__all__ = ["read_state_dict", "load_exact", "normalization_metadata", "read_normalization", "NORMALIZATION_KEYS"]

NORMALIZATION_KEYS = ("image_mean", "image_std")
"""safetensors metadata keys of the per-channel pixel mean and std the weights were trained with (JSON lists)."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors in `path` by name.

    A `.safetensors` file is read with safetensors; anything else with `torch.load(...,
    weights_only=True)`, so a file cannot run code. A training checkpoint that wraps its weights in
    `state_dict` or `model` is unwrapped.

    Raises:
        ModelError: The file is missing, unreadable, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several unrelated types
        raise ModelError(f"cannot read weights from {path}: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)


def load_exact(module: nn.Module, state: Mapping[str, Tensor], what: str, hint: str = "") -> None:
    """Load `state` into `module` when it holds exactly the module's keys at the module's shapes.

    Args:
        module: Receives the weights.
        state: Weights under the module's own names.
        what: Names the source in the error (e.g. "BERT checkpoint in DIR").
        hint: What the user can do about a shape mismatch, appended to that error.

    Raises:
        ModelError: A missing or unexpected key, or a shape that does not fit (nothing is loaded then).
    """
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(f"{what} does not fit: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ModelError(
                f"{what}: {key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}"
                + (f"; {hint}" if hint else "")
            )
    module.load_state_dict(state)


def normalization_metadata(mean: Sequence[float], std: Sequence[float]) -> dict[str, str]:
    """safetensors metadata recording the pixel normalization weights were trained with, for
    `safetensors.torch.save_file(..., metadata=...)`; `read_normalization` reads it back."""
    return {
        "format": "pt",
        "image_mean": json.dumps(list(map(float, mean))),
        "image_std": json.dumps(list(map(float, std))),
    }


def read_normalization(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a weights file records (`normalization_metadata`), or None: torch files and
    safetensors files written by others carry none.

    Raises:
        ModelError: The file cannot be read, or its metadata is not 3 finite means and 3 stds > 0.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises several types for a damaged header
        raise ModelError(f"cannot read weights from {path}: {err}") from None
    if not any(key in metadata for key in NORMALIZATION_KEYS):
        return None
    try:
        mean, std = (tuple(float(x) for x in json.loads(metadata[key])) for key in NORMALIZATION_KEYS)
    except (KeyError, TypeError, ValueError):
        mean = std = ()
    valid = (
        len(mean) == len(std) == 3 and all(map(math.isfinite, mean)) and all(math.isfinite(s) and s > 0 for s in std)
    )
    if not valid:
        found = {key: metadata.get(key) for key in NORMALIZATION_KEYS}
        raise ModelError(f"{path}: metadata {found} is not 3 finite means and 3 stds > 0 (JSON lists)")
    return mean, std
