"""The training and evaluation loops: objects in, a dict of floats out.

No argparse and no file I/O here: main.py (or a distributed launcher) builds the model, loaders,
samplers and optimizer, and decides what to save.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from utils.core.device import autocast
from utils.core.distributed import any_true, gather_rows, is_main_process, reduce_sum, world_info
from utils.core.log import progress
from utils.data.transforms import run_with_tta
from utils.evaluate.metrics import EpochSums, MultiLabelSums


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training must stop without saving."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"loss is {value} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.value = epoch, step, value


@dataclass
class StepParts:
    """How a batch trains: everything around the model's forward and backward pass.

    Args:
        objective: (model, images, targets) -> (loss, logits, extra loss terms); see utils.train.losses.Supervised.
        optimizer: the optimizer.
        scaler: a GradScaler for float16 autocast, else None.
        amp_dtype: autocast dtype or None.
        batch_transform: (images, targets) -> (images, soft targets), e.g. mixup; metrics use the hard targets.
        accumulate: optimizer step every `accumulate` batches (gradient accumulation).
        clip_grad: clip the gradient norm to this value (0 = off).
        ema: an EMA object updated after each optimizer step.
        train_mode: sets the model's train/eval modes (default model.train()); freezing uses it.
        shared_params: parameters trained outside the (DistributedDataParallel) model, e.g. MGD's
            layers: their gradients are averaged over the processes before each step.
        after_step: called after each optimizer update (the lr schedule moves per update).
    """

    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    accumulate: int = 1
    clip_grad: float = 0.0
    ema: Any = None
    train_mode: Callable[[nn.Module], None] | None = None
    shared_params: list[torch.Tensor] = field(default_factory=list)
    after_step: Callable[[], None] | None = None

    def optimizer_step(self, model: nn.Module) -> None:
        """Apply the accumulated gradients (unscaled and clipped first when asked), clear them, update the EMA."""
        optimizer, scaler = self.optimizer, self.scaler
        world = world_info()[1]
        for p in self.shared_params:
            if p.grad is not None and world > 1:
                p.grad.copy_(reduce_sum(p.grad) / world)
        if self.clip_grad > 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *self.shared_params], self.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model)
        if self.after_step is not None:
            self.after_step()


def train_one_epoch(
    model: nn.Module,
    parts: StepParts,
    loader: Any,
    device: torch.device,
    epoch: int,
    normalize: nn.Module,
    sums: EpochSums,
    start_step: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    failed: list[tuple[str, str]] | None = None,
    extra_sums: dict[str, float] | None = None,
) -> dict[str, float]:
    """Train for one epoch (or what is left of it after `start_step`).

    Args:
        model: what is trained.
        parts: the objective, optimizer and the rest of a training step.
        loader: yields batches {"images": uint8 (N,C,H,W), "targets", "paths", "failed"}.
        device: where the model is.
        epoch: 0-based epoch, for messages.
        normalize: uint8 batch -> normalised float batch (on device).
        sums: running sums, updated in place (the caller saves them when interrupted).
        start_step: batches of this epoch already done (mid-epoch resume).
        should_stop: polled after each optimizer step; True ends the epoch early (a signal arrived).
        on_batch: called with (step, images, targets) as the model sees them (after batch_transform).
        failed: collects (path, reason) of images that could not be decoded.
        extra_sums: running sums of the objective's extra terms (e.g. kd_loss), updated in place.

    Returns:
        {"loss", "acc", "mean_acc"} over the epoch so far, the mean of each extra term, "steps" done,
        "interrupted" (0 or 1).
    """
    (parts.train_mode or (lambda m: m.train()))(model)
    step, total = start_step, start_step + len(loader)
    extra_sums = {} if extra_sums is None else extra_sums
    bar = progress(loader, total=total, initial=start_step, desc=f"train {epoch + 1}", leave=False,
                   disable=not is_main_process())
    interrupted = False
    for batch in bar:
        if failed is not None:
            failed.extend(batch["failed"])
        # nothing decoded, or failed decodes left one image: batch norm cannot train on a batch of one
        # (with several processes all skip the step together: they must all take part in each one)
        if any_true(len(batch["targets"]) == 0 or (len(batch["targets"]) == 1 and bool(batch["failed"])))[0]:
            step += 1
            continue
        images = normalize(batch["images"].to(device, non_blocking=True))
        hard = batch["targets"].to(device, non_blocking=True)
        targets = hard
        if parts.batch_transform is not None:
            images, targets = parts.batch_transform(images, hard)
        if on_batch is not None:
            on_batch(step, images, targets)
        with autocast(device, parts.amp_dtype):
            loss, logits, terms = parts.objective(model, images, targets)
        value = loss.item()
        if any_true(not math.isfinite(value))[0]:  # on any process: all stop at the same step
            raise NonFiniteLoss(epoch, step, value)
        scaled = loss / parts.accumulate if parts.accumulate > 1 else loss
        (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
        stepped = (step + 1) % parts.accumulate == 0 or step + 1 == total
        if stepped:
            parts.optimizer_step(model)
        sums.update(value, logits.detach().float(), hard)
        for key, term in terms.items():
            extra_sums[key] = extra_sums.get(key, 0.0) + float(term) * len(hard)
        step += 1
        bar.set_postfix(loss=f"{sums.loss_sum / max(1, sums.count):.4f}", refresh=False)
        if stepped and any_true(should_stop())[0]:  # only where no accumulated gradient would be lost; all together
            interrupted = step < total
            break
    bar.close()
    out = sums.metrics() | extra_means(extra_sums, sums)
    return out | {"steps": float(step), "interrupted": float(interrupted)}


def extra_means(extra_sums: dict[str, float], sums: EpochSums) -> dict[str, float]:
    """The epoch's mean of each extra loss term (e.g. kd_loss), over all processes."""
    if not extra_sums:
        return {}
    keys = sorted(extra_sums)
    totals = reduce_sum(torch.tensor([extra_sums[k] for k in keys] + [float(sums.count)], dtype=torch.float64))
    return {k: float(totals[i]) / max(1.0, float(totals[-1])) for i, k in enumerate(keys)}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: Any,
    device: torch.device,
    sums: EpochSums | MultiLabelSums,
    normalize: nn.Module,
    amp_dtype: torch.dtype | None = None,
    desc: str = "val",
    failed: list[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """The metrics of `model` over `loader` (loss, acc, mean_acc ... or for a multi-label model
    loss, map, f1), summed over every process.

    Batches of TenCrop images (N, 10, C, H, W) are scored by the mean of the crops' probabilities.

    Args:
        sums: an empty EpochSums (one softmax) or MultiLabelSums (a sigmoid per class).

    Returns:
        sums.metrics().
    """
    model.eval()
    task = sums.task
    for batch in progress(loader, desc=desc, leave=False, disable=not is_main_process()):
        if failed is not None:
            failed.extend(batch["failed"])
        if len(batch["targets"]) == 0:
            continue
        images = batch["images"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            if images.ndim == 5:  # TenCrop: average the crops' probabilities, back to logits the loss takes
                probs = run_with_tta(lambda x: task.probabilities(model(normalize(x))), images)
                logits = task.as_logits(probs)
            else:
                logits = model(normalize(images)).float()
        loss = criterion(logits, targets)
        sums.update(loss.item(), logits, targets)
    return sums.metrics()


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: Any, device: torch.device, normalize: nn.Module, task: Any, num_classes: int,
                   amp_dtype: torch.dtype | None = None, desc: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of `model` on every image of `loader` and their targets, from every process.

    TenCrop batches (N, 10, C, H, W) give the logits of the crops' mean probabilities (task.as_logits),
    as evaluate() scores them.

    Args:
        task: the model's task type (utils.core.task).
        num_classes: the model's classes (the shape of a process's rows when its share is empty).

    Returns:
        (float32 logits (N, C), targets: class indices (N,) or multi-hot (N, C)) on the CPU, every
        process's rows in rank order (each evaluates its share of the split).
    """
    model.eval()
    logits, targets = [], []
    for batch in progress(loader, desc=desc, leave=False, disable=not is_main_process()):
        if len(batch["targets"]) == 0:
            continue
        images = batch["images"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            if images.ndim == 5:
                out = task.as_logits(run_with_tta(lambda x: task.probabilities(model(normalize(x))), images))
            else:
                out = model(normalize(images))
        logits.append(out.float().cpu())
        targets.append(batch["targets"].cpu())
    z = torch.cat(logits) if logits else torch.zeros(0, num_classes)
    y = torch.cat(targets) if targets else (torch.zeros(0, num_classes) if task.multilabel else torch.zeros(0, dtype=torch.long))
    return gather_rows(z), gather_rows(y)


class TemperatureScaled(nn.Module):
    """A model whose logits are divided by its calibration temperature (one value, or one per class),
    so that evaluate() scores the probabilities predict.py gives (utils.core.task.TaskType.probabilities).

    Args:
        model: the network.
        temperature: ModelMeta.temperature (None = 1).
    """

    def __init__(self, model: nn.Module, temperature: Any) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(list(temperature or [1.0]), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() / self.temperature


@torch.no_grad()
def update_bn(model: nn.Module, loader: Any, device: torch.device, normalize: nn.Module) -> None:
    """Recompute batch-norm running statistics with one pass over `loader` (for averaged weights)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {}
    for m in norms:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # cumulative average over the pass
    was_training = model.training
    model.train()
    for batch in progress(loader, desc="update bn", leave=False, disable=not is_main_process()):
        if len(batch["targets"]):
            model(normalize(batch["images"].to(device, non_blocking=True)))
    for m in norms:
        m.momentum = momenta[m]
    model.train(was_training)
