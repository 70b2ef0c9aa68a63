"""The checkpoint schema: what a trained model says about itself, as typed, versioned data.

    meta = ModelMeta.from_dict(torch.load("runs/exp/best.pt", weights_only=True))
    meta.class_names, meta.preprocess.crop, meta.preprocess.mean

Three dataclasses, each with `to_dict` (plain, JSON/YAML-able values) and `from_dict` (checks
every field and raises one clear UserError naming the file and the field):
- PreprocessSpec: the test-time preprocessing (resize, crop, resize mode, interpolation,
  channels, mean, std). Training, evaluation, prediction, export and deployment all read it here.
- ModelMeta: the model (architecture name, class names, task) and its PreprocessSpec. Every
  checkpoint and every exported file carries one.
- Checkpoint: a best.pt / last.pt / swa.pt file -- ModelMeta plus the weights, the epoch, the
  metrics, the options of the run, and for last.pt the whole training state.

This module imports neither torch nor numpy, so a deployment machine can read exported metadata
without them. docs/architecture.md shows the on-disk layout. Version 1 files (format tag
"pytorch-classifier-ng/1", written before this schema existed) still load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from utils.core.log import UserError
from utils.core.task import TASK_TYPES, TaskType

FORMAT = "pytorch-classifier-ng"
VERSION = 3  # 3: ModelMeta.temperature and ModelMeta.ood (a version 2 file loads uncalibrated, without them)
LEGACY_FORMATS = {"pytorch-classifier-ng/1": 1}  # the old one-string tag -> its version

RESIZE_MODES = ("crop", "letterbox", "squash")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CHECKPOINT_KINDS = ("best", "last", "swa")
# The out-of-distribution scores (utils.infer.ood), each oriented so that higher = further from the
# training images: 1 - the maximum softmax probability, the energy -logsumexp(logits) (Liu et al.,
# NeurIPS 2020), and the Mahalanobis distance of the penultimate features to the nearest class mean
# (Lee et al., NeurIPS 2018; PyTorch checkpoints only: exported graphs give the logits).
OOD_SCORES = ("msp", "energy", "mahalanobis")
LOGIT_OOD_SCORES = ("msp", "energy")  # computed from the logits alone: every format can compute them
# The two numbers of the preprocessing that are not in a PreprocessSpec: both transforms
# (utils.data.transforms, utils.data.transforms_np) read them here, at call time; the C++ side
# (deploy/cpp/preprocess.cpp kLetterboxFill) repeats the fill, and tests/test_deploy.py compares them.
LETTERBOX_FILL = 114  # grey borders, as YOLO-style letterboxing uses
TTA_SCALE = 1.1  # pytorch-classifier resizes to crop * 1.1 before TenCrop (--test_tta), as training does before its random crop
# The largest resize and crop a model may ask for (main.py --image_size, metrice.py --image_size, the metadata of
# every checkpoint and exported file): one image of it is 48 MiB as RGB uint8 and 192 MiB as float32, so a batch of
# 64 needs about 12 GiB. Larger values come from a damaged or edited file, never from a model of this toolkit.
MAX_IMAGE_SIZE = 4096


def scaled_resize(crop: int) -> int:
    """The resize before TenCrop (and before training's random crop) for a crop size.

    Args:
        crop: the model's input size in pixels.

    Returns:
        int(crop * TTA_SCALE), e.g. 246 for 224.
    """
    return int(crop * TTA_SCALE)


def _field(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise UserError(f"{where} lacks '{key}': it is not a complete checkpoint or export of this toolkit "
                        "(write it again with main.py / export.py)")
    return data[key]


def _int(data: Mapping[str, Any], key: str, where: str, low: int = 1, high: int | None = None) -> int:
    value = _field(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise UserError(f"{where}: '{key}' must be an integer {bounds}, not {value!r}"
                        + (" (a damaged or edited file: write it again with main.py / export.py)" if high is not None else ""))
    return value


def _floats(data: Mapping[str, Any], key: str, where: str, length: int, positive: bool = False) -> tuple[float, ...]:
    value = _field(data, key, where)
    ok = isinstance(value, (list, tuple)) and len(value) == length and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)
    if not ok:
        raise UserError(f"{where}: '{key}' must be {length} finite{' positive' if positive else ''} number(s), not {value!r}")
    return tuple(float(v) for v in value)


def _choice(data: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = data.get(key, default) if default is not None else _field(data, key, where)
    if value not in choices:
        raise UserError(f"{where}: '{key}' is {value!r}; expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class PreprocessSpec:
    """The test-time preprocessing of a model.

    resize and crop lie in [1, MAX_IMAGE_SIZE]; channels is 1 or 3 (from_dict checks them).

    Geometry by resize_mode -- crop: short side to `resize`, centre crop `crop`; letterbox: long
    side to `resize`, pad to a square, centre crop; squash: resize to resize x resize ignoring the
    aspect ratio, centre crop. Then pixels / 255, minus mean, divided by std (per channel).

    Args:
        resize: the resize target in pixels.
        crop: the model's input size in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
        resize_mode: crop, letterbox or squash.
        interpolation: bilinear, bicubic or nearest.
    """

    resize: int
    crop: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"
    interpolation: str = "bilinear"

    @classmethod
    def create(cls, image_size: int, channels: int, mean: Any, std: Any, resize_mode: str = "crop",
               interpolation: str = "bilinear") -> "PreprocessSpec":
        """The spec of a model trained at `image_size` (resize = crop = image_size), validated."""
        return cls.from_dict({"resize": int(image_size), "crop": int(image_size), "channels": int(channels),
                              "mean": list(mean), "std": list(std), "resize_mode": resize_mode,
                              "interpolation": interpolation}, "preprocessing")

    def geometry(self) -> tuple[int, int, str, str, int]:
        """What decides the pixels a model gets (mean/std are applied by each backend): models
        with the same geometry can share one decoded batch."""
        return self.resize, self.crop, self.resize_mode, self.interpolation, self.channels

    def with_size(self, image_size: int) -> "PreprocessSpec":
        """The same preprocessing at another input size."""
        return replace(self, resize=int(image_size), crop=int(image_size))

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "resize_mode": self.resize_mode,
                "interpolation": self.interpolation, "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "preprocessing") -> "PreprocessSpec":
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: the preprocessing spec must be a mapping, not {type(data).__name__}")
        channels = _int(data, "channels", where)
        if channels not in (1, 3):
            raise UserError(f"{where}: 'channels' must be 1 or 3, not {channels}")
        return cls(resize=_int(data, "resize", where, high=MAX_IMAGE_SIZE), crop=_int(data, "crop", where, high=MAX_IMAGE_SIZE),
                   channels=channels,
                   mean=_floats(data, "mean", where, channels), std=_floats(data, "std", where, channels, positive=True),
                   resize_mode=_choice(data, "resize_mode", where, RESIZE_MODES, default="crop"),
                   interpolation=_choice(data, "interpolation", where, INTERPOLATIONS, default="bilinear"))


@dataclass(frozen=True)
class OodSpec:
    """How a model says "unknown": which out-of-distribution score it uses and where each score's
    threshold lies (an image whose score is above it is unknown).

    Args:
        score: the score --reject uses by default (one of OOD_SCORES).
        tpr: the share of the validation split's images each threshold keeps as known (--reject_tpr).
        thresholds: {score name: threshold} for every score fitted (at least `score`).
    """

    score: str
    tpr: float
    thresholds: tuple[tuple[str, float], ...]

    def threshold(self, score: str) -> float | None:
        """The threshold of a score, None when it was not fitted."""
        return dict(self.thresholds).get(score)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "tpr": self.tpr, "thresholds": dict(self.thresholds)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "model metadata (ood)") -> "OodSpec":
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: must be a mapping, not {type(data).__name__}")
        score = _choice(data, "score", where, OOD_SCORES)
        tpr = data.get("tpr")
        if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
            raise UserError(f"{where}: 'tpr' must be a share in (0, 1], not {tpr!r}")
        thresholds = _field(data, "thresholds", where)
        if (not isinstance(thresholds, Mapping) or score not in thresholds or any(k not in OOD_SCORES for k in thresholds)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in thresholds.values())):
            raise UserError(f"{where}: 'thresholds' must map scores of {', '.join(OOD_SCORES)} (with {score!r}) to "
                            f"finite numbers, not {thresholds!r}")
        return cls(score=score, tpr=float(tpr), thresholds=tuple((k, float(thresholds[k])) for k in OOD_SCORES
                                                                  if k in thresholds))


@dataclass(frozen=True)
class ModelMeta:
    """A model's description: what it is, what it predicts, what input it takes.

    Args:
        model_name: the --model_name it was built from (utils.models.registry.create_model).
        class_names: the class names in output order.
        preprocess: its test-time preprocessing.
        task: what its outputs mean (utils.core.task: `task_type` is the object) -- multiclass: one
            softmax over the classes; multilabel: a sigmoid per class, each label present when its
            probability reaches its threshold.
        thresholds: multilabel only: one decision threshold per class (tuned on the validation
            split for the best F1; 0.5 each until then).
        temperature: the calibration temperature the logits are divided by before the softmax (one
            value) or the sigmoids (one per class), fitted on the validation split
            (utils.infer.calibration); None = uncalibrated (1).
        ood: how the model rejects images of no trained class (OodSpec), None when not fitted.
    """

    model_name: str
    class_names: tuple[str, ...]
    preprocess: PreprocessSpec
    task: str = "multiclass"
    thresholds: tuple[float, ...] | None = None
    temperature: tuple[float, ...] | None = None
    ood: OodSpec | None = None

    def probabilities(self, logits: Any) -> Any:
        """The model's (calibrated) class probabilities of its logits (numpy or torch)."""
        return self.task_type.probabilities(logits, self.temperature)

    @property
    def task_type(self) -> TaskType:
        """The object of the task (how outputs become probabilities, decisions and rows)."""
        return TASK_TYPES[self.task]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.preprocess.crop

    @property
    def image_channel(self) -> int:
        return self.preprocess.channels

    def to_dict(self) -> dict[str, Any]:
        """Flat keys (model_name, num_classes, class_names, image_size, image_channel, mean, std,
        preprocess, task): what every checkpoint and exported file carries at its top level."""
        spec = self.preprocess
        out = {"model_name": self.model_name, "task": self.task, "num_classes": self.num_classes,
               "class_names": list(self.class_names), "image_size": spec.crop, "image_channel": spec.channels,
               "mean": list(spec.mean), "std": list(spec.std), "preprocess": spec.to_dict()}
        if self.thresholds is not None:
            out["thresholds"] = list(self.thresholds)
        if self.temperature is not None:
            out["temperature"] = list(self.temperature)
        if self.ood is not None:
            out["ood"] = self.ood.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "model metadata") -> "ModelMeta":
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: the model metadata must be a mapping, not {type(data).__name__}")
        name = _field(data, "model_name", where)
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: 'model_name' must be a non-empty string, not {name!r}")
        classes = _field(data, "class_names", where)
        if not isinstance(classes, (list, tuple)) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{where}: 'class_names' must list at least two class names, not {classes!r}")
        if len(set(classes)) != len(classes):
            raise UserError(f"{where}: 'class_names' lists a class twice")
        if "num_classes" in data and data["num_classes"] != len(classes):
            raise UserError(f"{where}: 'num_classes' is {data['num_classes']} but 'class_names' lists {len(classes)}")
        spec = PreprocessSpec.from_dict(_field(data, "preprocess", where), f"{where} (preprocess)")
        task = _choice(data, "task", where, tuple(TASK_TYPES), default="multiclass")
        thresholds = None
        if data.get("thresholds") is not None:
            if task != "multilabel":
                raise UserError(f"{where}: 'thresholds' belong to a multilabel model, not a {task} one")
            values = _floats(data, "thresholds", where, len(classes))
            if not all(0.0 <= v <= 1.0 for v in values):
                raise UserError(f"{where}: 'thresholds' must lie in [0, 1]")
            thresholds = values
        temperature = None
        if data.get("temperature") is not None:
            temperature = _floats(data, "temperature", where, len(classes) if task == "multilabel" else 1, positive=True)
        ood = OodSpec.from_dict(data["ood"], f"{where} (ood)") if data.get("ood") is not None else None
        return cls(model_name=name, class_names=tuple(classes), preprocess=spec, task=task, thresholds=thresholds,
                   temperature=temperature, ood=ood)


