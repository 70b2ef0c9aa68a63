"""main.py --lr_find: the learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural
Networks", WACV 2017; fastai's lr_find and the pytorch-lr-finder package do the same).

    python main.py --lr_find --model_name resnet18 --optimizer SGD     # any training flags: the run's set-up
    python main.py --lr_find --lr_find_start 1e-6 --lr_find_end 1 --lr_find_steps 200

The run's own model, optimizer (--optimizer, --weight_decay, --momentum, --layer_decay), loss (the
task's: multiclass or multilabel), training transforms, mixing, --amp, --accumulate and --freeze are
built by utils.train.trainer.Trainer as for training; then --lr_find_steps optimizer updates run with
the lr rising exponentially from --lr_find_start to --lr_find_end (one lr per optimizer update, so
with --accumulate N each lr sees N batches; the loader starts over when it has fewer batches than
steps). Each update's training loss is recorded and smoothed by an exponential moving average with
bias correction (SMOOTHING); the test stops early when the smoothed loss exceeds DIVERGENCE times
its best, or the loss is not finite.

Two suggestions are computed; the one printed first, and in the command to train with, is the
steepest descent: the lr where the smoothed loss falls fastest against log(lr), searched from the
SKIP_START-th update up to the smoothed loss's minimum (the loss still falls fastest there, so the
model learns quickly and is still well below the lr where it diverges; the rule of
pytorch-lr-finder and of fastai's `steep`). The other is the lr of the minimum divided by 10
(fastai's `minimum`), a more cautious choice printed beside it.

The run folder (a new one, as for any run) gets args.yaml, label.txt, lr_find.csv (step, lr, loss,
smoothed), lr_find.png (the losses against log lr, the suggestions marked) and the curve in
TensorBoard; the model's weights are thrown away: no checkpoint is written.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from utils.core.distributed import launch_command
from utils.core.options import Options
from utils.core.run import RunFolder, claimed_run
from utils.data.imageset import report_skipped
from utils.draw.figures import subplots
from utils.train.engine import NonFiniteLoss, StepParts, train_one_epoch
from utils.train.setup import TrainData

SMOOTHING = 0.95   # the moving average's beta (pytorch-lr-finder's): ~20 updates; fastai's 0.98 lags ~50 of 100
DIVERGENCE = 4.0   # stop once the smoothed loss exceeds this many times its best (fastai, pytorch-lr-finder)
SKIP_START = 5     # updates left out of the steepest-descent search: the average of so few is noise
# the options of a range test that are not the training run's (left out of the command that trains)
LR_FIND_OPTIONS = ("lr_find", "lr_find_steps", "lr_find_start", "lr_find_end", "lr")


@dataclasses.dataclass
class LrFindResult:
    """What a range test recorded, and its suggestions.

    Args:
        lrs: the lr of each optimizer update.
        losses: its training loss (the mean over the update's images).
        smoothed: the bias-corrected moving average of `losses`.
        stop: why it ended ("diverged", "loss not finite", "steps done").
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stop: str

    @property
    def steepest(self) -> float | None:
        """The printed suggestion: steepest_lr of the curve (None with fewer than 3 points)."""
        return steepest_lr(self.lrs, self.smoothed)

    @property
    def minimum_tenth(self) -> float | None:
        """The lr of the smoothed loss's minimum, divided by 10 (None without points)."""
        return self.lrs[int(np.argmin(self.smoothed))] / 10 if self.smoothed else None


def exponential_lrs(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates from `start` to `end`, each the previous times (end/start)**(1/(steps-1))."""
    if steps == 1:
        return [start]
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def steepest_lr(lrs: list[float], smoothed: list[float], skip_start: int = SKIP_START) -> float | None:
    """The lr at which the smoothed loss falls fastest against log(lr) (np.gradient), searched from
    update `skip_start` to the smoothed loss's minimum (the whole curve when that leaves < 2 points).

    Returns:
        The lr, or None with fewer than 3 points.
    """
    if len(lrs) < 3:
        return None
    loss = np.asarray(smoothed, dtype=np.float64)
    slope = np.gradient(loss, np.log(np.asarray(lrs, dtype=np.float64)))
    lo, hi = min(skip_start, len(lrs) - 2), int(np.argmin(loss)) + 1
    window = range(lo, hi) if hi - lo >= 2 else range(len(lrs))
    return float(lrs[min(window, key=lambda i: slope[i])])


class RangeTest:
    """The lr of each optimizer update, and the record of its loss: call `record(loss)` after each
    update; it sets the next update's lr and says when to stop.

    Args:
        optimizer: whose param groups get the lr (times each group's `lr_scale`: --layer_decay).
        start, end, steps: the exponential lr range and the number of updates.
        divergence: stop when the smoothed loss exceeds this many times its best.
        smoothing: beta of the moving average.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, start: float, end: float, steps: int,
                 divergence: float = DIVERGENCE, smoothing: float = SMOOTHING) -> None:
        self.optimizer, self.schedule = optimizer, exponential_lrs(start, end, steps)
        self.divergence, self.smoothing = divergence, smoothing
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stop: str | None = None
        self._average, self._best = 0.0, math.inf
        self.set_lr(self.schedule[0])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def record(self, loss: float) -> bool:
        """The loss of the update just made at the current lr; True when the test is over."""
        n = len(self.losses) + 1
        self.lrs.append(self.schedule[n - 1])
        self.losses.append(loss)
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        smooth = self._average / (1 - self.smoothing ** n)
        self.smoothed.append(smooth)
        self._best = min(self._best, smooth)
        if not math.isfinite(smooth):
            self.stop = "loss not finite"
        elif smooth > self.divergence * self._best:
            self.stop = "diverged"
        elif n == len(self.schedule):
            self.stop = "steps done"
        else:
            self.set_lr(self.schedule[n])
        return self.stop is not None

    def result(self) -> LrFindResult:
        return LrFindResult(self.lrs, self.losses, self.smoothed, self.stop or "no update made")


def run_range_test(model: nn.Module, parts: StepParts, loader: Any, device: torch.device, normalize: nn.Module,
                   new_sums: Callable[[], Any], test: RangeTest, sampler: Any = None) -> LrFindResult:
    """Train with utils.train.engine.train_one_epoch, epoch after epoch, until `test` stops; each
    update's loss is the growth of the epoch sums (loss_sum, count) since the last one.

    Args:
        model, parts, loader, device, normalize: as train_one_epoch takes them (parts.after_step: None,
            as the lr is the test's).
        new_sums: an empty EpochSums (or MultiLabelSums) for each pass over the loader.
        test: the range test (it has set the first lr).
        sampler: the loader's EpochSampler (set_epoch for each pass), or None.
    """
    failed: list[tuple[str, str]] = []
    epoch = 0
    while test.stop is None:
        if sampler is not None:
            sampler.set_epoch(epoch)
        sums = new_sums()
        seen = [0.0, 0]  # loss_sum and count at the last update

        def update_done() -> bool:
            loss = (sums.loss_sum - seen[0]) / max(1, sums.count - seen[1])
            seen[:] = [sums.loss_sum, sums.count]
            return test.record(loss)

        before = len(test.losses)
        try:
            train_one_epoch(model, parts, loader, device, epoch, normalize, sums, should_stop=update_done, failed=failed)
        except NonFiniteLoss:
            test.stop = "loss not finite"
        if len(test.losses) == before and test.stop is None:  # nothing trained in a whole pass
            test.stop = "no update made"
        epoch += 1
    report_skipped(failed, "images that failed to decode (left out of the range test)")
    return test.result()


def lr_find_figure(result: LrFindResult) -> Any:
    """lr_find.png: the loss and its smoothed curve against lr (log scale), the suggestions marked."""
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, color="0.7", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed")
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed)
    for lr, name, colour in ((result.steepest, "steepest", "C3"), (result.minimum_tenth, "minimum / 10", "C2")):
        if lr is not None:
            ax.axvline(lr, color=colour, linestyle="--", linewidth=1, label=f"{name}: {lr:.2g}")
            ax.plot([lr], [np.interp(np.log(lr), np.log(lrs), smoothed)], "o", color=colour)
    finite = smoothed[np.isfinite(smoothed)]
    if len(finite):  # up to where it is called diverged: the explosion would flatten the rest of the curve
        low, high = float(finite.min()), float(min(finite.max(), max(finite[0], DIVERGENCE * finite.min())))
        pad = 0.05 * (high - low) + 1e-6
        ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test ({len(result.lrs)} updates, {result.stop})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def train_command(args: Options, lr: float) -> str:
    """The main.py command line of the run the test was for (the flags given, less the test's own),
    with --lr `lr`."""
    words = [launch_command("main.py")]
    for key in sorted(k for k in args.get("explicit", ()) if k not in LR_FIND_OPTIONS):
        value = getattr(args, key)
        if value is True:
            words.append(f"--{key}")
        elif value is not False and value is not None:  # 0 is a value (--workers 0)
            values = value if isinstance(value, (list, tuple)) else [value]
            words += [f"--{key}", *(shlex.quote(str(v)) for v in values)]
    return " ".join([*words, "--lr", f"{lr:.3g}"])


def lr_find(args: Options, data: TrainData, device: torch.device) -> dict[str, Any]:
    """main.py --lr_find: the range test with the run's parts, its files, the suggestion printed.

    Args:
        args: the resolved options (as main.py's train() has them).
        data: the splits.
        device: where to train.

    Returns:
        {"lr_find": {"suggested_lr", "minimum_lr", "steps", "stop"}, "run": the folder}.
    """
    from utils.train.trainer import Trainer

    # the images are decoded as they come (a cache would decode the whole set for ~100 batches); no tracker run
    args = args.replace(cache_images="off", tracker="none")
    with claimed_run(args.save_path) as run:
        trainer = Trainer(args, data, run, device)
    if trainer.freezer is not None:  # the first epochs' training: the head alone
        trainer.freezer.start_epoch(0)
    parts = dataclasses.replace(trainer.step_parts, ema=None, after_step=None)  # the lr is the test's, no EMA
    test = RangeTest(trainer.optimizer, args.lr_find_start, args.lr_find_end, args.lr_find_steps)
    print(f"lr range test: {args.lr_find_steps} updates, lr {args.lr_find_start:g} -> {args.lr_find_end:g} "
          f"(exponential), {args.optimizer}, batch {args.batch_size}" + (f" x {args.accumulate}" if args.accumulate > 1 else ""),
          flush=True)
    result = run_range_test(trainer.train_model, parts, trainer.train_loader, device, trainer.normalize, trainer.new_sums,
                            test, trainer.train_sampler)
    write_results(run, result)
    trainer.log.close()  # TensorBoard
    suggested, minimum = result.steepest, result.minimum_tenth
    print(f"lr range test: {len(result.lrs)} updates ({result.stop}); {run / RunFolder.LR_FIND_PLOT}", flush=True)
    if suggested is None:
        print("lr range test: too few updates for a suggestion; raise --lr_find_steps or lower --lr_find_start",
              flush=True)
    else:
        print(f"suggested lr: {suggested:.3g} (steepest descent of the smoothed loss; the minimum / 10: {minimum:.3g})",
              flush=True)
        print(f"train with it: {train_command(args, suggested)}", flush=True)
    print(f"done: {run.path} (no weights saved)", flush=True)
    return {"lr_find": {"suggested_lr": suggested, "minimum_lr": minimum, "steps": len(result.lrs), "stop": result.stop},
            "run": str(run.path)}


def write_results(run: Any, result: LrFindResult) -> None:
    """lr_find.csv, lr_find.png and the TensorBoard curve (step: the update)."""
    run.write_csv(RunFolder.LR_FIND_CSV, ["step", "lr", "loss", "smoothed"],
                  [[i + 1, repr(lr), repr(loss), repr(smooth)]
                   for i, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed))])
    if result.lrs:
        run.savefig(lr_find_figure(result), RunFolder.LR_FIND_PLOT)
    tb = run.tensorboard()
    if tb is not None:
        for i, (lr, smooth) in enumerate(zip(result.lrs, result.smoothed)):
            tb.add_scalar("lr_find/smoothed_loss", smooth, i + 1)
            tb.add_scalar("lr_find/lr", lr, i + 1)
