"""Reading weight files: safetensors, or torch files loaded with `weights_only=True`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from vilbert.errors import ModelError

__all__ = ["read_state_dict"]


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
