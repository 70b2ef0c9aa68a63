"""The training and evaluation loops: objects in, a dict of floats out.

No argparse and no file I/O here: main.py (or a distributed launcher) builds the model, loaders,
samplers and optimizer, and decides what to save.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from utils.device import autocast, is_main_process
from utils.metrics import EpochSums


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training must stop without saving."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"loss is {value} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.value = epoch, step, value


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device,
    epoch: int,
    normalize: nn.Module,
    sums: EpochSums,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    start_step: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[int, dict[str, Any]], None] | None = None,
    failed: list[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Train for one epoch (or what is left of it after `start_step`).

    Args:
        model, criterion, optimizer: what is trained and how.
        loader: yields batches {"images": uint8 (N,C,H,W), "targets", "paths", "failed"}.
        device: where the model is.
        epoch: 0-based epoch, for messages.
        normalize: uint8 batch -> normalised float batch (on device).
        sums: running sums, updated in place (the caller saves them when interrupted).
        scaler: a GradScaler for float16 autocast, else None.
        amp_dtype: autocast dtype or None.
        start_step: batches of this epoch already done (mid-epoch resume).
        should_stop: polled after each step; True ends the epoch early (a signal arrived).
        on_batch: called with (step, batch) before the step (e.g. to draw training batches).
        failed: collects (path, reason) of images that could not be decoded.

    Returns:
        {"loss", "acc", "mean_acc"} over the epoch so far, "steps" done, "interrupted" (0 or 1).
    """
    model.train()
    step = start_step
    total = start_step + len(loader)
    bar = tqdm(loader, total=total, initial=start_step, desc=f"train {epoch + 1}", leave=False,
               disable=not is_main_process(), dynamic_ncols=True)
    interrupted = False
    for batch in bar:
        if failed is not None:
            failed.extend(batch["failed"])
        if len(batch["targets"]) == 0:
            step += 1
            continue
        if on_batch is not None:
            on_batch(step, batch)
        images = normalize(batch["images"].to(device, non_blocking=True))
        targets = batch["targets"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, targets)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(epoch, step, value)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        sums.update(value, logits.detach(), targets)
        step += 1
        bar.set_postfix(loss=f"{sums.loss_sum / max(1, sums.count):.4f}", refresh=False)
        if should_stop():
            interrupted = step < total
            break
    bar.close()
    out = sums.metrics()
    out["steps"] = float(step)
    out["interrupted"] = float(interrupted)
    return out


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: Any,
    device: torch.device,
    num_classes: int,
    normalize: nn.Module,
    amp_dtype: torch.dtype | None = None,
    desc: str = "val",
    failed: list[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and mean per-class accuracy of `model` over `loader`.

    Returns:
        {"loss", "acc", "mean_acc"}.
    """
    model.eval()
    sums = EpochSums(num_classes)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not is_main_process(), dynamic_ncols=True):
        if failed is not None:
            failed.extend(batch["failed"])
        if len(batch["targets"]) == 0:
            continue
        images = normalize(batch["images"].to(device, non_blocking=True))
        targets = batch["targets"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        sums.update(loss.item(), logits.float(), targets)
    return sums.metrics()
