"""AdamW with BERT's and timm's decay exemptions, and warmup-then-decay learning-rate schedules.

Generic: pretraining and fine-tuning build their optimizer and schedule here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vilbert.config import ModelConfig
from vilbert.model import ViLBERT

__all__ = [
    "SCHEDULES",
    "TOKEN_PARAMETERS",
    "EMBEDDING_TABLES",
    "build_optimizer",
    "build_scheduler",
    "lr_multiplier",
    "decay_groups",
    "is_decay_exempt",
    "pretrained_encoder_scale",
    "warmup_steps_of",
]

SCHEDULES = ("linear", "cosine", "constant")


TOKEN_PARAMETERS = ("cls_token", "mask_token", "reg_token", "dist_token", "pos_embed")
"""Learned tokens and position tables (timm's `no_weight_decay` set, our MIM mask token): decaying them
pulls a token that is added to or stands in for an input towards zero, which is no regularizer."""
EMBEDDING_TABLES = ("position_embeddings.weight", "token_type_embeddings.weight")
"""BERT's position and segment tables: the same kind of parameter. The word embeddings do decay, as in
BERT: they double as the MLM decoder, a weight matrix."""


def is_decay_exempt(name: str, param: nn.Parameter) -> bool:
    """True for a parameter that does not weight-decay: biases and norm weights (fewer than 2 dimensions,
    or a name ending in `bias`), learned tokens and position tables (`TOKEN_PARAMETERS`), BERT's position
    and segment embeddings (`EMBEDDING_TABLES`)."""
    last = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or name.endswith("bias") or last in TOKEN_PARAMETERS or name.endswith(EMBEDDING_TABLES)


def decay_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """Trainable parameters in groups: decayed and exempt (`is_decay_exempt`), for each learning-rate factor
    `lr_scale(name)` gives (a group's `lr_scale`; all 1.0 without it); frozen ones are left out. Groups
    come in a fixed order (by factor, descending; decayed before exempt), so a checkpoint's optimizer
    state fits the same model and config again."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        groups.setdefault((scale, is_decay_exempt(name, param)), []).append(param)
    scales = sorted({scale for scale, _ in groups} | {1.0}, reverse=True)
    return [
        {"params": groups.get((scale, exempt), []), "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale}
        for scale in scales
        for exempt in (False, True)
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases, norm weights, tokens and position tables.

    Args:
        model: Its parameters with `requires_grad` are optimized (frozen parts are skipped).
        lr: Peak learning rate (the schedule multiplies it).
        weight_decay: Decoupled weight decay of the decayed group.
        lr_scale: A parameter name -> factor on `lr` (e.g. 0.1 for pretrained encoders); None: 1 for all.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        fused: Use the fused CUDA kernel; None picks it when every parameter is on CUDA.
    """
    groups = [g for g in decay_groups(model, weight_decay, lr_scale) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def pretrained_encoder_scale(model_config: ModelConfig, factor: float) -> Callable[[str], float]:
    """`lr_scale` for `build_optimizer`: `factor` for the parameters of the encoders that load pretrained
    weights (`model.text.pretrained` / `model.vision.pretrained` set), 1 for everything else."""
    loaded = {part for part in ("text", "vision") if getattr(model_config, part).pretrained is not None}
    return lambda name: factor if ViLBERT.part_of(name) in loaded else 1.0


def warmup_steps_of(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of the run's `total_steps` (rounded)."""
    return warmup_steps or round(warmup_ratio * total_steps)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The factor on the peak learning rate at optimizer step `step` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over `warmup_steps`, then `schedule`: `linear` decay to 0
    at `total_steps`, `cosine` decay to 0, or `constant`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is invalid; valid: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_multiplier`; call `.step()` after each optimizer step.

    The multiplier is a closure, which `LambdaLR.state_dict()` does not store: a checkpoint holds only
    the step count (loadable with `weights_only=True`), and a resumed run may change the schedule.
    """
    lr_multiplier(0, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)  # validate

    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
