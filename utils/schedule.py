"""Learning rate per epoch: linear warm-up, then a torch scheduler from the config or cosine decay.

pytorch-classifier's rule: with --warmup, the first int(warmup_ratios * epoch) epochs rise linearly
from --warmup_minlr to --lr. After that, the config's lr_scheduler (any torch.optim.lr_scheduler
class, stepped once per epoch) or, without one, a cosine decay from --lr down to --warmup_minlr.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from utils.log import UserError


def build_torch_scheduler(optimizer: torch.optim.Optimizer, name: str, params: dict[str, Any]) -> Any:
    """Instantiate torch.optim.lr_scheduler.<name>(optimizer, **params), with clear errors."""
    cls = getattr(torch.optim.lr_scheduler, str(name), None)
    base = torch.optim.lr_scheduler.LRScheduler
    if not (inspect.isclass(cls) and (issubclass(cls, base) or cls is torch.optim.lr_scheduler.ReduceLROnPlateau)):
        known = sorted(n for n, c in vars(torch.optim.lr_scheduler).items()
                       if inspect.isclass(c) and issubclass(c, base) and not n.startswith("_") and n not in ("LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler"))
        raise UserError(f"config lr_scheduler '{name}' is not a torch.optim.lr_scheduler class; known: {', '.join(known)}")
    try:
        return cls(optimizer, **(params or {}))
    except TypeError as err:
        sig = inspect.signature(cls.__init__)
        raise UserError(f"config lr_scheduler_params do not fit {name}{sig}: {err}") from None


class EpochLR:
    """Sets the optimizer's learning rate at the start of each epoch.

    Args:
        optimizer: the optimizer (all parameter groups get the same lr).
        lr: the peak learning rate (--lr).
        epochs: total epochs (--epoch).
        warmup: whether to warm up (--warmup).
        warmup_ratios: fraction of epochs spent warming up.
        min_lr: start of the warm-up and end of the default decay (--warmup_minlr).
        scheduler: config lr_scheduler class name, or None for the cosine decay.
        scheduler_params: its keyword arguments.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, epochs: int, warmup: bool = False,
                 warmup_ratios: float = 0.05, min_lr: float = 1e-6, scheduler: str | None = None,
                 scheduler_params: dict[str, Any] | None = None) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.min_lr = min_lr
        self.warmup_epochs = int(warmup_ratios * epochs) if warmup else 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.torch_scheduler = build_torch_scheduler(optimizer, scheduler, scheduler_params or {}) if scheduler else None
        self.plateau = isinstance(self.torch_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.last_val_loss: float | None = None  # what ReduceLROnPlateau watches

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def end_epoch(self, val_loss: float | None) -> None:
        """Record the epoch's validation loss (ReduceLROnPlateau acts on it at the next start_epoch)."""
        self.last_val_loss = val_loss

    def start_epoch(self, epoch: int, last_val_loss: float | None = None) -> float:
        """Set and return the lr for `epoch` (0-based). Call once per epoch, in order.

        Args:
            epoch: the epoch.
            last_val_loss: the previous epoch's validation loss (default: the one end_epoch recorded).
        """
        last_val_loss = self.last_val_loss if last_val_loss is None else last_val_loss
        w = self.warmup_epochs
        if epoch < w:
            self._set(self.min_lr + (self.lr - self.min_lr) * epoch / w)
        elif self.torch_scheduler is None:
            span = max(1, self.epochs - w)
            self._set(self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * (epoch - w) / span)) / 2)
        elif epoch == w:
            self._set(self.lr)
        elif self.plateau:
            self.torch_scheduler.step(last_val_loss if last_val_loss is not None else float("inf"))
        else:
            self.torch_scheduler.step()
        return self.current()

    def current(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"torch_scheduler": self.torch_scheduler.state_dict() if self.torch_scheduler else None,
                "last_val_loss": self.last_val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.torch_scheduler is not None and state.get("torch_scheduler") is not None:
            self.torch_scheduler.load_state_dict(state["torch_scheduler"])
        self.last_val_loss = state.get("last_val_loss")
