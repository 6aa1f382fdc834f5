"""ViLBERT: a BERT text stream, a timm ViT vision stream, and a cross-modal stack between them.

    input_ids, attention_mask -> TextEncoder.embeddings ─┐
    pixels, image_mask       -> VisionEncoder.embed    ─┤  encoder blocks of both streams, with the
                                                         │  cross layers (config.cross.pattern) either
                                                         │  after the last block (the thesis) or each
                                                         │  right before the blocks config.cross names
                                                         │  (Lu et al.: text and vision 6..11)
                                                         └> ViLBERTOutput(text, vision, pooled_*)

The streams' first tokens as they enter the cross stack (`ViLBERTOutput.unimodal_*`) have seen only
their own modality; the image-text contrastive task compares those.

Heads (MLM, alignment, MIM projection, ITC's heads with `itc_projection=heads`, classifier) run only when called, so
`forward` costs the two streams, the cross stack and two poolers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vilbert import __version__
from vilbert.config import FREEZABLE_PARTS, ModelConfig
from vilbert.errors import ConfigError, ModelError
from vilbert.model.attention import init_bert_weights, padding_mask
from vilbert.model.cross import build_cross_layer
from vilbert.model.heads import AlignmentHead, Classifier, MIMProjection, MLMHead, Pooler
from vilbert.model.text import TextEncoder
from vilbert.model.vision import VisionEncoder
from vilbert.model.weights import load_exact, read_state_dict
from vilbert.overrides import config_from_dict, config_to_dict

__all__ = [
    "ViLBERT",
    "ViLBERTOutput",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "MODEL_TYPE",
    "MODEL_FORMAT",
    "cross_schedule",
    "parameter_counts",
    "without_pretrained_sources",
]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "vilbert"
"""`config.json`'s `model_type`, as in Hugging Face model directories (tools sort models by it)."""
MODEL_FORMAT = "vilbert-model/2"
"""The export's version, in the safetensors metadata; exports of another version are refused."""


@dataclass
class ViLBERTOutput:
    """What `ViLBERT.forward` returns.

    Attributes:
        text: `(B, T, Dt)` text stream after the last layer.
        vision: `(B, 1+P, Dv)` vision stream, [CLS] first.
        pooled_text: `(B, Dc)` first text token -> Linear -> ReLU.
        pooled_vision: `(B, Dc)` first vision token -> Linear -> ReLU.
        layer_pooled: With `output_layers`, one `(pooled_text, pooled_vision)` per cross layer, right
            after that layer, through the same poolers (so both live in the `Dc`-wide space the
            alignment head compares, whatever the stream widths); else None.
        layer_cls: With `output_layers`, the raw first tokens `(text[:, 0], vision[:, 0])` after each
            cross layer (no pooler); else None.
        unimodal_text_tokens: `(B, T, Dt)` the text stream entering the first cross layer (text only so far).
        unimodal_vision_tokens: `(B, 1+P, Dv)` the vision stream entering the first cross layer.
    """

    text: Tensor
    vision: Tensor
    pooled_text: Tensor
    pooled_vision: Tensor
    unimodal_text_tokens: Tensor
    unimodal_vision_tokens: Tensor
    layer_pooled: list[tuple[Tensor, Tensor]] | None = None
    layer_cls: list[tuple[Tensor, Tensor]] | None = None

    @property
    def unimodal_text(self) -> Tensor:
        """`(B, Dt)` first text token entering the first cross layer."""
        return self.unimodal_text_tokens[:, 0]

    @property
    def unimodal_vision(self) -> Tensor:
        """`(B, Dv)` first vision token entering the first cross layer."""
        return self.unimodal_vision_tokens[:, 0]


