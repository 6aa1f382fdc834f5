"""The ViLBERT model: a BERT text stream, a timm ViT vision stream, a cross-modal stack, heads.

Knows tensors only: no caches, no CLI, no printing; the only files it touches are weights.
"""

from vilbert.model.attention import TransformerLayer, set_fused_attention
from vilbert.model.cross import CoAttentionLayer, DualSelfAttentionLayer
from vilbert.model.heads import AlignmentHead, Classifier, MIMProjection, MLMHead, Pooler
from vilbert.model.text import TextEncoder, text_config_from_hf
from vilbert.model.vilbert import (
    ViLBERT,
    ViLBERTOutput,
    cross_schedule,
    parameter_counts,
    without_pretrained_sources,
)
from vilbert.model.vision import VisionEncoder
from vilbert.model.weights import normalization_metadata, read_normalization, read_state_dict

__all__ = [
    "ViLBERT",
    "ViLBERTOutput",
    "TextEncoder",
    "VisionEncoder",
    "CoAttentionLayer",
    "DualSelfAttentionLayer",
    "TransformerLayer",
    "Pooler",
    "MLMHead",
    "AlignmentHead",
    "MIMProjection",
    "Classifier",
    "set_fused_attention",
    "text_config_from_hf",
    "read_state_dict",
    "normalization_metadata",
    "read_normalization",
    "cross_schedule",
    "parameter_counts",
    "without_pretrained_sources",
]
