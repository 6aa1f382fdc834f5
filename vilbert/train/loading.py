"""A model from wherever training left one: a run directory, a checkpoint file, or an export.

    runs/NAME or runs/NAME/checkpoints/step-*.pt (pretraining or fine-tuning)  -> LoadedModel
    an exported directory (model.safetensors + config.json, `vilbert export`)   -> LoadedModel

`check_compatible` then refuses a cache the model cannot read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vilbert.cache import CacheReader
from vilbert.config import Config
from vilbert.errors import CacheError, CheckpointError
from vilbert.model import ViLBERT
from vilbert.model.vilbert import CONFIG_NAME, WEIGHTS_NAME
from vilbert.overrides import config_from_dict
from vilbert.train.checkpoint import checkpoint_kind, load_checkpoint, model_from_checkpoint
from vilbert.train.splits import open_split

__all__ = ["LoadedModel", "load_model", "check_compatible"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model and where it came from.

    Attributes:
        model: The model, in eval mode, on the requested device.
        kind: `pretrain`, `finetune` or `export` (a `save_pretrained` directory).
        path: The checkpoint file or export directory read.
        config: The run's whole config (None for an export, which stores only the model section).
        step: Optimizer steps of the run at that checkpoint (None for an export).
        state: The checkpoint dict minus the weights (metadata: data path, epoch, ...).
    """

    model: ViLBERT
    kind: str
    path: Path
    config: Config | None
    step: int | None
    state: dict[str, Any]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a pretraining or fine-tuning checkpoint (file or run directory: its newest), or of
    a directory written by `save_pretrained` / `vilbert export`.

    Raises:
        CheckpointError: Nothing loadable at `path`, a checkpoint of an unknown format, or weights that
            do not fit its config.
    """
    path = Path(path)
    device = torch.device(device)
    if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
        model = ViLBERT.from_pretrained(path).to(device).eval()
        return LoadedModel(model=model, kind="export", path=path, config=None, step=None, state={})
    state = load_checkpoint(path, map_location="cpu")
    try:
        kind = checkpoint_kind(state)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (or an exported model directory with {WEIGHTS_NAME} and {CONFIG_NAME})") from None
    model = model_from_checkpoint(state)
    config = config_from_dict(state["config"])
    state.pop("model")
    for key in ("optimizer", "scheduler", "rng"):
        state.pop(key, None)
    model.to(device).eval()
    return LoadedModel(
        model=model, kind=kind, path=Path(state["path"]), config=config, step=int(state["step"]), state=state
    )


def check_compatible(loaded: LoadedModel, reader: CacheReader) -> None:
    """Refuse a cache the model cannot read: a larger vocabulary, another image size, or (when the
    checkpoint's training data can still be opened) another tokenizer than the model was trained with.

    Raises:
        CacheError: Naming both sides of the mismatch.
    """
    config, where = loaded.model.config, reader.paths[0]
    if reader.manifest.vocab_size > config.text.vocab_size:
        raise CacheError(
            f"{where} has a {reader.manifest.vocab_size}-token tokenizer but {loaded.path} a "
            f"{config.text.vocab_size}-token vocabulary; use a cache built with the model's tokenizer"
        )
    if reader.image_size != config.vision.image_size:
        raise CacheError(
            f"{where} holds {reader.image_size}px images, {loaded.path} expects {config.vision.image_size}px"
        )
    source = loaded.state.get("data")
    trained_on = _try_open_train(source) if source else None
    if trained_on is None:
        log.info("cannot compare tokenizers with %s's training data (%s)", loaded.path, source or "not recorded")
    elif trained_on.tokenizer_fingerprint != reader.tokenizer_fingerprint:
        raise CacheError(
            f"{where} was built with another tokenizer than {loaded.path}'s training data {source}; "
            "use the same tokenizer.json for both"
        )


def _try_open_train(path: str) -> CacheReader | None:
    try:
        return open_split(Path(path), "train")
    except (CacheError, OSError):
        return None
