"""Checkpoints of a run directory: atomic writes, the last K kept, `weights_only` loading, RNG states.

A run directory `runs/NAME/` holds `checkpoints/step-00000120.pt` files. Each is written to a
temporary file in the same directory, flushed to disk, then renamed over its final name, so a file
with a final name is always complete; a killed writer leaves at most a `*.tmp` that the next save
removes. A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: loading one never runs code from the file.

Generic: pretraining and fine-tuning put what they need into the dict they save.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vilbert.errors import CheckpointError

__all__ = [
    "PRETRAIN_FORMAT",
    "FINETUNE_FORMAT",
    "checkpoint_kind",
    "CheckpointManager",
    "load_checkpoint",
    "find_checkpoint",
    "model_from_checkpoint",
    "unwrap_model",
    "capture_rng",
    "restore_rng",
    "export_checkpoint",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8,})\.pt$")

PRETRAIN_FORMAT = "vilbert-pretrain/2"
FINETUNE_FORMAT = "vilbert-finetune/2"
"""A checkpoint's `format`; the version changes whenever what a checkpoint holds does. Files of
another version are refused (no upgrade shims in 0.x)."""
_KINDS = {PRETRAIN_FORMAT: "pretrain", FINETUNE_FORMAT: "finetune"}


def checkpoint_kind(state: dict[str, Any], expected: str | None = None) -> str:
    """`pretrain` or `finetune` for a loaded checkpoint of this version (of format `expected` if given).

    Raises:
        CheckpointError: Naming the file, its format and the format(s) read here.
    """
    fmt = state.get("format")
    valid = [expected] if expected is not None else list(_KINDS)
    if fmt in valid:
        return _KINDS[fmt]
    family = str(fmt).rpartition("/")[0]
    if family in {f.rpartition("/")[0] for f in valid}:
        raise CheckpointError(
            f"{state.get('path')} is a {fmt} checkpoint of an earlier vilbert; this version reads "
            f"{', '.join(valid)} only: retrain, or export the model with the version that wrote it"
        )
    raise CheckpointError(f"{state.get('path')} has format {fmt!r}; valid: {', '.join(valid)}")


class CheckpointManager:
    """Saves checkpoints under `run_dir/checkpoints/` and keeps the newest `keep_last`.

    Args:
        run_dir: The run directory.
        keep_last: How many checkpoints to keep (older ones are deleted after each save); 0 keeps all.
        enabled: False on DDP ranks other than 0: `save` does nothing there.
    """

    def __init__(self, run_dir: str | Path, *, keep_last: int = 3, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.enabled = enabled

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return _checkpoints(self.directory)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict[str, Any], step: int) -> Path | None:
        """Write `state` as the checkpoint of optimizer step `step`, atomically; prune old ones.

        Returns:
            The checkpoint's path, or None when this manager is disabled.
        """
        if not self.enabled:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{step:08d}.pt"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        self._prune(keep=final)
        log.debug("saved checkpoint %s", final)
        return final

    def _prune(self, keep: Path) -> None:
        for stale in self.directory.glob("*.pt.tmp"):
            stale.unlink(missing_ok=True)
        if self.keep_last <= 0:
            return
        for old in [p for p in self.paths() if p != keep][: -self.keep_last + 1 or None]:
            old.unlink(missing_ok=True)


def _checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory.

    Raises:
        CheckpointError: Nothing to resume from at `path`.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"no run directory or checkpoint at {path}")
    paths = _checkpoints(path / "checkpoints") or _checkpoints(path)
    if not paths:
        raise CheckpointError(f"{path} holds no checkpoint (looked for {path / 'checkpoints'}/step-*.pt)")
    return paths[-1]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file or a run directory's newest one with `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: Missing, truncated or not a checkpoint (the message names the file).
    """
    file = find_checkpoint(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several kinds for a truncated or foreign file
        raise CheckpointError(f"cannot load checkpoint {file}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a vilbert checkpoint (a {type(state).__name__}, not a dict)")
    state["path"] = str(file)
    return state


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and `torch.compile` wrappers, whose parameter names are canonical."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a step can touch: torch (CPU and each CUDA device), numpy, Python's
    `random`, and named extra generators (the masking generator). Tensors and plain values only.
    """
    keys, pos, has_gauss, cached = np.random.get_state(legacy=True)[1:]
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng` captured (generators by name; a missing one is an error)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            have = sorted(state["generators"])
            raise CheckpointError(f"the checkpoint has no state for generator {name!r}; it has {have}")
        generator.set_state(state["generators"][name].cpu())


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The `ViLBERT` of a loaded checkpoint dict (its `config["model"]` and `model` weights), on the CPU.

    The encoders' `pretrained` sources are not re-read: the weights come from the checkpoint. Shared by
    `export_checkpoint` and `vilbert.train.evaluate.load_model`.

    Raises:
        CheckpointError: The checkpoint has no model weights and model config, or they do not fit.
    """
    import dataclasses

    from vilbert.model import ViLBERT
    from vilbert.overrides import config_from_dict

    if "model" not in state or "model" not in state.get("config", {}):
        raise CheckpointError(f"{state.get('path', 'the checkpoint')} holds no model weights and model config")
    config = config_from_dict(state["config"]).model
    offline = dataclasses.replace(  # the weights come from the checkpoint, not from the encoders' sources
        config,
        text=dataclasses.replace(config.text, pretrained=None),
        vision=dataclasses.replace(config.vision, pretrained=None),
    )
    model = ViLBERT(offline)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{state.get('path')}: weights do not fit its model config: {err}") from None
    model.config = config
    return model


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint's model as `model.safetensors` + `config.json` for `ViLBERT.from_pretrained`.

    Args:
        path: A checkpoint file or a run directory (its newest checkpoint).
        out_dir: The export directory (created).

    Raises:
        CheckpointError: The checkpoint has no model weights and model config, or they do not fit.
    """
    return model_from_checkpoint(load_checkpoint(path)).save_pretrained(out_dir)
