"""The two streams in their home libraries' formats, so a trained ViLBERT's encoders can be reused alone.

    TextEncoder   -> save_text_as_bert(dir)    -> transformers.BertModel.from_pretrained(dir)
    VisionEncoder -> save_vision_as_timm(file) -> timm.create_model(name, pretrained=True,
                                                    pretrained_cfg_overlay=dict(file=file), **kwargs)

Both are renames, not conversions: the text stream already uses Hugging Face's parameter names
(minus `encoder.layer.` -> `layers.`), and the vision stream is a timm `VisionTransformer`. What the
exported encoders compute is each stream on its own, before any cross layer: ViLBERT's poolers and
cross layers have no place in a plain BERT or ViT. Like the rest of `vilbert.model`, this writes weight
files (and a BERT `config.json`) only.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from vilbert.config import TextConfig
from vilbert.errors import ModelError
from vilbert.model.text import TextEncoder
from vilbert.model.vision import VisionEncoder, timm_model_kwargs
from vilbert.model.weights import normalization_metadata

__all__ = ["bert_config", "bert_state_dict", "save_text_as_bert", "timm_state_dict", "save_vision_as_timm"]

_BERT_WEIGHTS = "model.safetensors"


def bert_config(config: TextConfig) -> dict[str, object]:
    """The Hugging Face `BertConfig` (as a `config.json` dict) of a text stream; inverse of `text_config_from_hf`."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
    }


def bert_state_dict(encoder: TextEncoder) -> dict[str, Tensor]:
    """The encoder's weights under `BertModel`'s names (no pooler: ViLBERT's poolers sit after the cross layers)."""
    return {
        key.replace("layers.", "encoder.layer.", 1) if key.startswith("layers.") else key: _plain_tensor(value)
        for key, value in encoder.state_dict().items()
    }


def save_text_as_bert(encoder: TextEncoder, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers.BertModel.from_pretrained(directory)` loads.

    BertModel adds a pooler that the text stream lacks; load with `add_pooling_layer=False` to leave it out
    (otherwise transformers initializes it at random and says so).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(bert_state_dict(encoder), str(directory / _BERT_WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(bert_config(encoder.config), indent=2) + "\n")
    return directory


def timm_state_dict(encoder: VisionEncoder) -> dict[str, Tensor]:
    """The vision stream's `VisionTransformer` weights under timm's names (the MIM mask token stays behind)."""
    return {key: _plain_tensor(value) for key, value in encoder.vit.state_dict().items()}


def save_vision_as_timm(encoder: VisionEncoder, file: str | Path) -> dict[str, object]:
    """Write the vision stream as a timm safetensors file, with its pixel normalization as metadata.

    Returns:
        The `timm.create_model` keyword arguments that shape a ViT to fit the file (pass them with
        `pretrained=True, pretrained_cfg_overlay=dict(file=file)` and `config.timm_name`).

    Raises:
        ModelError: The stream uses vilbert's conv stem, which timm cannot build by name.
    """
    from safetensors.torch import save_file

    if encoder.config.stem != "patch":
        raise ModelError(
            f"the vision stream uses model.vision.stem={encoder.config.stem!r}, vilbert's own patch embedding, "
            "which timm.create_model cannot build by name; only stem=patch exports as a timm file"
        )
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **normalization_metadata(encoder.image_mean, encoder.image_std)}
    save_file(timm_state_dict(encoder), str(file), metadata=metadata)
    return timm_model_kwargs(encoder.config)


def _plain_tensor(value: Tensor) -> Tensor:
    return value.detach().contiguous().cpu()
