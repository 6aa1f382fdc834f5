"""Attention and the BERT-style transformer layer every part of the model shares.

One `TransformerLayer` serves three roles: a BERT encoder layer (self-attention over its own stream),
one stream of a dual self-attention layer, and one direction of a co-attention layer (queries from its
own stream, keys and values from the other: pass `context`). The layer is post-LayerNorm like BERT:

    h = LayerNorm(x + Dropout(Dense(Attention(x, context))))
    y = LayerNorm(h + Dropout(Dense(GELU(Dense(h)))))

Module names follow Hugging Face's `BertLayer` (`attention.self.query`, `attention.output.dense`,
`intermediate.dense`, `output.LayerNorm`, ...) so BERT checkpoints load by name.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "attention",
    "MultiHeadAttention",
    "AttentionOutput",
    "Attention",
    "FeedForward",
    "TransformerLayer",
    "padding_mask",
    "set_fused_attention",
    "init_bert_weights",
]


def padding_mask(attention_mask: Tensor) -> Tensor:
    """A key mask for `attention` from a `[B, T]` 1/0 (or bool) padding mask.

    Returns:
        A bool tensor `(B, 1, 1, T)`, True where a key takes part in attention.
    """
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, fused: bool = True) -> Tensor:
    """Scaled dot-product attention over heads.

    Args:
        q: Queries `(B, H, Tq, d)`.
        k: Keys `(B, H, Tk, d)`.
        v: Values `(B, H, Tk, d)`.
        mask: Bool `(B, 1, 1, Tk)`, True = attend; None attends everywhere. Each row needs one
            True (text always has [CLS]).
        dropout_p: Dropout on the attention probabilities (pass 0.0 in eval).
        fused: `F.scaled_dot_product_attention`; False runs the plain matmul-softmax reference
            (the benchmark's baseline and a readable statement of what the fused kernel computes).

    Returns:
        `(B, H, Tq, d)`.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ v


class MultiHeadAttention(nn.Module):
    """Query, key and value projections, attention, heads merged (HF's `BertSelfAttention`).

    The queries come from `hidden` (width `query_dim`), keys and values from `context` (width
    `context_dim`; `hidden` itself when None). All three project to `inner_dim`, which is how two
    streams of different widths meet in a co-attention layer.
    """

    def __init__(
        self, query_dim: int, context_dim: int, inner_dim: int, num_heads: int, attention_dropout: float
    ) -> None:
        super().__init__()
        if inner_dim % num_heads:
            raise ValueError(f"inner_dim={inner_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.fused = True
        self.query = nn.Linear(query_dim, inner_dim)
        self.key = nn.Linear(context_dim, inner_dim)
        self.value = nn.Linear(context_dim, inner_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, hidden: Tensor, mask: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """Attend from `hidden` to `context` (or itself); `mask` masks the keys, `(B, 1, 1, Tk)`."""
        context = hidden if context is None else context
        q = self._heads(self.query(hidden))
        k = self._heads(self.key(context))
        v = self._heads(self.value(context))
        p = self.attention_dropout if self.training else 0.0
        out = attention(q, k, v, mask, p, fused=self.fused)  # (B, heads, Tq, head_dim)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, -1)  # (B, Tq, inner_dim)


class AttentionOutput(nn.Module):
    """Dense back to the stream's width, dropout, residual to the stream's own input, LayerNorm."""

    def __init__(self, inner_dim: int, dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # noqa: N815 - Hugging Face's name
        self.dropout = nn.Dropout(dropout)

    def forward(self, attended: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(attended)) + residual)


class Attention(nn.Module):
    """Attention plus its output block (HF's `BertAttention`: `.self` and `.output`)."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        inner_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.self = MultiHeadAttention(dim, context_dim, inner_dim, num_heads, attention_dropout)
        self.output = AttentionOutput(inner_dim, dim, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        return self.output(self.self(hidden, mask, context), hidden)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu" is the exact erf form


class FeedForward(nn.Module):
    """BERT's output block: dense, dropout, residual, LayerNorm (after `_Intermediate`)."""

    def __init__(self, intermediate_size: int, dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(intermediate_size, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # noqa: N815 - Hugging Face's name
        self.dropout = nn.Dropout(dropout)

    def forward(self, expanded: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(expanded)) + residual)


class TransformerLayer(nn.Module):
    """A post-LN BERT layer; with `context` its attention is cross-attention.

    Args:
        dim: Width of this stream.
        context_dim: Width of the stream keys and values come from (`dim` for self-attention).
        inner_dim: Attention width (queries, keys, values), split into `num_heads`.
        num_heads: Attention heads.
        intermediate_size: Feed-forward width.
        dropout: Dropout after both dense outputs.
        attention_dropout: Dropout on attention probabilities, active in training only.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        *,
        dim: int,
        context_dim: int | None = None,
        inner_dim: int | None = None,
        num_heads: int,
        intermediate_size: int,
        dropout: float,
        attention_dropout: float,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        inner_dim = dim if inner_dim is None else inner_dim
        self.attention = Attention(dim, context_dim, inner_dim, num_heads, dropout, attention_dropout, eps)
        self.intermediate = _Intermediate(dim, intermediate_size)
        self.output = FeedForward(intermediate_size, dim, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """`hidden (B, T, dim)`; `mask (B, 1, 1, Tk)` over the keys (context's when given)."""
        h = self.attention(hidden, mask, context)
        return self.output(self.intermediate(h), h)


def set_fused_attention(module: nn.Module, enabled: bool) -> None:
    """Switch every attention in `module` (ours and timm's) between SDPA and plain matmul-softmax."""
    for sub in module.modules():
        if isinstance(sub, MultiHeadAttention):
            sub.fused = enabled
        elif hasattr(sub, "fused_attn"):  # timm.layers.Attention
            sub.fused_attn = enabled


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's init for one module (use with `.apply`, through `functools.partial` for another `std`):
    normal(std) weights, zero biases and padding row, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
