"""Augmentation: torchvision policies (--Augment), the config's custom_augment list, CutOut, mixup/cutmix.

custom_augment (config YAML) is a list of {name: ..., params: {...}} entries. Each name is looked
up -- never evaluated -- first among the toolkit's own transforms (CutOut), then in
torchvision.transforms.v2, then in albumentations. When the list is non-empty it replaces
--Augment, as in pytorch-classifier. Image transforms here run on PIL images, between the random
crop and the conversion to a tensor; mixup/cutmix run on the normalised batch.

Randomness comes from torch's generator, which the dataset seeds per (seed, epoch, image), so an
augmented epoch is the same whatever the worker count and after a resume. Albumentations keeps its
own generators: they are reseeded from torch's for every image for the same reason.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from utils.core.log import UserError
from utils.core.names import AUGMENT_CHOICES, AUGMENT_POLICIES, MIXUP_CHOICES

LOGGER = logging.getLogger(__name__)

POLICIES = {
    "RandAugment": v2.RandAugment,
    "AutoAugment": v2.AutoAugment,
    "TrivialAugmentWide": v2.TrivialAugmentWide,
    "AugMix": v2.AugMix,
}
assert tuple(POLICIES) == AUGMENT_POLICIES, "utils.core.names.AUGMENT_POLICIES names every policy"


class CutOut:
    """Erase `n_holes` squares of side `length` at random centres (DeVries & Taylor, 2017).

    Args:
        n_holes: how many squares.
        length: their side in pixels (clipped at the borders).
        fill: the value written into them.
    """

    def __init__(self, n_holes: int = 4, length: int = 16, fill: int = 0) -> None:
        if n_holes < 0 or length <= 0:
            raise ValueError(f"CutOut needs n_holes >= 0 and length > 0, got {n_holes}, {length}")
        self.n_holes = int(n_holes)
        self.length = int(length)
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        arr = np.array(img)
        h, w = arr.shape[:2]
        for _ in range(self.n_holes):
            y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
            x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
            arr[y1:y2, x1:x2] = self.fill
        return Image.fromarray(arr)

    def __repr__(self) -> str:
        return f"CutOut(n_holes={self.n_holes}, length={self.length})"


OWN_TRANSFORMS = {"CutOut": CutOut}


class Albumentation:
    """An albumentations image transform applied to a PIL image, reseeded from torch per call."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> Image.Image:
        self.transform.set_random_seed(int(torch.randint(2**31 - 1, ())))
        out = self.transform(image=np.array(img))["image"]
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out)

    def __repr__(self) -> str:
        return f"albumentations.{type(self.transform).__name__}"


def _construct(cls: Any, params: dict[str, Any], where: str, name: str) -> Any:
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (params or {}).items()}
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        try:
            sig = str(inspect.signature(cls))
        except (TypeError, ValueError):
            sig = "(...)"
        raise UserError(f"custom_augment '{name}' ({where}): bad params {params}: {str(err).splitlines()[0]}; "
                        f"signature {name}{sig}") from None


def build_custom_augment(entries: Sequence[Any]) -> list[Any]:
    """Transforms from the config's custom_augment list.

    Args:
        entries: [{"name": "RandomHorizontalFlip", "params": {"p": 0.5}}, ...]; a bare string is a
            name without params.

    Returns:
        The transforms, in order.
    """
    if not isinstance(entries, (list, tuple)):
        raise UserError(f"config custom_augment must be a list of {{name, params}} entries, got {type(entries).__name__}")
    transforms = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "params"}:
            raise UserError(f"config custom_augment[{i}] must look like {{name: RandomRotation, params: {{degrees: 20}}}}, got {entry!r}")
        name, params = str(entry["name"]), entry.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"config custom_augment[{i}] ({name}): params must be a mapping, got {params!r}")
        if name in OWN_TRANSFORMS:
            transforms.append(_construct(OWN_TRANSFORMS[name], params, "toolkit", name))
            continue
        cls = getattr(v2, name, None)
        if inspect.isclass(cls) and issubclass(cls, v2.Transform):
            transforms.append(_construct(cls, params, "torchvision.transforms.v2", name))
            continue
        try:
            import albumentations as albu
        except ImportError:  # optional (requirements/extras.txt): needed only for the names torchvision lacks
            raise UserError(f"config custom_augment[{i}]: '{name}' is neither CutOut nor a torchvision.transforms.v2 "
                            "class, and albumentations, where it may be, is not installed: pip install "
                            "'albumentations>=1.4.21' (or pip install -r requirements/extras.txt)") from None
        cls = getattr(albu, name, None)
        if inspect.isclass(cls) and hasattr(cls, "set_random_seed"):
            transforms.append(Albumentation(_construct(cls, params, "albumentations", name)))
            continue
        raise UserError(f"config custom_augment[{i}]: unknown transform '{name}'; use CutOut, a class of "
                        "torchvision.transforms.v2 (e.g. RandomHorizontalFlip) or of albumentations (e.g. RandomGridShuffle)")
    return transforms


def train_augment(policy: str, custom: Sequence[Any]) -> tuple[list[Any], str]:
    """The augmentation list for training and a line saying which is active.

    Returns:
        (transforms, description)
    """
    if custom:
        transforms = build_custom_augment(custom)
        return transforms, "custom_augment from the config (replaces --Augment): " + ", ".join(map(repr, transforms))
    if policy in (None, "", "none"):
        return [], "none"
    if policy not in POLICIES:
        raise UserError(f"unknown --Augment '{policy}'; choose one of {', '.join(AUGMENT_CHOICES)}")
    return [POLICIES[policy]()], f"--Augment {policy}"


class BatchMix:
    """mixup or cutmix on a normalised batch, with probability targets (timm's Mixup).

    Targets come out as (N, C) rows (the loss adds label smoothing itself); multi-hot targets of a
    multi-label batch are mixed with the same proportions. timm mixes a batch with its reverse, so
    an odd-sized batch is left unmixed (the training loader drops a ragged last batch).
    """

    def __init__(self, mode: str, num_classes: int, alpha: float | None = None, multilabel: bool = False) -> None:
        from timm.data import Mixup

        if mode not in ("mixup", "cutmix"):
            raise UserError(f"unknown --mixup '{mode}'; choose one of {', '.join(MIXUP_CHOICES)}")
        self.mode = mode
        self.num_classes = num_classes
        self.multilabel = multilabel
        kwargs = {"mixup_alpha": alpha or 0.8, "cutmix_alpha": 0.0} if mode == "mixup" else {"mixup_alpha": 0.0, "cutmix_alpha": alpha or 1.0}
        self.mixup = Mixup(**kwargs, label_smoothing=0.0, num_classes=num_classes, multi_label=multilabel)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2:
            return images, targets.float() if self.multilabel else torch.nn.functional.one_hot(targets, self.num_classes).float()
        return self.mixup(images, targets)
