"""utils.train.losses against torch's and scikit-learn's reference formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.core.log import UserError
from utils.train.losses import CrossEntropyLoss, FocalLoss, PolyLoss, build_loss, class_balance_weights


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=gen) * 3
    targets = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 3, 3, 3, 1])
    return logits, targets


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cross_entropy_equals_torch(batch) -> None:
    logits, targets = batch
    close(CrossEntropyLoss()(logits, targets), F.cross_entropy(logits, targets))


def test_cross_entropy_with_class_weights_equals_torch(batch) -> None:
    logits, targets = batch
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    close(CrossEntropyLoss(weight=weight)(logits, targets), F.cross_entropy(logits, targets, weight=weight))


def test_cross_entropy_label_smoothing_equals_torch(batch) -> None:
    logits, targets = batch
    close(CrossEntropyLoss(label_smoothing=0.1)(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, FocalLoss, PolyLoss])
def test_one_hot_soft_targets_equal_hard_targets(batch, loss_cls) -> None:
    logits, targets = batch
    soft = F.one_hot(targets, 4).float()
    for kwargs in ({}, {"label_smoothing": 0.2}, {"weight": torch.tensor([1.0, 2.0, 0.5, 1.5])}):
        loss = loss_cls(**kwargs)
        close(loss(logits, soft), loss(logits, targets))


def test_soft_targets_cross_entropy_equals_torch(batch) -> None:
    logits, _ = batch
    probs = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(1)), dim=1)  # mixup-like
    close(CrossEntropyLoss()(logits, probs), F.cross_entropy(logits, probs))


def test_focal_with_gamma_zero_is_cross_entropy(batch) -> None:
    logits, targets = batch
    close(FocalLoss(gamma=0.0)(logits, targets), F.cross_entropy(logits, targets))
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    close(FocalLoss(gamma=0.0, weight=weight)(logits, targets), F.cross_entropy(logits, targets, weight=weight))


def test_focal_down_weights_easy_examples(batch) -> None:
    logits, targets = batch
    p_t = torch.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    expected = (-(1 - p_t) ** 2 * p_t.log()).mean()
    close(FocalLoss(gamma=2.0)(logits, targets), expected)
    assert FocalLoss(gamma=2.0)(logits, targets) < F.cross_entropy(logits, targets)


@pytest.mark.parametrize("epsilon", [1.0, 2.5])
def test_poly_is_cross_entropy_plus_epsilon_one_minus_pt(batch, epsilon: float) -> None:
    logits, targets = batch
    p_t = torch.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    expected = (F.cross_entropy(logits, targets, reduction="none") + epsilon * (1 - p_t)).mean()
    close(PolyLoss(epsilon=epsilon)(logits, targets), expected)


def test_class_balance_weights_are_sqrt_of_sklearn_balanced() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    targets = [0] * 10 + [1] * 3 + [2] * 1
    expected = np.sqrt(compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(targets)))
    weight = class_balance_weights(targets, 3)
    assert weight.dtype == torch.float32
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    assert weight[2] > weight[1] > weight[0]  # the rarest class weighs most


def test_class_balance_weights_absent_class_gets_one() -> None:
    weight = class_balance_weights([0, 0, 2, 2, 2, 2], 4)
    assert weight[1] == 1.0 and weight[3] == 1.0
    assert weight[0] > weight[2]


def test_build_loss_by_name() -> None:
    assert isinstance(build_loss("FocalLoss", 0.1), FocalLoss)
    assert build_loss("PolyLoss").label_smoothing == 0.0
    with pytest.raises(UserError, match="CrossEntropyLoss"):
        build_loss("HingeLoss")
    with pytest.raises(UserError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)
