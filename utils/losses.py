"""Classification losses: CrossEntropy, Focal, Poly-1; hard or soft targets, label smoothing, class weights.

All three take targets as class indices (N,) or as probabilities (N, C) -- the latter is what
mixup/cutmix produce -- and reduce as torch's weighted cross-entropy does:
sum(w_i * loss_i) / sum(w_i), w_i being the class weight of sample i's target.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.log import UserError
from utils.names import LOSSES as LOSS_NAMES


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


LOSSES = {"CrossEntropyLoss": CrossEntropyLoss, "FocalLoss": FocalLoss, "PolyLoss": PolyLoss}
assert tuple(LOSSES) == LOSS_NAMES, "utils.names.LOSSES names every loss"


def class_balance_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """pytorch-classifier's rule: the square root of scikit-learn's 'balanced' class weights.

    The root keeps a very rare class from getting a weight so large that optimisation breaks.
    Classes absent from `targets` get weight 1.
    """
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(np.asarray(targets))
    balanced = compute_class_weight("balanced", classes=present, y=np.asarray(targets))
    weight = torch.ones(num_classes)
    weight[torch.as_tensor(present)] = torch.as_tensor(np.sqrt(balanced), dtype=torch.float32)
    return weight


def build_loss(name: str, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> nn.Module:
    """The loss named by --loss.

    Args:
        name: CrossEntropyLoss, FocalLoss or PolyLoss.
        label_smoothing: --label_smoothing.
        weight: per-class weights (--class_balance) or None.

    Returns:
        The loss module.
    """
    if name not in LOSSES:
        raise UserError(f"unknown --loss '{name}'; choose one of {', '.join(LOSSES)}")
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
