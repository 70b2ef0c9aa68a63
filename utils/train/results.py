"""What a finished training run keeps of itself in its folder: results.json and results.png.

    times = EpochTimes()                                # a TrainState part: the seconds of every epoch, resumed too
    write_run_results(run, summary, test, model, spec, device, times)   # main.py's end of training

results.json is the same file, with the same rule, as in metrice.py's output folders (RunFolder.RESULTS,
utils.evaluate.tasks.update_results: each writer adds or replaces its own sections and keeps the
others'). main.py writes three sections:

    train   the model, its input, classes, device; epochs trained; the best epoch (metric, value) and that
            epoch's metrics as best.pt holds them (train and val: the numbers of its train.log row); times
            (total training seconds, the mean epoch, each epoch's seconds and their parts)
    test    best.pt on the test split (the numbers main.py prints), or null without a test split
    model   parameters, the size of best.pt in MB, and a forward pass's images/s at the run's image size
            and batch on the training device (a short measurement with the timer of utils.infer.speed)

A --kfold run writes them in each fold's folder and a `kfold` section (per-fold results, mean, std,
the best fold) in its own. results.png is loss, the validation metrics and the learning rate from
train.log, side by side, with the best epoch marked (utils.draw.figures.plot_results).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from utils.core.run import Run, RunFolder
from utils.core.schema import Checkpoint, PreprocessSpec
from utils.draw.figures import plot_results
from utils.evaluate.tasks import update_results
from utils.infer.speed import device_name, speed_row, time_batches, warm_up
from utils.train.epoch_log import read_train_log

LOGGER = logging.getLogger(__name__)

RESULTS_PLOT = "results.png"
SPEED_BATCH = 32           # images per timed forward pass at most (the run's batch size when smaller)
SPEED_SECONDS = 0.2        # the measurement: at least this long, and at least SPEED_CALLS calls ...
SPEED_CALLS = 5
SPEED_MAX_SECONDS = 3.0    # ... and at most this long


class EpochTimes:
    """Seconds of each finished epoch by part (train, val, checkpoints, logs and plots): a TrainState part,
    so a resumed run's results.json counts the epochs trained before the interruption too."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = [{k: float(v) for k, v in e.items()} for e in state.get("epochs", [])]

    def section(self) -> dict[str, Any]:
        """results.json's times: the total, the mean epoch, and each epoch's seconds and parts."""
        totals = [sum(e.values()) for e in self.epochs]
        parts = {k: sum(e.get(k, 0.0) for e in self.epochs) for k in (self.epochs[0] if self.epochs else {})}
        return {"train_seconds": sum(totals), "epoch_seconds_mean": sum(totals) / len(totals) if totals else None,
                "epoch_seconds": totals, "parts_seconds": parts}


def forward_speed(model: nn.Module, spec: PreprocessSpec, batch_size: int, device: torch.device,
                  amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Images per second of the model's forward pass (eval mode, no gradients) on `device`, at the run's
    input size and batch (at most SPEED_BATCH), timed briefly (utils.infer.speed).

    Returns:
        {"device", "batch_size", "image_size", "images_per_s", "ms_per_image", "batch_ms_median", ...}.
    """
    batch = max(1, min(int(batch_size), SPEED_BATCH))
    x = torch.randn(batch, spec.channels, spec.crop, spec.crop, device=device)
    was_training = model.training
    model.eval()

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x)

    try:
        warm_up(step, device, seconds=0.05, min_calls=2, max_calls=10)
        times = time_batches(step, device, min_iters=SPEED_CALLS, min_seconds=SPEED_SECONDS,
                             max_seconds=SPEED_MAX_SECONDS, warmup=False)
    finally:
        model.train(was_training)
    return {"device": device_name(device), "image_size": spec.crop, **speed_row(times, batch)}


def model_section(model: nn.Module, run: RunFolder, speed: dict[str, Any]) -> dict[str, Any]:
    """results.json's model: parameters, best.pt's size in MB (10^6 bytes), the forward speed."""
    best = run.best
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "best_pt_mb": best.stat().st_size / 1e6 if best.is_file() else None, "speed": speed}


def train_section(best: Checkpoint, summary: dict[str, Any], epochs: int, times: EpochTimes, device: torch.device) -> dict[str, Any]:
    """results.json's train: what was trained, the best epoch and its metrics (from best.pt), the times."""
    meta = best.meta
    return {"model_name": meta.model_name, "task": meta.task, "image_size": meta.preprocess.crop,
            "image_channel": meta.preprocess.channels, "classes": list(meta.class_names), "device": device_name(device),
            "epochs": epochs, "best_epoch": summary["best_epoch"], "best_metric": summary["best_metric"],
            "best_value": summary["best_value"], "best_metrics": best.metrics, "weights": best.weights,
            "time": times.section()}


def write_run_results(run: Run, best: Checkpoint, summary: dict[str, Any], test: dict[str, float] | None,
                      model: dict[str, Any], epochs: int, times: EpochTimes, device: torch.device,
                      metrics: tuple[str, str]) -> None:
    """results.json's train, test and model sections and results.png (on the main process only).

    Args:
        run: the run folder.
        best: best.pt as it was finally written.
        summary: Trainer.fit's {"best_epoch", "best_metric", "best_value"}.
        test: best.pt's test metrics, or None without a test split.
        model: model_section's output.
        epochs: epochs trained (a resumed run: all of them).
        times: the epochs' seconds.
        device: where it trained.
        metrics: train.log's two metric columns.
    """
    if not run.main:
        return
    path = update_results(run.path, train=train_section(best, summary, epochs, times, device), test=test, model=model)
    if run.log_file.is_file():
        rows = read_train_log(run.log_file)
        if rows:
            run.savefig(plot_results(rows, metrics, summary["best_epoch"], summary["best_metric"]), RESULTS_PLOT)
    print(f"results: {path}" + (f", {run / RESULTS_PLOT}" if (run / RESULTS_PLOT).is_file() else ""), flush=True)
