"""What a model's outputs mean: one object per task type, owning everything that follows from it.

    task = task_type("multilabel")              # or meta.task_type for a trained model
    target = task.encode([3, 1])                # how a sample's labels are stored: 1 / (1, 3)
    task.target_array(targets, num_classes)     # class indices (N,) or multi-hot rows (N, C)
    task.loss(None), task.metric(None)          # the defaults: CrossEntropyLoss / acc, BCEWithLogitsLoss / map
    probs = task.probabilities(logits)          # softmax / a sigmoid per class (numpy or torch)
    present = task.decide(probs, thresholds)    # which classes each image is given

multiclass: one class per image, a softmax over the classes; multilabel: any number of classes per
image, a sigmoid per class, each present when its probability reaches its threshold (tuned on the
validation split). The loss family and the metrics that pick best.pt belong to the task: a loss or
a metric of the other task is refused in one line. Prediction rows (utils.infer.rows) ask the task
what an image was given and how uncertain it is. numpy is imported where it is used (torch tensors
are handled when given), so the checkpoint schema reads the task types without either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from utils.core.log import UserError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class TaskType:
    """One task type.

    Attributes:
        name: multiclass or multilabel (what checkpoints and exports store as `task`).
        losses: the losses that fit it (--loss); the first is the default.
        metrics: the validation metrics that may pick best.pt (--metrice); the first is the default.
        log_metrics: train.log's two metric columns.
        summary: what it means, for messages and --help.
    """

    name: str
    losses: tuple[str, ...]
    metrics: tuple[str, ...]
    log_metrics: tuple[str, str]
    summary: str

    @property
    def multilabel(self) -> bool:
        return self.name == "multilabel"

    # ---------------------------------------------------------------------------- targets
    def encode(self, labels: Sequence[int]) -> Any:
        """A sample's target as an ImageSet stores it: a class index, or the sorted tuple of class indices.

        Raises:
            UserError: several labels for a multiclass sample.
        """
        if self.multilabel:
            return tuple(sorted(set(int(c) for c in labels)))
        if len(labels) != 1:
            raise UserError(f"a multiclass image has exactly one class, not {len(labels)}")
        return int(labels[0])

    def labels(self, target: Any) -> tuple[int, ...]:
        """The class indices of a stored target."""
        return tuple(target) if self.multilabel else (int(target),)

    def target_array(self, targets: Sequence[Any], num_classes: int) -> np.ndarray:
        """Stored targets as scores take them: class indices (N,), or multi-hot rows (N, C) of bool."""
        import numpy as np

        if not self.multilabel:
            return np.array(targets, dtype=np.int64)
        hot = np.zeros((len(targets), num_classes), dtype=bool)
        for row, labels in enumerate(targets):
            hot[row, list(labels)] = True
        return hot

    def class_counts(self, targets: Sequence[Any], num_classes: int) -> np.ndarray:
        """Images per class (multilabel: images carrying each label)."""
        import numpy as np

        counts = np.zeros(num_classes, dtype=np.int64)
        for target in targets:
            counts[list(self.labels(target))] += 1
        return counts

    # ---------------------------------------------------------------------------- options
    def loss(self, name: str | None) -> str:
        """The --loss of a run of this task: `name`, or the task's default when None.

        Raises:
            UserError: a loss of the other task.
        """
        return self._choose("loss", name, self.losses)

    def metric(self, name: str | None) -> str:
        """The --metrice of a run of this task: `name`, or the task's default when None.

        Raises:
            UserError: a metric the task does not compute.
        """
        return self._choose("metrice", name, self.metrics)

    def _choose(self, flag: str, name: str | None, allowed: tuple[str, ...]) -> str:
        if name is None:
            return allowed[0]
        if name not in allowed:
            owners = [t.name for t in TASK_TYPES.values() if name in (t.losses if flag == "loss" else t.metrics)]
            whose = f" (it is for {' and '.join(owners)} runs: --task_type {owners[0]})" if owners else ""
            raise UserError(f"--{flag} {name} does not fit a {self.name} task ({self.summary}){whose}; choose one of "
                            f"{', '.join(allowed)}")
        return name

    # ---------------------------------------------------------------------------- outputs
    def probabilities(self, logits: Any, temperature: Sequence[float] | None = None) -> Any:
        """Logits (N, C) -> probabilities: a softmax over the classes, or a sigmoid per class.
        numpy in, float32 numpy out; a torch tensor in, a float tensor out.

        Args:
            logits: the model's outputs.
            temperature: the calibration temperature (utils.infer.calibration; ModelMeta.temperature):
                the logits are divided by it first. One value for a multiclass model, one per class for
                a multilabel one; None = 1 (uncalibrated).
        """
        import numpy as np

        if hasattr(logits, "softmax"):  # a torch tensor
            x = logits.float()
            if temperature is not None:
                x = x / x.new_tensor(list(temperature))
            return x.sigmoid() if self.multilabel else x.softmax(dim=1)
        x = np.asarray(logits, dtype=np.float32)
        if temperature is not None:
            x = x / np.asarray(temperature, dtype=np.float32)
        if self.multilabel:
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        x = x - x.max(axis=1, keepdims=True)
        e = np.exp(x)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def as_logits(self, probs: Any) -> Any:
        """Probabilities (a torch tensor) back to logits, for averaged TenCrop probabilities: log p for a
        softmax (softmax(log p) == p), the logit of each sigmoid."""
        return probs.clamp(1e-6, 1 - 1e-6).logit() if self.multilabel else probs.clamp_min(1e-12).log()

    def thresholds(self, num_classes: int, tuned: Sequence[float] | None = None) -> np.ndarray | None:
        """The decision threshold of each class: the tuned ones, else 0.5 (None for multiclass, which
        gives each image its most probable class)."""
        import numpy as np

        if not self.multilabel:
            return None
        return np.asarray(tuned if tuned is not None else (0.5,) * num_classes, dtype=np.float32)

    def decide(self, probs: Any, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """Which classes each image is given, (N, C) bool: its most probable class, or every class at
        or above its threshold."""
        import numpy as np

        probs = np.asarray(probs, dtype=np.float32)
        if self.multilabel:
            return probs >= self.thresholds(probs.shape[1], thresholds)
        out = np.zeros(probs.shape, dtype=bool)
        out[np.arange(len(probs)), probs.argmax(axis=1)] = True
        return out

    def uncertainty(self, probs: Any) -> np.ndarray:
        """Each row's entropy in nats: of the softmax (0 = certain, log C = uniform), or the mean of
        the classes' binary entropies."""
        import numpy as np

        p = np.asarray(probs, dtype=np.float64)
        if self.multilabel:
            p = np.clip(p, 1e-12, 1 - 1e-12)
            return (-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean(axis=1).astype(np.float32)
        p = np.clip(p, 0, None)
        return (-(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)).astype(np.float32)


MULTICLASS = TaskType("multiclass", losses=("CrossEntropyLoss", "FocalLoss", "PolyLoss"),
                      metrics=("acc", "mean_acc", "balanced_acc", "f1", "loss"), log_metrics=("acc", "mean_acc"),
                      summary="one class per image, a softmax over the classes")
MULTILABEL = TaskType("multilabel", losses=("BCEWithLogitsLoss", "AsymmetricLoss"), metrics=("map", "f1", "loss"),
                      log_metrics=("map", "f1"), summary="any number of classes per image, a sigmoid per class")
TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (MULTICLASS, MULTILABEL)}
# every --loss and --metrice, in a stable order (the parsers' choices)
ALL_LOSSES = tuple(dict.fromkeys(n for t in TASK_TYPES.values() for n in t.losses))
ALL_METRICS = tuple(dict.fromkeys(n for t in TASK_TYPES.values() for n in t.metrics))


def task_type(name: str) -> TaskType:
    """The task type of a name (a checkpoint's `task`, --task_type).

    Raises:
        UserError: an unknown name.
    """
    if name not in TASK_TYPES:
        raise UserError(f"unknown task type '{name}'; choose one of {', '.join(TASK_TYPES)}")
    return TASK_TYPES[name]
