"""Scores for binary classification and retrieval: exact AUROC, accuracy, recall@k.

AUROC is the Hateful Memes challenge's official metric. It is computed exactly as the Mann-Whitney U
statistic with midranks, so tied scores count one half (the probability that a random positive
scores above a random negative, ties broken by a fair coin), with numpy only: no sklearn.

Scores for AUROC are the logit margin `logit[:, 1] - logit[:, 0]`, not the softmax probability: the
ranking is the same, but probabilities saturate to exactly 1.0 in float32 and would create ties the
model did not make.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["auroc", "midranks", "accuracy", "binary_scores", "binary_metrics", "retrieval_recall"]

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _numpy(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN at index {int(np.flatnonzero(np.isnan(array))[0])}")
    return array


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of the ranks they span."""
    n = values.shape[0]
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], n]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, exact, ties counted one half.

    Args:
        labels: 0/1 (or boolean) ground truth, one per sample.
        scores: Higher means more likely positive, one per sample.

    Returns:
        The AUROC in [0, 1]; NaN when `labels` hold only one class (the AUROC is undefined).

    Raises:
        ValueError: When lengths differ, labels are not 0/1, or a score is NaN.
    """
    y = _numpy(labels, "labels")
    s = _numpy(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({s.shape[0]}) differ in length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1; got {sorted(set(y.tolist()) - {0.0, 1.0})[:5]}")
    positive = y == 1.0
    n_pos = int(positive.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = midranks(s)[positive].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(labels: ArrayLike, predictions: ArrayLike) -> float:
    """The fraction of `predictions` equal to `labels` (NaN for no samples)."""
    y = _numpy(labels, "labels")
    p = _numpy(predictions, "predictions")
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and predictions ({p.shape[0]}) differ in length")
    return float((y == p).mean()) if y.size else float("nan")


def binary_scores(logits: torch.Tensor) -> torch.Tensor:
    """The positive-class score of two-class logits `[N, 2]`: the margin `logit1 - logit0`."""
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"binary logits must have shape [N, 2]; got {tuple(logits.shape)}")
    return logits[:, 1] - logits[:, 0]


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy `loss`, `accuracy` (argmax) and `auroc` of two-class logits.

    Args:
        logits: `[N, 2]` class logits of every sample of a split (not a batch mean).
        labels: `[N]` 0/1 labels.
    """
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    return {
        "loss": float(F.cross_entropy(logits, labels)) if labels.numel() else float("nan"),
        "accuracy": accuracy(labels, logits.argmax(dim=1)),
        "auroc": auroc(labels, binary_scores(logits)),
        "n": int(labels.numel()),
    }


def retrieval_recall(scores: torch.Tensor | np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions of a square score matrix whose diagonal holds the true pairs.

    `scores[i, j]` scores text `i` with image `j`. Ranking is pessimistic about ties: a candidate
    that scores equal to the true partner counts as ranked above it, so a constant score matrix gets
    recall@k = 0 for k < N rather than 1 (chance is k / N).

    Returns:
        `{"i2t_r1": ..., "t2i_r1": ..., ...}`: image-to-text ranks the texts for each image (a column),
        text-to-image ranks the images for each text (a row).
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"retrieval scores must be a square matrix; got shape {tuple(s.shape)}")
    true = s.diagonal()
    # number of other candidates scoring at least as high as the true one
    t2i_rank = (s >= true[:, None]).sum(dim=1) - 1
    i2t_rank = (s >= true[None, :]).sum(dim=0) - 1
    result = {}
    for k in ks:
        result[f"i2t_r{k}"] = float((i2t_rank < k).double().mean())
        result[f"t2i_r{k}"] = float((t2i_rank < k).double().mean())
    return result
