"""Configuration: frozen, keyword-only dataclasses with the thesis's defaults.

A run is described by one `Config` with sections (`model`, `data`, `pretrain`, `finetune`). Presets
are functions that return a whole `Config` (`tiny()`, `vilbert_base()`, `vilbert_original()`); a value
outside its range raises `ConfigError` naming the field and the valid choices. TOML files and `--set`
overrides are read by `vilbert.overrides`, named recipes (`cpu`) live in `vilbert.recipes`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vilbert.errors import ConfigError

__all__ = [
    "TextConfig",
    "VisionConfig",
    "CrossConfig",
    "ModelConfig",
    "check_frozen_parts",
    "DataConfig",
    "PretrainConfig",
    "FinetuneConfig",
    "Config",
    "PRESETS",
    "preset",
    "tiny",
    "vilbert_base",
    "vilbert_original",
]


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; valid: {valid}")


def _positive(name: str, value: float) -> None:
    _check(value > 0, name, value, "> 0")


def _probability(name: str, value: float) -> None:
    _check(0.0 <= value < 1.0, name, value, "0 <= p < 1")


def _choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    _check(value in choices, name, value, "one of " + ", ".join(map(str, choices)))


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The BERT text stream (post-LayerNorm), shaped like `transformers.BertConfig`."""

    vocab_size: int = 30522
    """BERT-base uncased WordPiece vocabulary; a cache with another tokenizer overrides it."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    """The thesis TODO "add dropout in attention": BERT's attention_probs_dropout_prob."""
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    pretrained: str | None = None
    """A Hugging Face BERT directory (config.json + weights); None trains from scratch."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _positive(f"text.{name}", getattr(self, name))
        _check(
            self.hidden_size % self.num_heads == 0,
            "text.num_heads",
            self.num_heads,
            f"a divisor of text.hidden_size={self.hidden_size}",
        )
        _probability("text.dropout", self.dropout)
        _probability("text.attention_dropout", self.attention_dropout)


VISION_STEMS = ("patch", "conv")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The ViT vision stream: timm's `VisionTransformer`."""

    timm_name: str = "vit_base_patch16_224"
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pretrained: str | None = None
    """A timm model name (online) or a local safetensors/state-dict file; None: random init."""
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    """Per-channel pixel mean and std the vision weights were trained with. None: what the weights carry
    (timm's `pretrained_cfg` for a timm name, the metadata vilbert writes into its own weight files; a
    local file without that metadata is refused until both are set); without weights, timm's default
    for `timm_name`. Set, they must agree with what the weights carry."""
    stem: str = "patch"
    """How pixels become patch tokens. `patch`: timm's linear patch embedding (what timm's weights have).
    `conv`: a convolutional stem (conv3x3-ReLU-maxpool stages, Xiao et al. 2021, "Early convolutions help
    transformers see better"), one stage per halving, so `patch_size` is a power of 2; for small ViTs
    trained from scratch, which do not learn shapes from linear patches in a short budget."""
    stem_width: int = 16
    """Channels of the conv stem's first stage; each further stage doubles them, the last gives hidden_size."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "stem_width"):
            _positive(f"vision.{name}", getattr(self, name))
        _choice("vision.stem", self.stem, VISION_STEMS)
        if self.stem == "conv":
            _check(
                self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0,
                "vision.patch_size",
                self.patch_size,
                "a power of 2 (>= 2) with vision.stem=conv (one conv stage per halving)",
            )
        _check(
            self.image_size % self.patch_size == 0,
            "vision.patch_size",
            self.patch_size,
            f"a divisor of vision.image_size={self.image_size}",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            "vision.num_heads",
            self.num_heads,
            f"a divisor of vision.hidden_size={self.hidden_size}",
        )
        _probability("vision.dropout", self.dropout)
        _probability("vision.attention_dropout", self.attention_dropout)
        for name in ("image_mean", "image_std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_normalization(self.image_mean, self.image_std)


def _check_normalization(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    _check((mean is None) == (std is None), "vision.image_std", std, "set together with vision.image_mean")
    if mean is not None and std is not None:
        _check(len(mean) == 3, "vision.image_mean", mean, "3 numbers, one per RGB channel")
        _check(len(std) == 3 and all(s > 0 for s in std), "vision.image_std", std, "3 numbers > 0")


CROSS_LAYER_KINDS = ("co", "self")


@dataclass(frozen=True, kw_only=True)
class CrossConfig:
    """The cross-modal stack joining the two streams."""

    pattern: tuple[str, ...] = ("co", "self", "co", "self")
    """Thesis layout: co-attention, dual self-attention, co-attention, dual self-attention."""
    before_text_layer: tuple[int, ...] = ()
    """Where the stack sits in the text stream: cross layer i runs right before text layer
    `before_text_layer[i]` (0-based; `text.num_layers` means after the last), like Lu et al.'s
    `t_biattention_id`. Empty: every cross layer after the last text layer (the thesis)."""
    before_vision_layer: tuple[int, ...] = ()
    """The same for the vision stream's blocks (Lu et al.'s `v_biattention_id`); empty: after the last
    block. Between two cross layers the text layers run first, then the vision blocks; after the last
    cross layer the remaining vision blocks, then the remaining text layers (the original's order)."""
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("pattern", "before_text_layer", "before_vision_layer"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for kind in self.pattern:
            _choice("cross.pattern item", kind, CROSS_LAYER_KINDS)
        for name in ("hidden_size", "num_heads", "intermediate_size"):
            _positive(f"cross.{name}", getattr(self, name))
        _check(
            self.hidden_size % self.num_heads == 0,
            "cross.num_heads",
            self.num_heads,
            f"a divisor of cross.hidden_size={self.hidden_size}",
        )
        for stream in ("text", "vision"):
            _check_schedule(f"cross.before_{stream}_layer", getattr(self, f"before_{stream}_layer"), len(self.pattern))
        _probability("cross.dropout", self.dropout)
        _probability("cross.attention_dropout", self.attention_dropout)


def _check_schedule(name: str, before: tuple[int, ...], count: int) -> None:
    ordered = all(i >= 0 for i in before) and all(a <= b for a, b in itertools.pairwise(before))
    valid = f"empty (after the last layer), or {count} non-decreasing layer indices >= 0, one per cross.pattern item"
    _check(not before or (len(before) == count and ordered), name, list(before), valid)


FREEZABLE_PARTS = ("text", "vision", "cross", "heads")
ITC_PROJECTIONS = ("poolers", "heads")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """ViLBERT: two streams, a cross-modal stack, task heads."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    cross: CrossConfig = field(default_factory=CrossConfig)
    freeze: tuple[str, ...] = ("text", "vision")
    """The thesis froze both pretrained encoders and trained only the cross layers and heads. A run that
    would freeze an encoder without pretrained weights (`text.pretrained` / `vision.pretrained` unset) is
    refused at its start, unless `allow_random_frozen`."""
    allow_random_frozen: bool = False
    """Let a run freeze an encoder that has no pretrained weights, i.e. keep it random (for tests)."""
    mim_projection_dim: int = 256
    itc_projection: str = "poolers"
    """What maps the unimodal first tokens into the space the image-text contrastive task (ITC) compares.
    `poolers`: the poolers' Linear maps, so ITC aligns the space the alignment head multiplies in (what the
    CPU recipe measured best); `heads`: separate Linear maps (ALBEF's projections), so the poolers stay
    ViLBERT's, trained by AP alone, and `vilbert analyse` does not read ITC's own map. Configs written
    before this key existed used `poolers`."""
    num_labels: int = 2
    initializer_range: float = 0.02
    """Std of the normal init of every linear and embedding weight built from scratch (BERT's 0.02),
    a from-scratch ViT's blocks and position embeddings included. Pretrained encoders keep their
    weights. BERT's value was chosen for width 768, where a projection then has a gain of about
    0.02 * sqrt(768) = 0.55; at width 64 the same gain needs about 0.07."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", tuple(self.freeze))
        for part in self.freeze:
            _choice("model.freeze item", part, FREEZABLE_PARTS)
        _positive("model.mim_projection_dim", self.mim_projection_dim)
        _choice("model.itc_projection", self.itc_projection, ITC_PROJECTIONS)
        _positive("model.initializer_range", self.initializer_range)
        _check(self.num_labels >= 2, "model.num_labels", self.num_labels, ">= 2")
        for stream in ("text", "vision"):
            layers, name = getattr(self, stream).num_layers, f"before_{stream}_layer"
            before = getattr(self.cross, name)
            _check(
                all(i <= layers for i in before),
                f"model.cross.{name}",
                list(before),
                f"layer indices 0..{layers} (model.{stream}.num_layers={layers}: {layers} means after the last)",
            )


def check_frozen_parts(config: ModelConfig) -> None:
    """Refuse, at a run's start, to freeze an encoder that would stay random.

    Raises:
        ConfigError: `freeze` names `text` or `vision` while its `pretrained` is unset and
            `allow_random_frozen` is off; one line naming the keys to set.
    """
    random = [part for part in ("text", "vision") if part in config.freeze and getattr(config, part).pretrained is None]
    if random and not config.allow_random_frozen:
        keys = " and ".join(f"model.{part}.pretrained" for part in random)
        streams = " and ".join(random) + (" streams" if len(random) > 1 else " stream")
        raise ConfigError(
            f"model.freeze={list(config.freeze)} would keep the {streams} random: set {keys} to the weights, "
            "leave it out of model.freeze, or set model.allow_random_frozen=true"
        )


# ---------------------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the cache was (or will be) built with."""

    image_size: int = 224
    max_len: int = 36
    """ViLBERT's maximum caption length in tokens."""
    train_ratio: float = 0.8
    """The thesis split Conceptual Captions 80/20 into train and test."""
    verify_cache: bool = False
    """Check every shard's checksum and values before training starts (a full read of the cache;
    every batch is range-checked anyway)."""

    def __post_init__(self) -> None:
        _positive("data.image_size", self.image_size)
        _check(self.max_len >= 3, "data.max_len", self.max_len, ">= 3 ([CLS] x [SEP])")
        _check(0.0 < self.train_ratio < 1.0, "data.train_ratio", self.train_ratio, "0 < r < 1")


PRETRAIN_TASKS = ("mlm", "ap", "mim", "itc")
MIM_NEGATIVES = ("image", "batch")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """The pretraining loop and its three tasks."""

    tasks: tuple[str, ...] = ("mlm", "ap", "mim")
    """ViLBERT's three. `itc` (ALBEF's image-text contrastive loss on the streams' first tokens before
    the cross stack) is the fourth option: it is what lets alignment prediction learn from scratch."""
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's optimizer steps (BERT's and Lu et al.'s `warmup_proportion`),
    used when `warmup_steps` is 0."""
    pretrained_lr_scale: float = 1.0
    """Factor on `lr` for the encoders loaded from `model.text.pretrained` / `model.vision.pretrained`
    (Lu et al. train BERT's weights at 0.1 x the rate of the new ones)."""
    schedule: str = "linear"
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    mlm_probability: float = 0.15
    """BERT: 15% of real tokens are selected; of those 80% [MASK], 10% random, 10% unchanged."""
    mim_mask_ratio: float = 0.4
    mim_temperature: float = 0.1
    mim_positions: str = "unmasked"
    """Where the InfoNCE queries are: `unmasked` patches (the thesis: "compute infoNCE ... ONLY FOR UNMASKED
    tokens"), `masked` ones (ConMIM/iBOT, Lu et al.'s masked-region loss), or `all`."""
    mim_negatives: str = "image"
    """InfoNCE negatives of a patch: `image`, the same image's other patches (the thesis); `batch`, also every
    patch of the other MIM rows' images (Lu et al.'s NCE variant draws most from other images). With
    `image` the target view's position embeddings alone can tell the positive (see `mim_content_top1`)."""
    mim_stop_grad: bool = False
    """No gradient through the unmasked (target) view, like ConMIM's and iBOT's teacher view (and Lu et
    al.'s detector targets). The thesis: "gradient stopping - not used"."""
    itc_temperature: float = 0.1
    """Temperature of the image-text contrastive InfoNCE (`itc`)."""
    itc_token_weight: float = 0.0
    """Weight of ITC's token-level term (FILIP's late interaction), added to the global one: a caption
    scores an image by each caption token's best cosine over the image's patches, averaged over the
    caption's tokens; a second symmetric InfoNCE over those scores. It gives every word, not just the
    first token, a contrastive signal to the patches. 0: ALBEF's global term only."""
    mlm_weight: float = 1.0
    ap_weight: float = 1.0
    mim_weight: float = 1.0
    itc_weight: float = 1.0
    """Each task's weight in the total loss."""
    mlm_batch_size: int | None = None
    ap_batch_size: int | None = None
    mim_batch_size: int | None = None
    itc_batch_size: int | None = None
    """A task's own batch size: N rows of each shuffled batch (MIM the last N, the others the first N, so
    AP and ITC see unmasked images where they can); None: the whole batch. A small
    MIM batch saves most of its second (target-view) forward pass (the thesis TODO "different
    batchsizes for tasks")."""
    align_only_for_mlm_mim: bool = True
    """MLM and MIM only on aligned pairs: a masked colour word cannot be recovered from another image. The
    thesis gave each sample one task, and only AP's samples were mismatched; Lu et al. compute both
    masked losses on mismatched pairs too (`False`)."""
    augment: bool = True
    """On-device random resized crop + colour jitter of the images (both MIM views share it); the thesis
    lists its augmentation pipeline as done."""
    augment_crop_scale: float = 0.6
    """Smallest crop area, as a fraction of the image."""
    augment_flip: float = 0.0
    """Horizontal flip probability; 0 because captions say "left of"."""
    augment_jitter: float = 0.3
    """Brightness, contrast and saturation factors in [1 - j, 1 + j] (no hue: captions name colours)."""
    log_every: int = 10
    """Optimizer steps per train record in metrics.jsonl."""
    eval_every: int = 0
    """Steps between evaluations besides each epoch's end; 0: only at epoch ends."""
    eval_split: str = "test"
    """The cache split (a directory beside `train`) evaluated; a missing one skips evaluation."""
    eval_max_batches: int | None = None
    """Cap on evaluation batches (None: the whole split)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints besides each epoch's end; 0: only at epoch ends."""
    keep_last: int = 3
    """Checkpoints kept in runs/NAME/checkpoints (older ones are deleted); 0 keeps all."""
    compile: bool = False
    """torch.compile the model (checkpoints keep the uncompiled parameter names)."""
    compile_mode: str = "default"
    """`torch.compile`'s mode where `compile` is on: `reduce-overhead` replays the model's kernels as CUDA
    graphs (benchmarks/RESULTS.md, gpu_check), `max-autotune` also tunes matmuls (slow to compile)."""
    tensorboard: bool = False
    """Also write every metrics.jsonl value as a TensorBoard scalar under runs/NAME/tensorboard/ (needs the
    `tensorboard` extra)."""
    log_sample_indices: bool = False
    """Each rank appends the cache indices of its batches to runs/NAME/samples/rank-R.jsonl (for tests)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        _check(len(self.tasks) > 0, "pretrain.tasks", self.tasks, "a non-empty subset of " + ", ".join(PRETRAIN_TASKS))
        for task in self.tasks:
            _choice("pretrain.tasks item", task, PRETRAIN_TASKS)
        for task in PRETRAIN_TASKS:
            weight, size = getattr(self, f"{task}_weight"), getattr(self, f"{task}_batch_size")
            _check(weight >= 0, f"pretrain.{task}_weight", weight, ">= 0")
            valid = f"None or 1..pretrain.batch_size={self.batch_size}"
            _check(size is None or 1 <= size <= self.batch_size, f"pretrain.{task}_batch_size", size, valid)
        ap_rows = self.ap_batch_size or self.batch_size
        valid = ">= 2 (half of the AP batch gets another row's caption)"
        _check("ap" not in self.tasks or ap_rows >= 2, "pretrain.ap_batch_size", ap_rows, valid)
        itc_rows = self.itc_batch_size or self.batch_size
        valid = ">= 2 (ITC contrasts each caption with the other rows' images)"
        _check("itc" not in self.tasks or itc_rows >= 2, "pretrain.itc_batch_size", itc_rows, valid)
        _check(0 < self.augment_crop_scale <= 1, "pretrain.augment_crop_scale", self.augment_crop_scale, "0 < s <= 1")
        _check(0 <= self.augment_flip <= 1, "pretrain.augment_flip", self.augment_flip, "0 <= p <= 1")
        _probability("pretrain.augment_jitter", self.augment_jitter)
        _check(self.log_every >= 1, "pretrain.log_every", self.log_every, ">= 1")
        for name in ("keep_last", "eval_every", "checkpoint_every"):
            _check(getattr(self, name) >= 0, f"pretrain.{name}", getattr(self, name), ">= 0")
        batches = self.eval_max_batches
        _check(batches is None or batches >= 1, "pretrain.eval_max_batches", batches, "None or >= 1")
        for name in ("epochs", "batch_size", "lr", "grad_accum", "mim_temperature", "itc_temperature"):
            _positive(f"pretrain.{name}", getattr(self, name))
        _check(self.weight_decay >= 0, "pretrain.weight_decay", self.weight_decay, ">= 0")
        _check(self.itc_token_weight >= 0, "pretrain.itc_token_weight", self.itc_token_weight, ">= 0 (0: off)")
        _check(self.warmup_steps >= 0, "pretrain.warmup_steps", self.warmup_steps, ">= 0")
        _probability("pretrain.warmup_ratio", self.warmup_ratio)
        _positive("pretrain.pretrained_lr_scale", self.pretrained_lr_scale)
        _check(self.grad_clip >= 0, "pretrain.grad_clip", self.grad_clip, ">= 0 (0 disables)")
        _choice("pretrain.schedule", self.schedule, ("linear", "cosine", "constant"))
        _choice("pretrain.compile_mode", self.compile_mode, COMPILE_MODES)
        _check(0 < self.mlm_probability < 1, "pretrain.mlm_probability", self.mlm_probability, "0 < p < 1")
        _check(0 < self.mim_mask_ratio < 1, "pretrain.mim_mask_ratio", self.mim_mask_ratio, "0 < r < 1")
        _choice("pretrain.mim_positions", self.mim_positions, ("masked", "unmasked", "all"))
        _choice("pretrain.mim_negatives", self.mim_negatives, MIM_NEGATIVES)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Binary classification (Hateful Memes) on top of a (pre)trained model."""

    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    grad_accum: int = 1
    """Micro-batches per optimizer step (the batch per step is batch_size x grad_accum x ranks)."""
    seed: int = 0
    schedule: str = "linear"
    """Warmup, then linear decay to 0 at the last step (BERT's fine-tuning schedule)."""
    dev_split: str = "dev_seen"
    """Evaluated every epoch (a cache directory beside `train`); a missing one is skipped."""
    test_split: str = "test_seen"
    """Evaluated once, at the end; a missing one is skipped."""
    eval_batch_size: int = 128
    log_every: int = 10
    """Optimizer steps per train record in metrics.jsonl."""
    tensorboard: bool = False
    """Also write every metrics.jsonl value as a TensorBoard scalar under runs/NAME/tensorboard/ (needs the
    `tensorboard` extra)."""
    checkpoint_every: int = 0
    """Steps between checkpoints besides each epoch's end; 0: only at epoch ends."""
    keep_last: int = 2
    """Checkpoints kept in runs/NAME/checkpoints; 0 keeps all."""
    reinit_classifier: bool = True
    """Draw the classifier head from `seed` even when starting from a checkpoint (its head is untrained),
    so seeds differ in the head as they do from scratch."""
    compile: bool = False
    """torch.compile the model (checkpoints keep the uncompiled parameter names)."""
    compile_mode: str = "default"
    """`torch.compile`'s mode where `compile` is on: `reduce-overhead` replays the model's kernels as CUDA
    graphs (benchmarks/RESULTS.md, gpu_check), `max-autotune` also tunes matmuls (slow to compile)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "grad_accum", "eval_batch_size", "log_every"):
            _positive(f"finetune.{name}", getattr(self, name))
        _check(self.weight_decay >= 0, "finetune.weight_decay", self.weight_decay, ">= 0")
        _check(self.warmup_steps >= 0, "finetune.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.grad_clip >= 0, "finetune.grad_clip", self.grad_clip, ">= 0 (0 disables)")
        _choice("finetune.schedule", self.schedule, ("linear", "cosine", "constant"))
        _choice("finetune.compile_mode", self.compile_mode, COMPILE_MODES)
        for name in ("checkpoint_every", "keep_last"):
            _check(getattr(self, name) >= 0, f"finetune.{name}", getattr(self, name), ">= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run needs, by section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        _check(
            self.data.image_size == self.model.vision.image_size,
            "data.image_size",
            self.data.image_size,
            f"equal to model.vision.image_size={self.model.vision.image_size}",
        )


# ----------------------------------------------------------------------------------------- presets


def vilbert_base() -> Config:
    """The thesis: BERT-base and ViT-B/16, both frozen, then co, self, co, self; its task settings.

    Every field default is the thesis's; where the thesis did not say, the default says what it follows.
    `docs/fidelity.md` lists each choice against the thesis and Lu et al.
    """
    return Config()


def vilbert_original() -> Config:
    """Lu et al. 2019: co-attention interleaved with the upper six layers of both streams, and their
    pretraining settings (`bert_base_6layer_6conect`, `train_concap.py`), as far as a ViT stands in for
    their detector's region features.

    As in their released config, co-layer i runs right before text layer 6+i (`t_biattention_id` 6..11),
    so BERT's layer 11 runs after the last one, at a width of 1024 with 8 heads (`bi_hidden_size`,
    `bi_num_attention_heads`), and nothing is frozen. Their 6-layer vision stream sits on a detector and
    every one of its layers follows a co-layer (`v_biattention_id` 0..5); a 12-block ViT is its own
    feature extractor, so its upper six blocks play that part: co-layer i runs right before block 6+i,
    and block 11 after the last co-layer. The vision stream gets their `v_hidden_dropout_prob` and
    `v_attention_probs_dropout_prob` (0.1). Pretraining: lr 1e-4 with BERT's weights at 0.1 x, batch
    512, 10 epochs, 10% warmup then linear decay, masked losses on mismatched pairs too, 15% of the
    image masked; their masked-region target (a detector's class distribution) has no ViT counterpart,
    so MIM stays contrastive, at the masked patches, against the target view without gradient (their
    targets are fixed), with other images' patches as negatives (their NCE variant).
    """
    upper_six = tuple(range(6, 12))
    cross = CrossConfig(
        pattern=("co",) * 6,
        before_text_layer=upper_six,
        before_vision_layer=upper_six,
        hidden_size=1024,
        num_heads=8,
    )
    vision = VisionConfig(dropout=0.1, attention_dropout=0.1)
    pretrain = PretrainConfig(
        lr=1e-4,
        pretrained_lr_scale=0.1,
        batch_size=512,
        epochs=10,
        warmup_ratio=0.1,
        align_only_for_mlm_mim=False,
        mim_mask_ratio=0.15,
        mim_positions="masked",
        mim_negatives="batch",
        mim_stop_grad=True,
        augment=False,
    )
    return Config(model=ModelConfig(vision=vision, cross=cross, freeze=()), pretrain=pretrain)


def tiny() -> Config:
    """A few-hundred-thousand-parameter model for CPU tests and the demo: `vilbert_base`'s layout and task
    settings at tiny sizes, trainable, with a faster lr. What makes it learn in minutes on a CPU is
    the `cpu` recipe (`vilbert.recipes`)."""
    model = ModelConfig(
        text=TextConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        vision=VisionConfig(
            timm_name="vit_tiny_patch16_224", image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=2
        ),
        cross=CrossConfig(hidden_size=64, num_heads=2, intermediate_size=128),
        freeze=(),
        mim_projection_dim=32,
    )
    return Config(
        model=model,
        data=DataConfig(image_size=64),
        pretrain=PretrainConfig(lr=1e-3, batch_size=64, warmup_steps=20),
        finetune=FinetuneConfig(lr=5e-4, batch_size=64),
    )


PRESETS = {"vilbert_base": vilbert_base, "vilbert_original": vilbert_original, "tiny": tiny}


def preset(name: str) -> Config:
    """The preset called `name`; `ConfigError` lists the valid names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]()
