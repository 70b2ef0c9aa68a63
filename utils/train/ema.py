"""Exponential moving average of the weights (--ema), on timm's ModelEmaV3.

The EMA copy is what validation, best.pt and everything downstream use; last.pt keeps both the raw
and the EMA weights and the update count, so a resumed run continues the average exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from utils.models.weights import load_module_state


class EMA:
    """EMA of a model's parameters and buffers, with timm's decay warm-up.

    Args:
        model: the model being trained.
        decay: the long-run decay (--ema_decay).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        # warm-up: decay = 1 - (1 + updates) ** -0.75, capped at `decay`: early updates follow the model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self.ema.update(model, step=self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_module_state(self.module, state["model"])
        self.updates = int(state["updates"])


class SWA:
    """Stochastic weight averaging (Izmailov et al., 2018) over the last epochs (--swa).

    The average is updated once per epoch from `start_epoch` on (torch.optim.swa_utils.AveragedModel);
    its batch-norm statistics are recomputed on the training data before it is evaluated and saved.

    Args:
        model: the model being trained.
        start_epoch: first (0-based) epoch whose weights enter the average.
    """

    def __init__(self, model: nn.Module, start_epoch: int) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.start_epoch = start_epoch
        self.averaged = AveragedModel(model)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def count(self) -> int:
        return int(self.averaged.n_averaged.item())

    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        """Add the weights after `epoch` to the average if SWA has started; True if it did."""
        if epoch >= self.start_epoch:
            self.averaged.update_parameters(model)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_module_state(self.averaged, state)
