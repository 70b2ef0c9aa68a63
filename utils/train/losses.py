"""Classification losses; hard or soft targets, label smoothing, class weights.

Multi-class (one softmax): CrossEntropy, Focal, Poly-1. They take targets as class indices (N,)
or as probabilities (N, C) -- the latter is what mixup/cutmix produce -- and reduce as torch's
weighted cross-entropy does: sum(w_i * loss_i) / sum(w_i), w_i being the class weight of sample
i's target.

Multi-label (a sigmoid per class): binary cross-entropy and the asymmetric loss (ASL). They take
multi-hot (or mixed) targets (N, C); label smoothing moves each target towards 1/2, and the class
weights become BCE's positive weights (more weight on each class's rare positives).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.core.log import UserError
from utils.core.task import ALL_LOSSES, MULTICLASS, MULTILABEL, TaskType


class _ClassificationLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"--label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight.float() if weight is not None else None)

    def soft_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Targets as smoothed probability rows (N, C)."""
        num_classes = logits.shape[-1]
        if targets.ndim == 1:
            targets = F.one_hot(targets, num_classes).to(logits.dtype)
        else:
            targets = targets.to(logits.dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        return targets

    def reduce(self, per_class: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """per_class: (N, C) loss terms already multiplied by the target probabilities."""
        if self.weight is None:
            return per_class.sum(dim=1).mean()
        sample_weight = targets @ self.weight  # the weight of each sample's (mixed) class
        return (per_class @ self.weight).sum() / sample_weight.sum().clamp_min(1e-12)

    def per_class_terms(self, log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        soft = self.soft_targets(logits, targets)
        log_p = F.log_softmax(logits, dim=-1)
        return self.reduce(self.per_class_terms(log_p, soft), soft)


class CrossEntropyLoss(_ClassificationLoss):
    """Cross-entropy: -sum_c t_c log p_c."""

    def per_class_terms(self, log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -targets * log_p


class FocalLoss(_ClassificationLoss):
    """Focal loss (Lin et al., 2017): -sum_c t_c (1 - p_c)^gamma log p_c."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None, gamma: float = 2.0) -> None:
        super().__init__(label_smoothing, weight)
        self.gamma = gamma

    def per_class_terms(self, log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -targets * (1.0 - log_p.exp()).pow(self.gamma) * log_p


class PolyLoss(_ClassificationLoss):
    """Poly-1 loss (Leng et al., 2022): cross-entropy + epsilon * (1 - p_t), p_t = sum_c t_c p_c."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None, epsilon: float = 1.0) -> None:
        super().__init__(label_smoothing, weight)
        self.epsilon = epsilon

    def per_class_terms(self, log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # epsilon * (1 - p_t) spread over classes as t_c * (1 - p_c): the rows sum to the same value.
        return -targets * log_p + self.epsilon * targets * (1.0 - log_p.exp())


class _MultiLabelLoss(nn.Module):
    """A sigmoid per class: multi-hot targets (N, C), smoothed towards 1/2, positive weights per class."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"--label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", weight.float() if weight is not None else None)

    def soft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        return targets * (1.0 - self.label_smoothing) + self.label_smoothing / 2 if self.label_smoothing else targets


class BCEWithLogitsLoss(_MultiLabelLoss):
    """Binary cross-entropy of each class's sigmoid, averaged over classes and images."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), self.soft_targets(targets), pos_weight=self.pos_weight)


class AsymmetricLoss(_MultiLabelLoss):
    """Asymmetric loss (Ridnik et al., 2021): focusing gamma_neg on negatives (which dominate a
    multi-label set), gamma_pos on positives, and negatives below `clip` probability ignored.
    Summed over classes, averaged over images, as the paper does."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None, gamma_neg: float = 4.0,
                 gamma_pos: float = 0.0, clip: float = 0.05) -> None:
        super().__init__(label_smoothing, weight)
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = self.soft_targets(targets)
        p = torch.sigmoid(logits.float())
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # shifted probability of negatives
        loss_pos = y * torch.log(p.clamp(min=1e-8)) * (1 - p).pow(self.gamma_pos)
        loss_neg = (1 - y) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg.pow(self.gamma_neg)
        if self.pos_weight is not None:
            loss_pos = loss_pos * self.pos_weight
        return -(loss_pos + loss_neg).sum(dim=1).mean()


LOSSES = {"CrossEntropyLoss": CrossEntropyLoss, "FocalLoss": FocalLoss, "PolyLoss": PolyLoss,
          "BCEWithLogitsLoss": BCEWithLogitsLoss, "AsymmetricLoss": AsymmetricLoss}
# Every loss belongs to the family of one task type (utils.core.task), where --loss takes its names from:
# a loss here and not there, or there and not here, stops the import.
FAMILY: dict[TaskType, type] = {MULTICLASS: _ClassificationLoss, MULTILABEL: _MultiLabelLoss}
assert set(LOSSES) == set(ALL_LOSSES) and all(issubclass(LOSSES[name], base) for task, base in FAMILY.items()
                                              for name in task.losses), \
    "each loss is registered here and listed in the family of its task type (utils.core.task)"


def class_balance_weights(targets: Sequence[Any] | None, num_classes: int, mode: str = "sqrt", beta: float = 0.999,
                          task: TaskType = MULTICLASS, counts: tuple[Sequence[int], int] | None = None) -> torch.Tensor:
    """Per-class loss weights against class imbalance (--class_balance).

    Multi-class: sqrt -- pytorch-classifier's rule, the square root of scikit-learn's 'balanced'
    weights n / (C * n_c) (the root keeps a very rare class from getting a weight so large that
    optimisation breaks); inverse -- the balanced weights themselves; effective -- the inverse
    effective number of samples (1 - beta) / (1 - beta^n_c) (Cui et al., 2019), scaled to mean 1
    over the present classes. Classes absent from `targets` get weight 1.

    Multi-label (`task` multilabel: targets are tuples of class indices): BCE's positive weights from
    each class's negatives / positives, by the same rule (sqrt, the ratio itself, or effective numbers).

    `counts` (the images of each class and of the split) stands for `targets` where the images are not at hand
    (a streamed split's index, utils.data.stream); the weights are the same.

    Returns:
        (C,) float weights.
    """
    if mode not in ("sqrt", "inverse", "effective"):
        raise UserError(f"unknown --class_balance '{mode}'; choose one of sqrt, inverse, effective")
    multilabel = task.multilabel
    if counts is not None:
        counts, n = np.asarray(counts[0], dtype=np.float64), int(counts[1])
    else:
        counts, n = task.class_counts(targets, num_classes).astype(np.float64), len(targets)
    present = counts > 0
    if mode == "effective":
        raw = np.where(present, (1 - beta) / (1 - np.power(beta, np.maximum(counts, 1))), 0.0)
        if multilabel:  # positives' effective number against the negatives'
            neg = (1 - beta) / (1 - np.power(beta, np.maximum(n - counts, 1)))
            raw = np.where(present, raw / neg, 0.0)
        weight = np.where(present, raw / raw[present].mean(), 1.0)
    else:
        ratio = np.where(present, ((n - counts) / np.maximum(counts, 1)) if multilabel
                         else n / (present.sum() * np.maximum(counts, 1)), 1.0)
        weight = np.sqrt(ratio) if mode == "sqrt" else ratio
        weight = np.where(present, weight, 1.0)
    return torch.as_tensor(weight, dtype=torch.float32)


def build_loss(name: str, label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
               task: TaskType | None = None) -> nn.Module:
    """The loss named by --loss, of the task's family.

    Args:
        name: CrossEntropyLoss, FocalLoss, PolyLoss (multiclass); BCEWithLogitsLoss, AsymmetricLoss (multilabel).
        label_smoothing: --label_smoothing.
        weight: per-class weights (--class_balance) or None.
        task: the run's task type: a loss of another family is refused (None: not checked).

    Returns:
        The loss module.

    Raises:
        UserError: an unknown loss, or one of the other task's family.
    """
    if name not in LOSSES:
        raise UserError(f"unknown --loss '{name}'; choose one of {', '.join(LOSSES)}")
    if task is not None:
        task.loss(name)
    return LOSSES[name](label_smoothing=label_smoothing, weight=weight)


# ------------------------------------------------------------------------------- objectives
# An objective runs the model on a batch and returns (loss, logits, extra loss terms). The training
# loop is written once around it; R-Drop and distillation are objectives wrapping the criterion.
class Supervised:
    """The plain objective: criterion(model(images), targets)."""

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(images)
        return self.criterion(logits, targets), logits, {}


class RDrop:
    """R-Drop (Liang et al., 2021): two forward passes (different dropout masks), the mean of their
    losses plus alpha times the symmetric KL divergence between their predictions.

    Args:
        criterion: the classification loss.
        alpha: weight of the consistency term (--rdrop_alpha).
    """

    def __init__(self, criterion: nn.Module, alpha: float = 0.3) -> None:
        self.criterion = criterion
        self.alpha = alpha

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        first, second = model(images), model(images)
        ce = (self.criterion(first, targets) + self.criterion(second, targets)) / 2
        log_p, log_q = F.log_softmax(first.float(), dim=1), F.log_softmax(second.float(), dim=1)
        kl = (F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
              + F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)) / 2
        return ce + self.alpha * kl, first, {"rdrop_kl": kl.detach()}
