"""Optimizers with weight decay only where it belongs (not on biases and normalisation layers)."""
from __future__ import annotations

import torch
from torch import nn

from utils.log import UserError

OPTIMIZERS = ("SGD", "AdamW", "RMSProp")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases, norm scales and other 1-D tensors without."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer.

    Args:
        model: whose parameters are optimised.
        name: SGD (Nesterov momentum), AdamW or RMSProp.
        lr: learning rate.
        weight_decay: decay of the weight tensors.
        momentum: SGD/RMSProp momentum.

    Returns:
        The optimizer.
    """
    groups = param_groups(model, weight_decay)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "RMSProp":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum)
    raise UserError(f"unknown --optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
