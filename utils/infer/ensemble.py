"""One or more models of the same classes, predicted together: the one path metrice.py, predict.py
and the server share.

    ensemble = load_ensemble(["runs/exp", "runs/exp2"], method="vote")
    plan = ensemble.plan(tta=False)                       # the distinct input geometries
    probs, per_model = ensemble.predict(plan.batch([img]), plan)     # numpy (N, C) and one per model

Members with the same input geometry (resize, crop, resize mode, interpolation, channels) share
one decoded uint8 batch (numpy, utils.data.transforms_np); each normalises it with its own mean/std.
How several models combine is lxztju/pytorch_classification's voting script: average the
probabilities, weight them, or let each model vote for its top-1 class. No torch import here:
with onnx / openvino models the whole path runs without PyTorch.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from PIL import Image

from utils.core.config import finite_float
from utils.core.log import UserError
from utils.core.names import ENSEMBLE_METHODS
from utils.core.run import RunFolder
from utils.core.schema import ModelMeta, PreprocessSpec
from utils.data.decode import to_mode
from utils.data.imageset import read_label_file
from utils.data.transforms_np import image_transform
from utils.deploy.runtime import input_mismatch
from utils.infer.backends import kfold_members, load_backend, model_type_of, predict_probs, resolve_weights

LOGGER = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ flags
def add_ensemble_flags(parser: argparse.ArgumentParser) -> None:
    """--ensemble and --ensemble_weights, as metrice.py and predict.py both take them.

    Args:
        parser: the script's parser.
    """
    # --ensemble defaults to None, not mean: ensemble_method() must tell "not given" (weights alone
    # then mean weighted) from an explicit method that the weights contradict.
    parser.add_argument("--ensemble", default=None, choices=list(ENSEMBLE_METHODS),
                        help="how several models are combined: mean of the probabilities (the default; weighted when "
                             "--ensemble_weights are given), vote (each model's top-1; ties broken by the mean), or weighted")
    parser.add_argument("--ensemble_weights", type=finite_float, nargs="+", default=None,
                        help="one weight per model, for weighted (none given: each run's best validation accuracy)")


def check_weight_count(weights: Sequence[float], models: int) -> None:
    """Refuse weights that are not one per model.

    Args:
        weights: --ensemble_weights.
        models: how many models they weight.

    Raises:
        UserError: another count.
    """
    if len(weights) != models:
        raise UserError(f"--ensemble_weights: {len(weights)} weight(s) for {models} model(s); give one per --save_path")


def ensemble_method(method: str | None, weights: Sequence[float] | None, models: int) -> str:
    """The method of the flags of add_ensemble_flags, checked.

    Args:
        method: --ensemble (None when not given).
        weights: --ensemble_weights (None when not given).
        models: how many models were given (--save_path / --weight).

    Returns:
        The method: the one given, else weighted when weights are given, else mean.

    Raises:
        UserError: weights with another method, or not one weight per model.
    """
    if weights is None:
        return method or "mean"
    if method not in (None, "weighted"):
        raise UserError(f"--ensemble_weights go with --ensemble weighted, not --ensemble {method}")
    check_weight_count(weights, models)
    return "weighted"


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


def combine_probs(probs: Sequence[Any], method: str = "mean", weights: Sequence[float] | None = None) -> np.ndarray:
    """Ensemble probability rows (N, C) of several models into one float32 (N, C) array.

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
    stacked = np.stack([np.asarray(p, dtype=np.float32) for p in probs])  # (M, N, C)
    if method == "mean":
        return stacked.mean(axis=0)
    if method == "weighted":
        if weights is None or len(weights) != len(probs):
            raise UserError(f"weighted ensemble needs one weight per model ({len(probs)}), got {0 if weights is None else len(weights)}")
        w = np.array([float(x) for x in weights], dtype=np.float32)
        if (w < 0).any() or w.sum() <= 0:
            raise UserError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}")
        return (stacked * (w / w.sum()).reshape(-1, 1, 1)).sum(axis=0)
    num_classes = stacked.shape[2]
    votes = np.eye(num_classes, dtype=np.float32)[stacked.argmax(axis=2)].mean(axis=0)
    # a tiny share of the mean probability breaks ties without changing any clear majority
    tie_break = stacked.mean(axis=0) / (stacked.shape[0] + 1)
    share = votes + tie_break / stacked.shape[0]
    return share / share.sum(axis=1, keepdims=True)


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

    def inputs(self, images: dict[int, Image.Image]) -> list[np.ndarray]:
        """One loaded image per channel count (utils.data.decode.load_image) -> one uint8 array per geometry."""
        return [t(images[c]) for t, c in zip(self.transforms, self.channels)]

    def batch(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """PIL images of any mode (EXIF orientation is the caller's) -> one uint8 batch per geometry."""
        per_image = [self.inputs({c: to_mode(img, c) for c in set(self.channels)}) for img in images]
        return [np.stack([inp[g] for inp in per_image]) for g in range(len(self))]


# ---------------------------------------------------------------------------------- members
@dataclass
class Member:
    """One model of an ensemble: where it came from, the loaded backend, the preprocessing used
    (the model's own, or at another --image_size), and what its run recorded: the run's options
    (args.yaml: data paths, batch size) and the metrics stored with its weights."""

    name: str
    backend: Any
    spec: PreprocessSpec
    run_args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def stored_accuracy(self) -> tuple[float | None, str]:
        """The accuracy stored with the weights ('val', or 'train' without a val split)."""
        for split in ("val", "train"):
            acc = (self.metrics.get(split) or {}).get("acc")
            if acc is not None:
                return float(acc), split
        return None, ""


def run_folder_of(path: Path, backend: Any) -> Path | None:
    """The run folder a model comes from: the folder itself, the folder of the checkpoint an
    export was made from (its metadata's source), or the run around an export/ folder."""
    if path.is_dir():
        return path
    source = (getattr(backend, "info", None) or {}).get("source") or {}
    candidates = [Path(source["checkpoint"]).parent] if source.get("checkpoint") else []
    candidates += [path.parent, path.parent.parent] if path.parent.name == "export" else [path.parent]
    return next((c for c in candidates if RunFolder(c).args_file.is_file()), None)


def run_record(path: Path, backend: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's options, the metrics stored with the weights) of a model, without torch for an
    exported one: a checkpoint carries both; an export carries its checkpoint's metrics (source)
    and its run folder the options (args.yaml).

    Raises:
        UserError: an export whose classes differ from its run's (label.txt): it is stale.
    """
    ckpt = getattr(backend, "checkpoint", None)
    if ckpt is not None:
        return dict(ckpt.args), dict(ckpt.metrics)
    metrics = dict(((getattr(backend, "info", None) or {}).get("source") or {}).get("metrics") or {})
    run = run_folder_of(path, backend)
    if run is None:
        return {}, metrics
    try:
        args = yaml.safe_load(RunFolder(run).args_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        args = {}
    labels = RunFolder(run).labels_file
    if labels.is_file() and read_label_file(labels) != list(backend.meta.class_names):
        raise UserError(f"the {backend.model_type} model of {path} has other classes than its run {run} (label.txt): "
                        "export it again")
    return (args if isinstance(args, dict) else {}), metrics


def resolve_weights_of(members: Sequence[Member], method: str, given: Sequence[float] | None) -> list[float] | None:
    """The weights of a weighted ensemble: `given` (one per model), else each model's stored
    validation accuracy (its training accuracy, with a warning, when the run had no val split).

    Raises:
        UserError: a model with no stored accuracy and no weights given.
    """
    if method != "weighted" or len(members) < 2:
        return None
    if given is not None:
        check_weight_count(given, len(members))
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
        tasks = {m.backend.meta.task for m in self.members}
        if len(tasks) > 1:
            raise UserError("an ensemble needs models of one kind: multiclass and multilabel models were given")
        if method == "vote" and "multilabel" in tasks:
            raise UserError("--ensemble vote picks one class per model: for multilabel models use mean or weighted")
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

    def predict(self, inputs: Sequence[np.ndarray], plan: InputPlan) -> tuple[np.ndarray, list[np.ndarray]]:
        """Probabilities of uint8 batches, one per geometry of `plan`.

        Returns:
            (the combined float32 (N, C) probabilities, each member's (N, C) probabilities).
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


def load_ensemble(paths: Sequence[str | Path], model_type: str | None = "torch", device: Any = "cpu",
                  half: bool = False, method: str = "mean", weights: Sequence[float] | None = None,
                  image_size: int | None = None) -> Ensemble:
    """Load one or more models (run folders or model files) as an Ensemble.

    Args:
        paths: run folders or model files, of the same classes; a main.py --kfold run folder stands for
            its K folds (utils.infer.backends.kfold_members).
        model_type: the format of every model (utils.infer.backends.MODEL_TYPES); None: each path's
            own (utils.infer.backends.model_type_of: a file's suffix, torch for a run folder).
        device: where to run.
        half: float16 inference (CUDA only).
        method: mean, vote or weighted.
        weights: weights for weighted (default: each model's stored accuracy).
        image_size: evaluate at this input size instead of each model's own.

    Returns:
        The Ensemble.
    """
    paths = kfold_members(paths)
    if len({str(Path(p)) for p in paths}) != len(paths):
        raise UserError(f"--save_path names a model twice: {' '.join(map(str, paths))}")
    types = [model_type or model_type_of(p) for p in paths]
    for path, kind in zip(paths, types):
        resolve_weights(path, kind)  # a clear error for a missing file before any model loads
    members = []
    for path, kind in zip(map(Path, paths), types):
        backend = load_backend(path, kind, device, half)
        spec = backend.meta.preprocess.with_size(image_size) if image_size else backend.meta.preprocess
        problem = input_mismatch(spec, getattr(backend, "input_shape", None)) if image_size else None
        if problem:
            raise UserError(f"--image_size {image_size} does not fit {path}: {problem}; drop --image_size (an exported "
                            "model keeps the size it was exported at)")
        run_args, metrics = run_record(path, backend)
        members.append(Member(str(path), backend, spec, run_args, metrics))
    check_same_classes([m.backend.meta for m in members], [m.name for m in members])
    return Ensemble(members, method, resolve_weights_of(members, method, weights))


# ------------------------------------------------------------------------------- inputs
def predict_pil(ensemble: Ensemble, images: Sequence[Image.Image], tta: bool = False) -> np.ndarray:
    """Probabilities of PIL images of any mode (EXIF orientation is the caller's: see
    utils.data.decode.load_image). The one call a server needs.

    Returns:
        float32 numpy (N, num_classes), rows summing to 1 (the ensemble's combination for several models).
    """
    plan = ensemble.plan(tta)
    return ensemble.predict(plan.batch(images), plan)[0]
