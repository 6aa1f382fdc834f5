"""AdamW groups and the warmup + decay schedules."""

from __future__ import annotations

import math

import pytest
from torch import nn

from vilbert.config import tiny
from vilbert.model import ViLBERT
from vilbert.train.optim import (
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    pretrained_encoder_scale,
    warmup_steps_of,
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.embed = nn.Embedding(10, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_decay_on_biases_and_norms_and_frozen_skipped() -> None:
    net = _Net()
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.1)
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decayed) == {id(net.linear.weight), id(net.embed.weight)}
    assert ids(exempt) == {id(net.linear.bias), id(net.norm.weight), id(net.norm.bias)}


def test_vilbert_tokens_and_position_tables_do_not_decay() -> None:
    model = ViLBERT(tiny().model)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, exempt = ({names[id(p)] for p in group["params"]} for group in opt.param_groups)
    for name in (
        "vision.mask_token",
        "vision.vit.cls_token",
        "vision.vit.pos_embed",
        "text.embeddings.position_embeddings.weight",
        "text.embeddings.token_type_embeddings.weight",
        "text.embeddings.LayerNorm.weight",
    ):
        assert name in exempt, name
    assert "text.embeddings.word_embeddings.weight" in decayed  # BERT decays it: it is the MLM decoder too
    assert "cross.0.text.attention.self.query.weight" in decayed
    assert all(p.ndim >= 2 for name, p in model.named_parameters() if name in decayed)


def test_everything_frozen_is_an_error() -> None:
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(net, lr=1e-3, weight_decay=0.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_shape(schedule: str) -> None:
    values = [lr_multiplier(s, warmup_steps=10, total_steps=110, schedule=schedule) for s in range(110)]
    assert values[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True)), "warmup increases"
    assert values[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False)), "decay never increases"
        assert 0 < values[-1] < 0.05
    if schedule == "cosine":
        assert values[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_state_is_plain_and_resumes() -> None:
    net = nn.Linear(2, 2)
    opt = build_optimizer(net, lr=1.0, weight_decay=0.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10, schedule="linear")
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert all(v is None for v in state["lr_lambdas"]), "the closure is not stored"
    opt2 = build_optimizer(net, lr=1.0, weight_decay=0.0)
    sched2 = build_scheduler(opt2, warmup_steps=2, total_steps=10, schedule="linear")
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, warmup_steps=0, total_steps=1, schedule="step")


def test_pretrained_encoders_train_at_a_fraction_of_the_lr() -> None:
    """Lu et al.: BERT's weights at 0.1 x the learning rate of the new ones (here: any encoder with weights)."""
    import dataclasses

    config = tiny().model
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, pretrained="bert-dir"))
    model = ViLBERT(tiny().model)  # the names are what counts; no weights are read here
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, lr_scale=pretrained_encoder_scale(config, 0.1))
    names = {id(p): name for name, p in model.named_parameters()}
    by_lr = {}
    for group in opt.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert sorted(by_lr) == pytest.approx([1e-4, 1e-3])
    slow = by_lr[min(by_lr)]
    assert slow == {n for n in names.values() if n.startswith("text.")}
    assert "vision.vit.cls_token" in by_lr[max(by_lr)] and "cross.0.text.output.dense.weight" in by_lr[max(by_lr)]
    build_scheduler(opt, warmup_steps=0, total_steps=10, schedule="constant")  # the schedule keeps each group's lr
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-4, 1e-3])


def test_warmup_ratio_is_a_fraction_of_the_run() -> None:
    assert warmup_steps_of(0, 0.1, 1234) == 123
    assert warmup_steps_of(7, 0.1, 1234) == 7
    assert warmup_steps_of(0, 0.0, 1234) == 0
