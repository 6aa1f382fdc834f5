"""Named recipes: a set of overrides applied to a preset for one kind of run.

    preset (tiny, vilbert_base, ...) -> recipe (cpu) -> TOML file -> --set overrides

A recipe is data (`Recipe`: a name, one line of purpose, `--set` strings), so `vilbert config recipes`
can list it and `--recipe NAME` can apply it on pretrain, finetune, ablate and demo. Why each value
of the `cpu` recipe was chosen, with the runs that measured it, is in docs/results.md (appendix).
"""

from __future__ import annotations

from dataclasses import dataclass

from vilbert.config import Config
from vilbert.errors import ConfigError
from vilbert.overrides import apply_overrides

__all__ = ["Recipe", "RECIPES", "recipe", "apply_recipe", "cpu"]


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Overrides that tune a preset for one kind of run.

    Attributes:
        name: What `--recipe` takes.
        purpose: One line for `vilbert config recipes`.
        overrides: `section.key=value` strings, applied together.
    """

    name: str
    purpose: str
    overrides: tuple[str, ...]

    def apply(self, config: Config) -> Config:
        """`config` with this recipe's overrides."""
        return apply_overrides(config, self.overrides)


CPU = Recipe(
    name="cpu",
    purpose="tiny from scratch in minutes on a CPU (the demo, ablate --quick, the learning test)",
    overrides=(
        "pretrain.tasks=[mlm,ap,mim,itc]",  # without the contrastive task AP stays at chance this small
        "model.itc_projection=poolers",  # held-out AP and the cross layers' gap were better than with heads
        "pretrain.mim_positions=masked",  # the MIM settings every figure in docs/results.md was measured with
        "pretrain.mim_stop_grad=true",
        "pretrain.augment=false",
        "model.initializer_range=0.07",  # BERT's 0.02 scaled to width 64: at 0.02 ITC never starts
        "data.max_len=32",
        "pretrain.batch_size=32",
        "pretrain.lr=1e-3",  # higher collapsed contrastive MIM
        "pretrain.ap_batch_size=24",
        "pretrain.mim_batch_size=8",  # MIM's second forward pass is the costly part
        "pretrain.itc_temperature=0.05",
        "pretrain.mlm_probability=0.3",
        "finetune.batch_size=32",
        "finetune.lr=1e-4",  # higher wiped out what pretraining gave the synthetic memes
        "model.text.dropout=0",  # dropout slows a tiny model more than it regularizes it
        "model.text.attention_dropout=0",
        "model.cross.dropout=0",
        "model.cross.attention_dropout=0",
    ),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (CPU,)}


def recipe(name: str) -> Recipe:
    """The recipe called `name`; `ConfigError` lists the valid names."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]


def apply_recipe(config: Config, name: str | None) -> Config:
    """`config` with the recipe called `name` applied (unchanged for None)."""
    return config if name is None else recipe(name).apply(config)


def cpu(config: Config) -> Config:
    """The `cpu` recipe applied to `config` (usually `tiny()`)."""
    return CPU.apply(config)