class ViLBERT(nn.Module):
    """The two-stream model. See the module docstring for the data flow.

    Args:
        config: The model section of a run config. `text.pretrained` / `vision.pretrained` load
            encoder weights at construction; `freeze` is applied at the end.

    Raises:
        ModelError: Weights that cannot be loaded, or a cross schedule that does not fit the encoders.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        t, v, c = config.text, config.vision, config.cross
        self.text = TextEncoder(t, init_std=config.initializer_range)
        bert_mlm_head = self.text.load_hf_weights(t.pretrained) if t.pretrained is not None else {}
        self.vision = VisionEncoder(v, init_std=config.initializer_range)
        # The normalization the vision weights carry becomes part of the config, so an export or a
        # checkpoint of this model normalizes as its weights expect without re-reading their source.
        normalization = {"image_mean": self.vision.image_mean, "image_std": self.vision.image_std}
        self.config = dataclasses.replace(config, vision=dataclasses.replace(v, **normalization))
        self._schedule = cross_schedule(config)
        self.cross = nn.ModuleList(build_cross_layer(kind, c, t.hidden_size, v.hidden_size) for kind in c.pattern)
        self.text_pooler = Pooler(t.hidden_size, c.hidden_size)
        self.vision_pooler = Pooler(v.hidden_size, c.hidden_size)
        self.mlm_head = MLMHead(t.hidden_size, t.vocab_size, t.layer_norm_eps)
        self.alignment_head = AlignmentHead(c.hidden_size, c.dropout)
        self.mim_head = MIMProjection(v.hidden_size, config.mim_projection_dim)
        self.classifier = Classifier(c.hidden_size, config.num_labels, c.dropout)
        if config.itc_projection == "heads":  # ITC's own maps; else it goes through the poolers' Linear maps
            self.itc_text_head = Pooler(t.hidden_size, c.hidden_size)
            self.itc_vision_head = Pooler(v.hidden_size, c.hidden_size)
        for module in self._new_modules():
            module.apply(functools.partial(init_bert_weights, std=config.initializer_range))
        if bert_mlm_head:  # BERT's own MLM transform and bias, as the original loads them
            load_exact(
                self.mlm_head, bert_mlm_head, f"the MLM head (cls.predictions) of the BERT checkpoint {t.pretrained}"
            )
            log.info("loaded BERT's MLM head from %s", t.pretrained)
        self.freeze(config.freeze)

    def _new_modules(self) -> Iterable[nn.Module]:
        return (
            self.cross,
            self.text_pooler,
            self.vision_pooler,
            self.mlm_head,
            self.alignment_head,
            self.mim_head,
            self.classifier,
            *self._itc_projections(),
        )

    def _itc_projections(self) -> tuple[Pooler, Pooler]:
        """The (text, vision) maps ITC compares through: `model.itc_projection`'s poolers or heads."""
        if self.config.itc_projection == "heads":
            return self.itc_text_head, self.itc_vision_head
        return self.text_pooler, self.vision_pooler

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixels: Tensor,
        image_mask: Tensor | None = None,
        output_layers: bool = False,
    ) -> ViLBERTOutput:
        """Run both streams and the cross stack.

        Args:
            input_ids: `(B, T)` token ids.
            attention_mask: `(B, T)`, 1 for real tokens, 0 for padding (position 0 must be real).
            pixels: `(B, 3, H, W)` normalized with `image_mean`/`image_std`.
            image_mask: `(B, P)` bool, True = that patch embedding is replaced by the mask token.
            output_layers: Also return the pooled streams after every cross layer.
        """
        if attention_mask.shape != input_ids.shape:
            raise ModelError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}; they must match"
            )
        if input_ids.shape[1] > self.config.text.max_position_embeddings:
            raise ModelError(
                f"input_ids have {input_ids.shape[1]} tokens; the text stream takes at most "
                f"model.text.max_position_embeddings={self.config.text.max_position_embeddings}"
            )
        mask = padding_mask(attention_mask)  # (B, 1, 1, T)
        text = self.text.embeddings(input_ids)  # (B, T, Dt)
        vision = self.vision.embed(pixels, image_mask)  # (B, 1+P, Dv)
        text, vision, after_cross, unimodal = self._layers(text, vision, mask, keep=output_layers)
        layer_pooled = [(self.text_pooler(t), self.vision_pooler(v)) for t, v in after_cross]
        layer_cls = [(t[:, 0], v[:, 0]) for t, v in after_cross]
        return ViLBERTOutput(
            text=text,
            vision=vision,
            pooled_text=self.text_pooler(text),
            pooled_vision=self.vision_pooler(vision),
            layer_pooled=layer_pooled if output_layers else None,
            layer_cls=layer_cls if output_layers else None,
            unimodal_text_tokens=unimodal[0],
            unimodal_vision_tokens=unimodal[1],
        )

    def _layers(
        self, text: Tensor, vision: Tensor, mask: Tensor, keep: bool
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        """Encoder blocks and cross layers in Lu et al.'s `BertEncoder` order -> both final streams, (with
        `keep`) both streams right after each cross layer, and both streams entering the first cross layer.

        Before cross layer i run the text layers up to `before_text_layer[i]`, then the vision blocks up to
        `before_vision_layer[i]`; after the last cross layer, the remaining vision blocks, then the
        remaining text layers.
        """
        after_cross: list[tuple[Tensor, Tensor]] = []
        unimodal: tuple[Tensor, Tensor] | None = None
        done_text = done_vision = 0
        for i, (before_text, before_vision) in enumerate(self._schedule):
            text = self._text_layers(text, mask, done_text, before_text)
            vision = self._vision_blocks(vision, done_vision, before_vision)
            done_text, done_vision = before_text, before_vision
            if i == 0:
                unimodal = (text, vision)
            text, vision = self.cross[i](text, vision, mask)
            if keep:
                after_cross.append((text, vision))
        vision = self._vision_blocks(vision, done_vision, len(self.vision.blocks))
        text = self._text_layers(text, mask, done_text, len(self.text.layers))
        if unimodal is None:  # no cross layers: the streams never met
            unimodal = (text, vision)
        return text, vision, after_cross, unimodal

    def _text_layers(self, text: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
        for j in range(start, stop):
            text = self.text.layers[j](text, mask)
        return text

    def _vision_blocks(self, vision: Tensor, start: int, stop: int) -> Tensor:
        for j in range(start, stop):
            vision = self.vision.blocks[j](vision)
        if start < stop == len(self.vision.blocks):
            vision = self.vision.norm(vision)  # ViT is pre-LN: its stream ends with a norm
        return vision

    # -------------------------------------------------------------------------------------- heads

    def mlm_logits(self, text_hidden: Tensor) -> Tensor:
        """`(M, Dt)` text states at the masked positions -> `(M, vocab)` logits (decoder = word
        embeddings)."""
        return self.mlm_head(text_hidden, self.text.embeddings.word_embeddings.weight)

    def alignment_logits(self, output: ViLBERTOutput) -> Tensor:
        """`(B, 2)`: logit 1 = caption and image belong together."""
        return self.alignment_head(output.pooled_text, output.pooled_vision)

    def contrastive_embeddings(self, output: ViLBERTOutput) -> tuple[Tensor, Tensor]:
        """Unit-norm `(B, Dc)` embeddings of the unimodal first tokens, (text, vision), through the Linear
        maps `model.itc_projection` names: the poolers' (the space the alignment head's pooled product
        lives in) or ITC's own heads."""
        text_map, vision_map = self._itc_projections()
        return text_map.embed(output.unimodal_text), vision_map.embed(output.unimodal_vision)

    def token_contrastive_embeddings(self, output: ViLBERTOutput) -> tuple[Tensor, Tensor]:
        """Unit-norm `(B, T, Dc)` text tokens and `(B, P, Dc)` image patches ([CLS] dropped) of the unimodal
        streams, through the same Linear maps as `contrastive_embeddings` (ITC's token-level term)."""
        text, vision = output.unimodal_text_tokens, output.unimodal_vision_tokens[:, 1:]
        text_map, vision_map = self._itc_projections()
        return text_map.embed(text), vision_map.embed(vision)

    def mim_projection(self, vision_patches: Tensor) -> Tensor:
        """`(B, P, Dv)` patch states (pass `output.vision[:, 1:]`) -> `(B, P, mim_projection_dim)`."""
        return self.mim_head(vision_patches)

    def classify(self, output: ViLBERTOutput) -> Tensor:
        """`(B, num_labels)` downstream logits."""
        return self.classifier(output.pooled_text, output.pooled_vision)

    # ------------------------------------------------------------------------------ input facts

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the vision weights expect."""
        return self.vision.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel std the vision weights expect."""
        return self.vision.image_std

    @property
    def num_patches(self) -> int:
        """Patches per image; `image_mask` is `(B, num_patches)`."""
        return self.vision.num_patches

    # ---------------------------------------------------------------------- freezing and counts

    @staticmethod
    def part_of(name: str) -> str:
        """The part (`text`, `vision`, `cross`, `heads`) a parameter name belongs to.

        The MIM mask token lives in the vision encoder but is a task parameter the pretrained ViT
        lacks, so it counts (and trains) with the heads, like the poolers.
        """
        root = name.split(".", 1)[0]
        if name == "vision.mask_token":
            return "heads"
        return root if root in ("text", "vision", "cross") else "heads"

    def freeze(self, parts: Iterable[str]) -> None:
        """Freeze exactly `parts` (subset of text, vision, cross, heads); unfreeze the others."""
        parts = tuple(parts)
        for part in parts:
            if part not in FREEZABLE_PARTS:
                raise ConfigError(f"unknown model part {part!r} to freeze; valid: {', '.join(FREEZABLE_PARTS)}")
        for name, param in self.named_parameters():
            param.requires_grad_(self.part_of(name) not in parts)

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """`{part: {"total": n, "trainable": m}}` for each part, plus `"all"`."""
        report = {part: {"total": 0, "trainable": 0} for part in (*FREEZABLE_PARTS, "all")}
        for name, param in self.named_parameters():
            for key in (self.part_of(name), "all"):
                report[key]["total"] += param.numel()
                report[key]["trainable"] += param.numel() if param.requires_grad else 0
        return report

    # ------------------------------------------------------------------------------ weights I/O

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` (the `ModelConfig`, tagged with `model_type: "vilbert"`
        and the vilbert version that wrote it) into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "vilbert_format": MODEL_FORMAT})
        tagged = {"model_type": MODEL_TYPE, "vilbert_version": __version__, **config_to_dict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(tagged, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ViLBERT:
        """The model `save_pretrained` wrote; encoder `pretrained` sources are not re-read."""
        directory = Path(directory)
        if (directory / WEIGHTS_NAME).is_file():
            _check_export_format(directory / WEIGHTS_NAME)
        config = _read_model_config(directory / CONFIG_NAME)
        model = cls(without_pretrained_sources(config))
        model.config = dataclasses.replace(  # the sources it names, the normalization it was built with
            model.config,
            text=dataclasses.replace(model.config.text, pretrained=config.text.pretrained),
            vision=dataclasses.replace(model.config.vision, pretrained=config.vision.pretrained),
        )
        state = read_state_dict(directory / WEIGHTS_NAME)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"{directory / WEIGHTS_NAME} does not fit its {CONFIG_NAME}: missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return model


def cross_schedule(config: ModelConfig) -> list[tuple[int, int]]:
    """For each cross layer, the (text layer, vision block) it runs right before; a stream's `num_layers`
    means after its last layer (`ModelConfig` has checked `cross.before_*_layer`)."""
    count, cross = len(config.cross.pattern), config.cross
    text = cross.before_text_layer or (config.text.num_layers,) * count
    vision = cross.before_vision_layer or (config.vision.num_layers,) * count
    return list(zip(text, vision, strict=True))


def without_pretrained_sources(config: ModelConfig) -> ModelConfig:
    """The same shapes with no encoder weights to read (for weights that come from elsewhere)."""
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, pretrained=None),
        vision=dataclasses.replace(config.vision, pretrained=None),
    )


def parameter_counts(config: ModelConfig) -> dict[str, dict[str, int]]:
    """`ViLBERT(config).parameter_report()` without weights: built on the meta device and without the
    encoders' pretrained sources, so it reads, downloads and allocates nothing."""
    with torch.device("meta"):
        return ViLBERT(without_pretrained_sources(config)).parameter_report()


def _check_export_format(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            found = (handle.metadata() or {}).get("vilbert_format")
    except Exception as err:  # safetensors raises several unrelated types
        raise ModelError(f"cannot read weights from {path}: {err}") from None
    if found != MODEL_FORMAT:
        raise ModelError(
            f"{path} is an export of format {found or 'vilbert-model/1'} (an earlier vilbert); this version reads "
            f"{MODEL_FORMAT} only: export the model again with the version that trained it"
        )


def _read_model_config(path: Path) -> ModelConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"no model config at {path}; save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME}"
        ) from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not a model config object")
    model_type = data.pop("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ModelError(f"{path} describes a {model_type!r} model; ViLBERT.from_pretrained reads {MODEL_TYPE!r}")
    data.pop("vilbert_version", None)  # informative only: the config's keys say what the weights need
    try:  # data.image_size must agree with the model's for the Config to validate
        image_size = data.get("vision", {}).get("image_size", 224)
        return config_from_dict({"model": data, "data": {"image_size": image_size}}).model
    except ConfigError as err:
        raise ModelError(f"{path}: {err}") from None
