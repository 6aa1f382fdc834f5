"""The cross-modal stack: co-attention and dual self-attention layers (Lu et al. 2019).

Both layer kinds hold one `TransformerLayer` per stream and keep each stream at its own width;
attention runs at `cross.hidden_size` (queries, keys and values project into it, the output dense
projects back), which is how streams of different widths meet. In a co-attention layer both
directions read the layer's *inputs*, and each stream's residual is its own input:

    text'   = FFN_t(LN(text   + Dense(Attn(q=text,   kv=vision))))
    vision' = FFN_v(LN(vision + Dense(Attn(q=vision, kv=text, key mask=padding))))

(the thesis asked "is residual handling in crossattention correct?": this is the original's
`BertBiOutput`, residual to the query stream, post-LN; `tests/model/test_cross.py` pins it down).
"""

from __future__ import annotations

from torch import Tensor, nn

from vilbert.config import CrossConfig
from vilbert.model.attention import TransformerLayer

__all__ = ["CoAttentionLayer", "DualSelfAttentionLayer", "build_cross_layer", "TEXT_EPS", "VISION_EPS"]

TEXT_EPS = 1e-12
"""LayerNorm epsilon of text-stream layers (BERT's)."""
VISION_EPS = 1e-6
"""LayerNorm epsilon of vision-stream layers (timm ViT's)."""


def _stream_layer(cross: CrossConfig, dim: int, context_dim: int, eps: float) -> TransformerLayer:
    return TransformerLayer(
        dim=dim,
        context_dim=context_dim,
        inner_dim=cross.hidden_size,
        num_heads=cross.num_heads,
        intermediate_size=cross.intermediate_size,
        dropout=cross.dropout,
        attention_dropout=cross.attention_dropout,
        eps=eps,
    )


class CoAttentionLayer(nn.Module):
    """Text queries attend to vision keys/values and vice versa; then each stream's FFN.

    Args:
        cross: Attention width, heads, FFN width and dropout of the layer.
        text_dim: Width of the text stream.
        vision_dim: Width of the vision stream.
    """

    def __init__(self, cross: CrossConfig, text_dim: int, vision_dim: int) -> None:
        super().__init__()
        self.text = _stream_layer(cross, text_dim, vision_dim, TEXT_EPS)
        self.vision = _stream_layer(cross, vision_dim, text_dim, VISION_EPS)

    def forward(self, text: Tensor, vision: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """`text (B, T, Dt)`, `vision (B, 1+P, Dv)`, `text_mask (B, 1, 1, T)` -> both streams updated."""
        new_text = self.text(text, None, context=vision)  # every patch is a valid key
        new_vision = self.vision(vision, text_mask, context=text)  # padding is no key
        return new_text, new_vision


class DualSelfAttentionLayer(nn.Module):
    """One BERT layer per stream, side by side, no exchange (ViLBERT's TRM blocks)."""

    def __init__(self, cross: CrossConfig, text_dim: int, vision_dim: int) -> None:
        super().__init__()
        self.text = _stream_layer(cross, text_dim, text_dim, TEXT_EPS)
        self.vision = _stream_layer(cross, vision_dim, vision_dim, VISION_EPS)

    def forward(self, text: Tensor, vision: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Same signature as `CoAttentionLayer.forward`."""
        return self.text(text, text_mask), self.vision(vision, None)


_KINDS = {"co": CoAttentionLayer, "self": DualSelfAttentionLayer}


def build_cross_layer(kind: str, cross: CrossConfig, text_dim: int, vision_dim: int) -> nn.Module:
    """The layer named by a `cross.pattern` item (`co` or `self`)."""
    return _KINDS[kind](cross, text_dim, vision_dim)
