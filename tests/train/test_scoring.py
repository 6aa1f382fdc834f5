"""AUROC against a brute-force pairwise count; accuracy; retrieval recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vilbert.train.scoring import accuracy, auroc, binary_metrics, midranks, retrieval_recall


def _brute_force_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(20))
def test_auroc_equals_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    # few distinct values so that ties, also across classes, are common
    scores = rng.integers(0, int(rng.integers(1, 12)), n).astype(np.float64) / 3.0
    assert len(np.unique(scores)) < n  # there are ties
    assert auroc(labels, scores) == pytest.approx(_brute_force_auroc(labels, scores), abs=1e-12)


def test_auroc_known_values() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auroc([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5
    assert auroc([0, 1, 1], [0.0, 0.0, 1.0]) == 0.75
    assert np.isnan(auroc([1, 1], [0.3, 0.4]))


def test_auroc_accepts_tensors_and_rejects_bad_input() -> None:
    assert auroc(torch.tensor([0, 1]), torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])


def test_midranks() -> None:
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_accuracy_and_binary_metrics() -> None:
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    labels = torch.tensor([0, 1, 0, 1])
    metrics = binary_metrics(logits, labels)
    assert metrics["accuracy"] == 0.5
    assert metrics["auroc"] == pytest.approx(_brute_force_auroc(labels.numpy(), (logits[:, 1] - logits[:, 0]).numpy()))
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    assert metrics["n"] == 4


def test_auroc_uses_margin_not_saturated_probability() -> None:
    logits = torch.tensor([[-60.0, 60.0], [-50.0, 50.0], [0.0, 0.0]])
    # softmax saturates both positives to 1.0 in float32; the margin keeps their order
    assert binary_metrics(logits, torch.tensor([1, 0, 0]))["auroc"] == 1.0


def test_retrieval_recall() -> None:
    n = 20
    perfect = torch.eye(n)
    assert retrieval_recall(perfect) == {f"{d}_r{k}": 1.0 for k in (1, 5, 10) for d in ("i2t", "t2i")}
    constant = torch.zeros(n, n)  # ties are ranked pessimistically: nothing is retrieved
    assert all(v == 0.0 for v in retrieval_recall(constant).values())
    # text 0's best image is image 1: t2i misses it at k=1, i2t for image 1 ranks text 0 first too
    scores = torch.eye(n)
    scores[0, 1] = 2.0
    result = retrieval_recall(scores)
    assert result["t2i_r1"] == pytest.approx((n - 1) / n)
    assert result["i2t_r1"] == pytest.approx((n - 1) / n)
    assert result["t2i_r5"] == 1.0
    random = retrieval_recall(torch.randn(500, 500, generator=torch.Generator().manual_seed(0)))
    assert random["i2t_r10"] == pytest.approx(10 / 500, abs=0.02)
