"""Running sums of a classification epoch and the metrics derived from them.

Sums (loss, count, confusion matrix) are what a distributed run all-reduces, through
utils.device.reduce_sum, before any metric is computed.
"""
from __future__ import annotations

from typing import Any

import torch

from utils.device import reduce_sum


class EpochSums:
    """Loss sum, sample count and confusion matrix (rows: true class, columns: predicted)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.count = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, loss: float, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: its mean loss, logits (N, C) and hard targets (N,)."""
        n = targets.shape[0]
        self.loss_sum += float(loss) * n
        self.count += n
        pred = logits.argmax(dim=1).cpu()
        idx = targets.cpu() * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def reduced(self) -> "EpochSums":
        """These sums added up over all processes."""
        out = EpochSums(self.num_classes)
        packed = reduce_sum(torch.cat([torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64),
                                       self.confusion.flatten().double()]))
        out.loss_sum, out.count = float(packed[0]), int(packed[1])
        out.confusion = packed[2:].round().long().view(self.num_classes, self.num_classes)
        return out

    def metrics(self) -> dict[str, float]:
        """loss, acc (overall accuracy) and mean_acc (mean per-class recall over present classes)."""
        sums = self.reduced()
        total = sums.confusion.sum().item()
        per_class_total = sums.confusion.sum(dim=1)
        present = per_class_total > 0
        recall = sums.confusion.diag()[present].double() / per_class_total[present].double()
        return {
            "loss": sums.loss_sum / max(1, sums.count),
            "acc": sums.confusion.diag().sum().item() / max(1, total),
            "mean_acc": recall.mean().item() if present.any() else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "count": self.count, "confusion": self.confusion.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = float(state["loss_sum"])
        self.count = int(state["count"])
        self.confusion = state["confusion"].clone()
