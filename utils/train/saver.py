"""What a run keeps of its training: best.pt, last.pt, swa.pt, and when to stop for lack of progress.

    saver = CheckpointSaver(run, meta, options, metric="acc", patience=30)
    improved = saver.end_epoch(epoch + 1, val["acc"], model, {"train": train, "val": val})   # best.pt if better
    saver.save_last(state, background=True)                                                 # last.pt
    if saver.patience_exhausted: ...
    run.wait_saves()                                                                        # before best.pt is read back

The saver owns the direction of the metric (loss: lower is better; acc, mean_acc: higher), the
best value and its epoch, and the count of epochs since; it is itself a TrainState part, so a
resumed run continues the same count. With `background` (main.py's epochs), best.pt and last.pt are
snapshotted on the caller's thread and written by the run's checkpoint writer
(utils.core.checkpoint.CheckpointWriter) while the next epoch trains; best.pt's float16 copy is
made in the writer's thread too.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from utils.core.checkpoint import half_state_dict
from utils.core.run import Run, RunFolder
from utils.core.schema import Checkpoint, ModelMeta
from utils.train.state import TrainState

LOWER_IS_BETTER = ("loss",)


def halve_model(data: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict with its model's floating tensors in float16 (best.pt's size), the rest as it is."""
    return {**data, "model": {k: v.half() if v.is_floating_point() else v for k, v in data["model"].items()}}


class CheckpointSaver:
    """Chooses and writes the checkpoints of a run.

    Args:
        run: the run folder (writes happen on the main process only).
        meta: the model's description, written into every checkpoint.
        options: every option of the run (args.yaml), written into every checkpoint.
        metric: the validation metric that picks best.pt (loss, acc or mean_acc).
        patience: epochs without improvement before training stops (0 = never).
        weights: what best.pt holds: raw, or ema (the exponential moving average).
        background: end_epoch writes best.pt in the background (Run.save(..., background=True)).
    """

    def __init__(self, run: Run, meta: ModelMeta, options: dict[str, Any], metric: str, patience: int,
                 weights: str = "raw", background: bool = False) -> None:
        self.run = run
        self.background = background
        self.meta = meta
        self.options = options
        self.metric = metric
        self.patience = patience
        self.weights = weights
        self.best_value: float | None = None
        self.best_epoch = 0
        self.since = 0

    def is_better(self, value: float) -> bool:
        """Whether `value` beats the best so far (anything beats nothing)."""
        if self.best_value is None:
            return True
        return value < self.best_value if self.metric in LOWER_IS_BETTER else value > self.best_value

    def _checkpoint(self, kind: str, model: dict[str, Any], epoch: int, metrics: dict[str, Any], value: float | None,
                    weights: str, **extra: Any) -> Checkpoint:
        return Checkpoint(kind=kind, meta=self.meta, model=model, epoch=epoch, args=self.options,
                          metrics=metrics, best={"metric": self.metric, "value": value, "epoch": epoch}, weights=weights,
                          extra=extra)

    def end_epoch(self, epoch: int, value: float, model: nn.Module, metrics: dict[str, Any]) -> bool:
        """Score an epoch: a better value makes `model` best.pt; else one more epoch without progress.

        Args:
            epoch: epochs completed (1-based).
            value: the epoch's value of the metric.
            model: the weights that were scored (the EMA copy with --ema).
            metrics: {"train": {...}, "val": {...}} of the epoch.

        Returns:
            Whether it improved.
        """
        if not self.is_better(value):
            self.since += 1
            return False
        self.best_value, self.best_epoch, self.since = value, epoch, 0
        if self.background:  # the float32 weights are snapshotted; the writer's thread halves them
            ckpt = self._checkpoint("best", {k: v.detach() for k, v in model.state_dict().items()}, epoch, metrics, value,
                                    self.weights)
            self.run.save(RunFolder.BEST, ckpt, background=True, prepare=halve_model)
        else:
            self.run.save(RunFolder.BEST, self._checkpoint("best", half_state_dict(model), epoch, metrics, value, self.weights))
        return True

    @property
    def patience_exhausted(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    def save_last(self, state: TrainState, background: bool = False) -> None:
        """last.pt: the whole training state. Its model is the state's own float32 weights (the
        same tensors, so torch.save writes them once).

        Args:
            background: snapshot it now and write it in the run's checkpoint writer's thread.
        """
        train_state = state.state_dict()
        self.run.save(RunFolder.LAST, Checkpoint(kind="last", meta=self.meta, model=train_state["model"], epoch=state.epoch,
                                                 args=self.options, best=self.state_dict(), train_state=train_state),
                      background=background)

    def offer_swa(self, model: nn.Module, epoch: int, metrics: dict[str, Any], value: float | None, swa_epochs: int) -> bool:
        """swa.pt from the averaged weights; it also becomes best.pt when it beats the best epoch.

        Returns:
            Whether it became best.pt.
        """
        ckpt = self._checkpoint("swa", half_state_dict(model), epoch, metrics, value, "swa", swa_epochs=swa_epochs)
        self.run.save(RunFolder.SWA, ckpt)
        if value is None or not self.is_better(value):
            return False
        self.best_value, self.best_epoch = value, epoch
        ckpt.kind = "best"
        self.run.save(RunFolder.BEST, ckpt)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.best_value, "epoch": self.best_epoch, "since": self.since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch, self.since = state["value"], int(state["epoch"]), int(state["since"])
