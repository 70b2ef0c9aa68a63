"""One or more models of the same classes, predicted together: the one path metrice.py, predict.py
and the server share.

    ensemble = load_ensemble(["runs/exp", "runs/exp2"], method="vote")
    plan = ensemble.plan(tta=False)                       # the distinct input geometries
    probs, per_model = ensemble.predict(plan.inputs_for([img]))

Members with the same input geometry (resize, crop, resize mode, interpolation, channels) share
one decoded uint8 batch; each normalises it with its own mean/std. How several models combine is
lxztju/pytorch_classification's voting script: average the probabilities, weight them, or let
each model vote for its top-1 class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from utils.backends import load_backend, predict_probs, resolve_weights
from utils.checkpoint import load_checkpoint
from utils.data import image_transform
from utils.images import to_mode
from utils.log import UserError
from utils.names import ENSEMBLE_METHODS
from utils.schema import Checkpoint, ModelMeta, PreprocessSpec

LOGGER = logging.getLogger(__name__)



def check_same_classes(metas: Sequence[ModelMeta], names: Sequence[str]) -> list[str]:
    """The shared class list of several models, or a clear error naming the first mismatch.

    Args:
        metas: each model's ModelMeta.
        names: how each model is called in messages (its run folder).

    Returns:
        The class names.
    """
    first = list(metas[0].class_names)
    for meta, name in zip(metas[1:], names[1:]):
        if list(meta.class_names) != first:
            raise UserError(f"{name} was trained on other classes than {names[0]} "
                            f"({meta.num_classes} vs {len(first)} classes, or another order): "
                            "an ensemble needs the same classes in the same order")
    return first


def combine_probs(probs: Sequence[torch.Tensor], method: str = "mean", weights: Sequence[float] | None = None) -> torch.Tensor:
    """Ensemble probability rows (N, C) of several models into one (N, C).

    Args:
        probs: one (N, C) tensor of probabilities per model.
        method: mean (average), weighted (weighted average; weights normalised to sum 1), or
            vote (each model votes for its top-1 class; the result is the vote share, ties broken
            by the mean probability).
        weights: one weight per model, for weighted.

    Returns:
        (N, C) rows that sum to 1.
    """
    if method not in ENSEMBLE_METHODS:
        raise UserError(f"unknown ensemble method '{method}'; choose one of {', '.join(ENSEMBLE_METHODS)}")
    stacked = torch.stack([p.float() for p in probs])  # (M, N, C)
    if method == "mean":
        return stacked.mean(dim=0)
    if method == "weighted":
        if weights is None or len(weights) != len(probs):
            raise UserError(f"weighted ensemble needs one weight per model ({len(probs)}), got {0 if weights is None else len(weights)}")
        w = torch.tensor([float(x) for x in weights])
        if (w < 0).any() or w.sum() <= 0:
            raise UserError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}")
        return (stacked * (w / w.sum()).view(-1, 1, 1)).sum(dim=0)
    votes = torch.nn.functional.one_hot(stacked.argmax(dim=2), stacked.shape[2]).float().mean(dim=0)
    # a tiny share of the mean probability breaks ties without changing any clear majority
    tie_break = stacked.mean(dim=0) / (stacked.shape[0] + 1)
    share = votes + tie_break / stacked.shape[0]
    return share / share.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- input plan
class InputPlan:
    """The distinct input geometries of one or more models: models that share resize, crop,
    resize mode, interpolation and channels share one uint8 batch.

    Args:
        specs: each model's preprocessing.
        tta: TenCrop test-time augmentation.
    """

    def __init__(self, specs: Sequence[PreprocessSpec], tta: bool = False) -> None:
        geometries: list[tuple[Any, ...]] = []
        self.group_of: list[int] = []
        self.specs: list[PreprocessSpec] = []
        for spec in specs:
            if spec.geometry() not in geometries:
                geometries.append(spec.geometry())
                self.specs.append(spec)
            self.group_of.append(geometries.index(spec.geometry()))
        self.channels = [spec.channels for spec in self.specs]
        self.transforms = [image_transform(spec, tta) for spec in self.specs]

    def __len__(self) -> int:
        return len(self.transforms)

    def inputs(self, images: dict[int, Image.Image]) -> list[torch.Tensor]:
        """One loaded image per channel count (utils.images.load_image) -> one uint8 tensor per geometry."""
        return [t(images[c]) for t, c in zip(self.transforms, self.channels)]

    def batch(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """PIL images of any mode (EXIF orientation is the caller's) -> one uint8 batch per geometry."""
        per_image = [self.inputs({c: to_mode(img, c) for c in set(self.channels)}) for img in images]
        return [torch.stack([inp[g] for inp in per_image]) for g in range(len(self))]


# ---------------------------------------------------------------------------------- members
@dataclass
class Member:
    """One model of an ensemble: where it came from, the loaded backend, the preprocessing used
    (the model's own, or at another --image_size), and the checkpoint holding its metrics."""

    name: str
    backend: Any
    spec: PreprocessSpec
    checkpoint: Checkpoint | None

    def stored_accuracy(self) -> tuple[float | None, str]:
        """The accuracy stored with the weights ('val', or 'train' without a val split)."""
        return self.checkpoint.val_or_train_acc() if self.checkpoint is not None else (None, "")


def _metrics_checkpoint(path: Path, backend: Any) -> Checkpoint | None:
    """The checkpoint whose metrics describe a model: its own (torch), its run's best.pt (a run
    folder or an export inside one), or None."""
    if getattr(backend, "checkpoint", None) is not None:
        return backend.checkpoint
    source = (getattr(backend, "info", None) or {}).get("source") or {}
    for candidate in ([path / "best.pt"] if path.is_dir() else []) + ([Path(source["checkpoint"])] if source.get("checkpoint") else []):
        if candidate.is_file():
            try:
                return load_checkpoint(candidate)
            except UserError:
                return None
    return None


def resolve_weights_of(members: Sequence[Member], method: str, given: Sequence[float] | None) -> list[float] | None:
    """The weights of a weighted ensemble: `given` (one per model), else each model's stored
    validation accuracy (its training accuracy, with a warning, when the run had no val split).

    Raises:
        UserError: a model with no stored accuracy and no weights given.
    """
    if method != "weighted" or len(members) < 2:
        return None
    if given is not None:
        if len(given) != len(members):
            raise UserError(f"--ensemble_weights: {len(given)} weight(s) for {len(members)} model(s); give one per --save_path")
        return [float(w) for w in given]
    weights = []
    for m in members:
        acc, split = m.stored_accuracy()
        if acc is None:
            raise UserError(f"{m.name} stores no accuracy to weight it by: pass --ensemble_weights (one per --save_path)")
        if split == "train":
            LOGGER.warning("%s has no validation metrics: its weight is its training accuracy", m.name)
        weights.append(acc)
    return weights


class Ensemble:
    """Models of the same classes behind one predict call (a single model is an ensemble of one).

    Args:
        members: the models.
        method: mean, vote or weighted (see combine_probs).
        weights: one weight per member for weighted (see resolve_weights_of).
    """

    def __init__(self, members: Sequence[Member], method: str = "mean", weights: Sequence[float] | None = None) -> None:
        if method not in ENSEMBLE_METHODS:
            raise UserError(f"unknown ensemble method '{method}'; choose one of {', '.join(ENSEMBLE_METHODS)}")
        self.members = list(members)
        self.class_names = check_same_classes([m.backend.meta for m in self.members], [m.name for m in self.members])
        self.method = method
        self.weights = list(weights) if weights is not None else None

    @property
    def meta(self) -> ModelMeta:
        """The first member's description (the classes are everyone's)."""
        return self.members[0].backend.meta

    def __len__(self) -> int:
        return len(self.members)

    def plan(self, tta: bool = False) -> InputPlan:
        """The input geometries of the members."""
        return InputPlan([m.spec for m in self.members], tta)

    def predict(self, inputs: Sequence[torch.Tensor], plan: InputPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Probabilities of uint8 batches, one per geometry of `plan`.

        Returns:
            (the combined (N, C) probabilities, each member's (N, C) probabilities).
        """
        probs = [predict_probs(m.backend, inputs[g]) for m, g in zip(self.members, plan.group_of)]
        combined = probs[0] if len(probs) == 1 else combine_probs(probs, self.method, self.weights)
        return combined, probs

    def describe(self) -> str:
        """'ensemble of 2 models (weighted, weights 0.9, 0.8)', or '' for a single model."""
        if len(self) == 1:
            return ""
        weights = f", weights {', '.join(f'{w:.4g}' for w in self.weights)}" if self.weights else ""
        return f"ensemble of {len(self)} models ({self.method}{weights})"


def load_ensemble(paths: Sequence[str | Path], model_type: str = "torch", device: torch.device | str = "cpu",
                  half: bool = False, method: str = "mean", weights: Sequence[float] | None = None,
                  image_size: int | None = None) -> Ensemble:
    """Load one or more models (run folders or model files) as an Ensemble.

    Args:
        paths: run folders or model files, of the same classes.
        model_type: the format of every model (utils.backends.MODEL_TYPES).
        device: where to run.
        half: float16 inference (CUDA only).
        method: mean, vote or weighted.
        weights: weights for weighted (default: each model's stored accuracy).
        image_size: evaluate at this input size instead of each model's own.

    Returns:
        The Ensemble.
    """
    if len({str(Path(p)) for p in paths}) != len(paths):
        raise UserError(f"--save_path names a model twice: {' '.join(map(str, paths))}")
    members = []
    for path in paths:
        path = Path(path)
        resolve_weights(path, model_type)  # a clear error for a missing file before any model loads
        backend = load_backend(path, model_type, device, half)
        spec = backend.meta.preprocess.with_size(image_size) if image_size else backend.meta.preprocess
        checkpoint = _metrics_checkpoint(path, backend)
        if checkpoint is not None and list(checkpoint.meta.class_names) != list(backend.meta.class_names):
            raise UserError(f"the {model_type} model of {path} has other classes than its run's best.pt: export it again")
        members.append(Member(str(path), backend, spec, checkpoint))
    check_same_classes([m.backend.meta for m in members], [m.name for m in members])
    return Ensemble(members, method, resolve_weights_of(members, method, weights))
