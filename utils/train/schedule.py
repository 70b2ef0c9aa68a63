"""Learning rate per optimizer update: linear warm-up, then a timm schedule or a torch scheduler.

    schedule = LRSchedule(optimizer, lr=1e-3, epochs=100, warmup=True, steps_per_epoch=len(loader))
    lr = schedule.start_epoch(epoch)        # the lr of the epoch's first update (train.log's lr column)
    ... optimizer.step(); schedule.after_step()   # the lr of the next update

pytorch-classifier's rule, now per step: with --warmup, the first --warmup_ratios of all updates (a
fraction of an epoch counts) rise linearly from --warmup_minlr to --lr, one update at a time. Then:

- no lr_scheduler in the config: timm's cosine from --lr down to --warmup_minlr at the last update;
- a timm schedule (names.TIMM_SCHEDULERS: cosine, tanh, step, multistep, poly, wsd, rsqrt, constant):
  timm.scheduler.create_scheduler_v2 with the config's lr_scheduler_params (in epochs, as timm counts
  them: decay_epochs, decay_milestones, decay_rate, cooldown_epochs, cycle_limit ...), per update;
- a torch.optim.lr_scheduler class (StepLR, CosineAnnealingLR, ReduceLROnPlateau ...): stepped once per
  epoch after the warm-up, as pytorch-classifier did (ReduceLROnPlateau watches the validation loss).

Names match in any case. Layer-wise scales (--layer_decay's `lr_scale` per param group) are applied
to every lr set here. The position is the count of optimizer updates, saved in state_dict() with
the timm or torch scheduler's own state, so --resume continues on the same update.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from utils.core.log import UserError
from utils.core.names import TIMM_SCHEDULERS, lookup

# torch schedulers a YAML file cannot configure (they take functions or other schedulers)
TORCH_EXCLUDED = ("LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler")
# create_scheduler_v2 arguments that --epoch and the warm-up flags set
TIMM_MANAGED = ("optimizer", "sched", "num_epochs", "warmup_epochs", "warmup_lr", "warmup_prefix", "step_on_epochs",
                "updates_per_epoch")


def torch_scheduler_names() -> list[str]:
    """The torch.optim.lr_scheduler classes a config may name."""
    base = torch.optim.lr_scheduler.LRScheduler
    return sorted(n for n, c in vars(torch.optim.lr_scheduler).items()
                  if inspect.isclass(c) and (issubclass(c, base) or c is torch.optim.lr_scheduler.ReduceLROnPlateau)
                  and not n.startswith("_") and n not in TORCH_EXCLUDED)


def resolve_scheduler(name: str | None) -> tuple[str, str]:
    """("timm", "cosine") for no name; ("torch", class name) or ("timm", schedule name) for a name in any case.

    Raises:
        UserError: an unknown name, listing the known ones.
    """
    if name is None:
        return "timm", "cosine"
    found = lookup(str(name), torch_scheduler_names())
    if found is not None:
        return "torch", found
    found = lookup(str(name), TIMM_SCHEDULERS)
    if found is not None:
        return "timm", found
    raise UserError(f"config lr_scheduler '{name}' is neither a torch.optim.lr_scheduler class ({', '.join(torch_scheduler_names())}) "
                    f"nor a timm schedule ({', '.join(TIMM_SCHEDULERS)}; for timm's plateau use ReduceLROnPlateau)")


def build_torch_scheduler(optimizer: torch.optim.Optimizer, name: str, params: dict[str, Any]) -> Any:
    """Instantiate torch.optim.lr_scheduler.<name>(optimizer, **params), with clear errors."""
    kind, found = resolve_scheduler(name)
    if kind != "torch":
        raise UserError(f"'{name}' is not a torch.optim.lr_scheduler class; known: {', '.join(torch_scheduler_names())}")
    cls = getattr(torch.optim.lr_scheduler, found)
    try:
        return cls(optimizer, **(params or {}))
    except TypeError as err:
        sig = inspect.signature(cls.__init__)
        raise UserError(f"config lr_scheduler_params do not fit {found}{sig}: {err}") from None


def build_timm_scheduler(optimizer: torch.optim.Optimizer, name: str, params: dict[str, Any], epochs: int,
                         warmup_updates: int, steps_per_epoch: int, min_lr: float) -> Any:
    """timm.scheduler.create_scheduler_v2 stepped per update: `warmup_updates` of linear warm-up from
    `min_lr`, then schedule `name` over the remaining updates of `epochs` epochs.

    Raises:
        UserError: params that the flags set, or that do not fit the schedule.
    """
    from timm.scheduler import create_scheduler_v2

    clash = sorted(set(params) & set(TIMM_MANAGED))
    if clash:
        raise UserError(f"config lr_scheduler_params: {', '.join(clash)} are set by --epoch and --warmup, --warmup_ratios, "
                        "--warmup_minlr; remove them")
    warmup_epochs = warmup_updates / steps_per_epoch
    try:
        scheduler, _ = create_scheduler_v2(optimizer, name, num_epochs=epochs - warmup_epochs, warmup_epochs=warmup_epochs,
                                           warmup_lr=min_lr, warmup_prefix=True, step_on_epochs=False,
                                           updates_per_epoch=steps_per_epoch, **({"min_lr": min_lr} | dict(params)))
    except (TypeError, ValueError, AssertionError) as err:
        takes = [p for p in inspect.signature(create_scheduler_v2).parameters if p not in TIMM_MANAGED]
        raise UserError(f"config lr_scheduler_params do not fit timm's {name} schedule ({err}); it takes "
                        f"{', '.join(takes)}") from None
    return scheduler


class LRSchedule:
    """Sets the optimizer's learning rate at each epoch's start and after each optimizer update.

    Args:
        optimizer: the optimizer (param groups may carry `lr_scale`).
        lr: the peak learning rate (--lr).
        epochs: total epochs (--epoch).
        warmup: whether to warm up (--warmup).
        warmup_ratios: fraction of all updates spent warming up.
        min_lr: start of the warm-up and end of the default decay (--warmup_minlr).
        scheduler: config lr_scheduler (a torch class or a timm schedule, any case), or None for cosine.
        scheduler_params: its keyword arguments.
        steps_per_epoch: optimizer updates per epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, epochs: int, warmup: bool = False,
                 warmup_ratios: float = 0.05, min_lr: float = 1e-6, scheduler: str | None = None,
                 scheduler_params: dict[str, Any] | None = None, steps_per_epoch: int = 1) -> None:
        min_lr = min(min_lr, lr)  # a floor above the peak (--lr 1e-30) would make the decay rise
        self.optimizer, self.lr, self.epochs, self.min_lr = optimizer, lr, epochs, min_lr
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        total = epochs * self.steps_per_epoch
        self.warmup_updates = min(round(warmup_ratios * total), total - 1) if warmup else 0
        self.kind, self.name = resolve_scheduler(scheduler)
        self.update: int | None = 0  # optimizer updates since the start of training (None: not known yet)
        self.epoch_lr: float | None = None  # the lr of the current epoch's first update (train.log's lr)
        self.last_val_loss: float | None = None  # what ReduceLROnPlateau watches
        self.timm_scheduler: Any = None
        self.torch_scheduler: Any = None
        if self.kind == "timm":
            for group in optimizer.param_groups:
                group["lr"] = lr  # timm's base value; it applies each group's lr_scale itself
            self.timm_scheduler = build_timm_scheduler(optimizer, self.name, dict(scheduler_params or {}), epochs,
                                                       self.warmup_updates, self.steps_per_epoch, min_lr)
        else:
            self._set(lr)
            self.torch_scheduler = build_torch_scheduler(optimizer, self.name, scheduler_params or {})
        self.plateau = isinstance(self.torch_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _warm(self, update: int) -> float:
        return self.min_lr + (self.lr - self.min_lr) * update / self.warmup_updates

    def end_epoch(self, val_loss: float | None) -> None:
        """Record the epoch's validation loss (ReduceLROnPlateau acts on it at the next start_epoch)."""
        self.last_val_loss = val_loss

    def start_epoch(self, epoch: int, last_val_loss: float | None = None) -> float:
        """Set and return the lr of the first update of `epoch` (0-based). Call once per epoch, in order.

        Args:
            epoch: the epoch.
            last_val_loss: the previous epoch's validation loss (default: the one end_epoch recorded).
        """
        last_val_loss = self.last_val_loss if last_val_loss is None else last_val_loss
        self.update = epoch * self.steps_per_epoch
        if self.timm_scheduler is not None:
            self.timm_scheduler.step_update(self.update)
            self.epoch_lr = self.current()
            return self.epoch_lr
        first = -(-self.warmup_updates // self.steps_per_epoch)  # the first epoch that starts after the warm-up
        if epoch < first:
            self._set(self._warm(self.update))
        elif epoch == first:
            self._set(self.lr)
        elif self.plateau:
            self.torch_scheduler.step(last_val_loss if last_val_loss is not None else float("inf"))
        else:
            self.torch_scheduler.step()
        self.epoch_lr = self.current()
        return self.epoch_lr

    def after_step(self) -> None:
        """One optimizer update done: set the lr of the next (timm schedules and the warm-up move per update)."""
        self.update = (self.update or 0) + 1
        if self.timm_scheduler is not None:
            self.timm_scheduler.step_update(self.update)
        elif self.update < self.warmup_updates:
            self._set(self._warm(self.update))
        elif self.update == self.warmup_updates:
            self._set(self.lr)

    def resume(self, epoch: int, updates_done: int) -> float:
        """Continue inside `epoch` after `updates_done` updates (a last.pt saved mid-epoch): the optimizer
        holds the lr of the next update; returns the epoch's first lr (train.log's). Files written before
        the count was kept get it from the position."""
        if self.update is None:
            self.update = epoch * self.steps_per_epoch + updates_done
        return self.epoch_lr if self.epoch_lr is not None else self.current()

    def current(self) -> float:
        """The scheduled lr (of the first param group, without its layer-decay scale)."""
        group = self.optimizer.param_groups[0]
        return float(group["lr"] / (group.get("lr_scale") or 1.0))

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "epoch_lr": self.epoch_lr, "last_val_loss": self.last_val_loss,
                "timm_scheduler": self.timm_scheduler.state_dict() if self.timm_scheduler is not None else None,
                "torch_scheduler": self.torch_scheduler.state_dict() if self.torch_scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.torch_scheduler is not None and state.get("torch_scheduler") is not None:
            self.torch_scheduler.load_state_dict(state["torch_scheduler"])
        if self.timm_scheduler is not None and state.get("timm_scheduler") is not None:
            self.timm_scheduler.load_state_dict(state["timm_scheduler"])
        self.update, self.epoch_lr = state.get("update"), state.get("epoch_lr")
        self.last_val_loss = state.get("last_val_loss")
