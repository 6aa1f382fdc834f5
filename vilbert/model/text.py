"""The text stream: BERT (post-LayerNorm), loadable from a Hugging Face BERT directory.

`TextEncoder(config)(input_ids, attention_mask)` equals `transformers.BertModel(...)
.last_hidden_state` with the same weights. Its parameter names are Hugging Face's (minus the
`bert.` prefix and the unused pooler), so a checkpoint loads by name after two renames that old
checkpoints need: `gamma`/`beta` -> `weight`/`bias`. A `BertForPreTraining` / `BertForMaskedLM`
checkpoint also holds BERT's MLM head (`cls.predictions.*`); `read_hf_bert` returns it under
`MLMHead`'s names for `ViLBERT` to load. The next-sentence head (`cls.seq_relationship`) has no
counterpart (ViLBERT's alignment head is its own) and is dropped with a log line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from vilbert.config import TextConfig
from vilbert.errors import ModelError
from vilbert.model.attention import TransformerLayer, init_bert_weights, padding_mask
from vilbert.model.weights import load_exact, read_state_dict

__all__ = ["TextEmbeddings", "TextEncoder", "text_config_from_hf", "read_hf_bert"]

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Checkpoint keys that hold no weights of ours: BertModel's pooler (ViLBERT has its own), the
# next-sentence head of BertForPreTraining, and buffers.
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.")
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")
_MLM_PREFIX = "cls.predictions."


class TextEmbeddings(nn.Module):
    """Word + position + token-type (all type 0) embeddings, LayerNorm, dropout."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # noqa: N815
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)
        x = x + self.token_type_embeddings.weight[0]  # a single segment: type 0
        return self.dropout(self.LayerNorm(x))


class TextEncoder(nn.Module):
    """BERT: embeddings and `num_layers` post-LN transformer layers.

    Args:
        config: The text stream's shape and dropout.
        init_std: The std of the from-scratch init (BERT's 0.02; `ModelConfig.initializer_range`).
    """

    def __init__(self, config: TextConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim=config.hidden_size,
                num_heads=config.num_heads,
                intermediate_size=config.intermediate_size,
                dropout=config.dropout,
                attention_dropout=config.attention_dropout,
                eps=config.layer_norm_eps,
            )
            for _ in range(config.num_layers)
        )
        self.apply(functools.partial(init_bert_weights, std=init_std))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden states `(B, T, D)` of `input_ids (B, T)`; `attention_mask (B, T)` is 1 for
        real tokens and 0 for padding (None: no padding)."""
        mask = None if attention_mask is None else padding_mask(attention_mask)
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: object) -> TextEncoder:
        """A `TextEncoder` shaped and weighted like the Hugging Face BERT in `directory`.

        Args:
            directory: Holds `config.json` and `model.safetensors` or `pytorch_model.bin`.
            **overrides: `TextConfig` fields to change after reading `config.json` (e.g. dropout).

        Raises:
            ModelError: A missing or unreadable file, or weights that do not fit the config.
        """
        config = dataclasses.replace(text_config_from_hf(directory), pretrained=str(directory), **overrides)
        encoder = cls(config)
        encoder.load_hf_weights(directory)
        return encoder

    def load_hf_weights(self, directory: str | Path) -> dict[str, Tensor]:
        """Load a Hugging Face BERT checkpoint from `directory` into this encoder (strict).

        Returns:
            The checkpoint's MLM head under `MLMHead`'s names (empty when it has none), for the caller
            that holds the head.
        """
        encoder, mlm_head = read_hf_bert(directory)
        load_exact(self, encoder, f"BERT checkpoint in {directory}", hint="set model.text.* to match its config.json")
        log.info("loaded BERT weights from %s", directory)
        return mlm_head


def text_config_from_hf(directory: str | Path) -> TextConfig:
    """The `TextConfig` that a Hugging Face BERT `config.json` describes."""
    path = Path(directory) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"no BERT config at {path}; a Hugging Face BERT directory holds config.json "
            f"and one of {', '.join(_WEIGHT_FILES)}"
        ) from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path} is not valid JSON: {err}") from None
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelError(f"{path}: hidden_act={act!r} is not supported; valid: gelu")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ModelError(f"{path}: position_embedding_type={position!r} is not supported; valid: absolute")
    try:
        return TextConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id") or 0,
        )
    except KeyError as err:
        raise ModelError(f"{path} lacks the key {err.args[0]!r}") from None
    except ValueError as err:
        raise ModelError(f"{path}: {err}") from None


def read_hf_bert(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The BERT weights in `directory`: (the encoder's under `TextEncoder`'s keys, the MLM head's under
    `MLMHead`'s keys, or an empty dict when the checkpoint has no `cls.predictions`).

    Raises:
        ModelError: No weights file, or an MLM head whose decoder is not the word embeddings.
    """
    directory = Path(directory)
    for name in _WEIGHT_FILES:
        path = directory / name
        if path.exists():
            return _split_bert_keys(read_state_dict(path), path)
    raise ModelError(f"no BERT weights in {directory}; expected one of {', '.join(_WEIGHT_FILES)}")


def _split_bert_keys(state: Mapping[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    encoder: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        if key.startswith(_MLM_PREFIX):
            head[key.removeprefix(_MLM_PREFIX)] = value
        elif not key.startswith(_IGNORED_PREFIXES) and not key.endswith(_IGNORED_SUFFIXES):
            encoder[key.replace("encoder.layer.", "layers.", 1)] = value
    if any(key.startswith("cls.seq_relationship.") for key in state):
        log.info(
            "%s: ignoring cls.seq_relationship (BERT's next-sentence head; ViLBERT has its own alignment head)", path
        )
    return encoder, _mlm_head_state(head, encoder.get("embeddings.word_embeddings.weight"), path)


def _mlm_head_state(head: dict[str, Tensor], word_embeddings: Tensor | None, path: Path) -> dict[str, Tensor]:
    """`cls.predictions.*` (prefix removed) -> `MLMHead`'s keys: `transform.` dropped, the decoder checked to
    be the word embeddings (ours is tied to them), and its bias taken as the head's where only it was saved
    (transformers ties `decoder.bias` to `bias` and may write either)."""
    decoder = head.pop("decoder.weight", None)
    if decoder is not None and (word_embeddings is None or not torch.equal(decoder, word_embeddings)):
        raise ModelError(
            f"{path}: cls.predictions.decoder.weight is not the word embeddings; ViLBERT's MLM decoder is tied "
            "to them, so an untied BERT head cannot load"
        )
    decoder_bias = head.pop("decoder.bias", None)
    if decoder_bias is not None:
        bias = head.setdefault("bias", decoder_bias)
        if not torch.equal(bias, decoder_bias):
            raise ModelError(f"{path}: cls.predictions.bias and cls.predictions.decoder.bias differ; they are one bias")
    return {key.removeprefix("transform."): value for key, value in head.items()}
