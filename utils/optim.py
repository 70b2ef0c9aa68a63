"""Optimizers with weight decay only where it belongs (not on biases and normalisation layers)."""
from __future__ import annotations

import torch
from torch import nn

from utils.log import UserError
from utils.names import OPTIMIZERS



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


def classifier_names(model: nn.Module) -> list[str]:
    """Parameter names of the classifier head (timm's get_classifier(), else the last nn.Linear)."""
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        raise UserError(f"cannot find the classifier head of {type(model).__name__} for --freeze")
    ids = {id(p) for p in head.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


class HeadFreezer:
    """--freeze N: train only the classifier head for the first N epochs (-1: for all epochs).

    While frozen, the other parameters take no gradient and their batch-norm statistics stay fixed
    (those layers run in eval mode).
    """

    def __init__(self, model: nn.Module, epochs: int) -> None:
        self.model = model
        self.epochs = epochs
        self.head = set(classifier_names(model))
        self.frozen = False

    def is_frozen(self, epoch: int) -> bool:
        return self.epochs == -1 or epoch < self.epochs

    def start_epoch(self, epoch: int) -> bool:
        """Freeze or unfreeze for `epoch`; True if frozen."""
        self.frozen = self.is_frozen(epoch)
        for name, param in self.model.named_parameters():
            param.requires_grad_(not self.frozen or name in self.head)
        return self.frozen

    def train_mode(self, model: nn.Module) -> None:
        """Train mode, but batch norm outside the head in eval mode while frozen. `model` may be
        the model or a wrapper of it (DistributedDataParallel): the layers are the model's own."""
        model.train()
        if self.frozen:
            head_modules = {name.rsplit(".", 1)[0] for name in self.head}
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._NormBase) and name not in head_modules:
                    module.eval()