def format_version(data: Any) -> int | None:
    """The schema version of a loaded file, or None when it is not a file of this toolkit."""
    if not isinstance(data, Mapping):
        return None
    tag = data.get("format")
    if tag in LEGACY_FORMATS:
        return LEGACY_FORMATS[tag]
    if tag == FORMAT and isinstance(data.get("version"), int):
        return data["version"]
    return None


# Keys of a version 1 last.pt that now live in Checkpoint.train_state.
_V1_TRAIN_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "swa", "distill", "rng", "epoch", "step",
                        "train_sums", "train_extra", "best")


@dataclass
class Checkpoint:
    """A checkpoint file of this toolkit (best.pt, last.pt, swa.pt).

    Args:
        kind: best (the weights that scored best), last (everything to resume), swa (averaged weights).
        meta: the model's description.
        model: the state_dict (float16 in best.pt/swa.pt, float32 in last.pt).
        epoch: epochs trained when it was written.
        args: every option of the run (args.yaml).
        metrics: {"train": {...}, "val": {...}} of the epoch it was written at (best/swa).
        best: {"metric", "value", "epoch"} -- the validation metric that chose it.
        weights: raw, ema (the exponential moving average) or swa (stochastic weight average).
        train_state: last.pt only: TrainState.state_dict() (optimizer, scheduler, RNG, position ...).
        extra: anything else a writer adds (e.g. swa_epochs).
        version: the schema version it was written with.
    """

    kind: str
    meta: ModelMeta
    model: dict[str, Any]
    epoch: int = 0
    args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    weights: str = "raw"
    train_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, "kind": self.kind, **self.meta.to_dict(), "model": self.model,
               "epoch": int(self.epoch), "args": self.args, "metrics": self.metrics, "best": self.best,
               "weights": self.weights, **self.extra}
        if self.train_state is not None:
            out["train_state"] = self.train_state
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "checkpoint") -> "Checkpoint":
        version = format_version(data)
        if version is None:
            raise UserError(f"{where} was not written by this toolkit (no '{FORMAT}' format tag); "
                            "to start from foreign weights use main.py --weight FILE")
        if version > VERSION:
            raise UserError(f"{where} was written by a newer version of this toolkit (schema {version}, this one reads "
                            f"up to {VERSION}): update the toolkit")
        meta = ModelMeta.from_dict(data, where)
        model = _field(data, "model", where)
        if not isinstance(model, Mapping) or not model:
            raise UserError(f"{where}: 'model' must be a non-empty state_dict")
        kind = data.get("kind", "best")
        if kind not in CHECKPOINT_KINDS:
            raise UserError(f"{where}: 'kind' is {kind!r}; expected one of {', '.join(CHECKPOINT_KINDS)}")
        known = {"format", "version", "kind", "model", "epoch", "args", "metrics", "best", "weights", "train_state",
                 *meta.to_dict()}
        train_state = data.get("train_state")
        weights = data.get("weights", "ema" if data.get("ema") is True else "raw")
        if version == 1:
            known |= {"ema", "step", "rng", "optimizer", "scheduler", "scaler", "swa", "distill", "train_sums", "train_extra"}
            if kind == "last":
                train_state = {k: data.get(k) for k in _V1_TRAIN_STATE_KEYS}
            weights = "swa" if kind == "swa" else weights
        if kind == "last" and not isinstance(train_state, Mapping):
            raise UserError(f"{where}: a last checkpoint must hold the training state ('train_state')")
        for key in ("args", "metrics", "best"):
            if not isinstance(data.get(key) or {}, Mapping):
                raise UserError(f"{where}: '{key}' must be a mapping")
        epoch = data.get("epoch", 0)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UserError(f"{where}: 'epoch' must be a non-negative integer, not {epoch!r}")
        return cls(kind=kind, meta=meta, model=dict(model), epoch=epoch, args=dict(data.get("args") or {}),
                   metrics=dict(data.get("metrics") or {}), best=dict(data.get("best") or {}), weights=weights,
                   train_state=dict(train_state) if train_state is not None else None,
                   extra={k: v for k, v in data.items() if k not in known}, version=version)
