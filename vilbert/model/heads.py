"""Poolers and task heads. Heads run only when called, so `ViLBERT.forward` stays cheap.

- `Pooler`: first token -> Linear -> ReLU (ViLBERT's `t_pooler`/`v_pooler`), into the cross width so
  the two pooled vectors can be multiplied element-wise even when the streams differ in width. Its
  `embed` (the Linear, unit-normalized, no ReLU) is what the image-text contrastive task (ALBEF's ITC)
  compares, so ITC aligns the very space the alignment head and `vilbert analyse` read.
- `MLMHead`: dense, GELU, LayerNorm, then a decoder tied to the word embeddings (weight passed in at
  call time, so the tie survives `load_state_dict` and safetensors never sees a shared tensor).
- `AlignmentHead`: Linear(2) over dropout(pooled_text * pooled_vision).
- `MIMProjection`: the per-patch projection the contrastive MIM loss compares.
- `Classifier`: ViLBERT's downstream `SimpleClassifier` over the same pooled product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Pooler", "MLMHead", "AlignmentHead", "MIMProjection", "Classifier"]


class Pooler(nn.Module):
    """First token -> Linear -> ReLU."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, out_dim)

    def forward(self, hidden: Tensor) -> Tensor:
        """`(B, T, dim)` -> `(B, out_dim)`."""
        return F.relu(self.dense(hidden[:, 0]))

    def embed(self, first_token: Tensor) -> Tensor:
        """`(B, dim)` -> `(B, out_dim)` unit vectors: the same Linear, L2-normalized instead of the ReLU
        (a ReLU'd embedding starts with half its units dead, and ITC left chance later with it)."""
        return F.normalize(self.dense(first_token).float(), dim=-1)


class MLMHead(nn.Module):
    """BERT's prediction head with the decoder weight supplied by the caller (tied embeddings)."""

    def __init__(self, dim: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # noqa: N815 - Hugging Face's name
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor, decoder_weight: Tensor) -> Tensor:
        """`hidden (M, dim)` at the masked positions only -> logits `(M, vocab)`."""
        h = self.LayerNorm(F.gelu(self.dense(hidden)))
        return F.linear(h, decoder_weight, self.bias)


class AlignmentHead(nn.Module):
    """Is this caption about this image? Linear(2) over dropout(pooled_text * pooled_vision)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, 2)

    def forward(self, pooled_text: Tensor, pooled_vision: Tensor) -> Tensor:
        return self.linear(self.dropout(pooled_text * pooled_vision))


class MIMProjection(nn.Module):
    """Linear -> GELU -> Linear per patch: `(B, P, dim)` -> `(B, P, out_dim)` for InfoNCE."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, patches: Tensor) -> Tensor:
        return self.out(F.gelu(self.dense(patches)))


class Classifier(nn.Module):
    """Dropout, Linear(2*dim), GELU, LayerNorm, Linear(num_labels) over the pooled product."""

    def __init__(self, dim: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, 2 * dim)
        self.LayerNorm = nn.LayerNorm(2 * dim, eps=1e-12)  # noqa: N815
        self.out = nn.Linear(2 * dim, num_labels)

    def forward(self, pooled_text: Tensor, pooled_vision: Tensor) -> Tensor:
        h = self.LayerNorm(F.gelu(self.dense(self.dropout(pooled_text * pooled_vision))))
        return self.out(h)
