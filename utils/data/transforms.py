"""The transforms of a PreprocessSpec in torchvision: what training and evaluation feed the model.

    transform = eval_transform(spec)              # PIL image -> uint8 (C, H, W), as the model expects
    x = Normalize(spec.mean, spec.std)(batch)     # on the device: uint8 batch -> normalised float

Images travel through the loaders as uint8 tensors; conversion to float and normalisation happen
on the training device, batched (`Normalize`), which keeps loader processes cheap. The numpy twin of
these transforms (byte-identical, no torch) is utils.data.transforms_np.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from utils.core.log import UserError
from utils.core import schema
from utils.core.schema import RESIZE_MODES, PreprocessSpec, scaled_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------- transforms
INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                 "nearest": InterpolationMode.NEAREST}


PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class Letterbox:
    """Resize the long side to `size` and pad the short side to a centred square of `fill`
    (default utils.core.schema.LETTERBOX_FILL)."""

    def __init__(self, size: int, fill: int | None = None, interpolation: str = "bilinear") -> None:
        self.size = size
        self.fill = schema.LETTERBOX_FILL if fill is None else fill
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        scale = self.size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(new, PIL_RESAMPLE[self.interpolation], reducing_gap=None)
        fill = self.fill if img.mode == "L" else (self.fill,) * len(img.getbands())
        canvas = Image.new(img.mode, (self.size, self.size), fill)
        canvas.paste(img, ((self.size - new[0]) // 2, (self.size - new[1]) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"Letterbox(size={self.size}, fill={self.fill}, interpolation={self.interpolation})"


def resize_step(mode: str, size: int, interpolation: str = "bilinear") -> Any:
    """The resize of a resize mode (see utils.core.schema.PreprocessSpec)."""
    if interpolation not in INTERPOLATION:
        raise UserError(f"unknown interpolation '{interpolation}'; choose one of {', '.join(INTERPOLATION)}")
    if mode == "crop":
        return v2.Resize(size, interpolation=INTERPOLATION[interpolation], antialias=True)
    if mode == "squash":
        return v2.Resize((size, size), interpolation=INTERPOLATION[interpolation], antialias=True)
    if mode == "letterbox":
        return Letterbox(size, interpolation=interpolation)
    raise UserError(f"unknown resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")


class RandomCrop:
    """v2.RandomCrop(size) for PIL images without v2's dispatch (12 us an image instead of 35 here):
    the same two draws from torch's generator, the same crop. Other inputs go to v2.RandomCrop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._v2 = v2.RandomCrop(size)

    def __call__(self, img: Any) -> Any:
        if not isinstance(img, Image.Image):
            return self._v2(img)
        width, height = img.size
        if height < self.size or width < self.size:
            raise ValueError(f"Required crop size {(self.size, self.size)} is larger than input image size {(height, width)}.")
        top = int(torch.randint(0, height - self.size + 1, size=())) if height > self.size else 0
        left = int(torch.randint(0, width - self.size + 1, size=())) if width > self.size else 0
        if height == width == self.size:
            return img
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size})"


class PILToTensor:
    """v2.PILToTensor without v2's dispatch (20 us an image instead of 37): a PIL image -> uint8
    (C, H, W); a tensor passes unchanged."""

    def __call__(self, img: Any) -> Any:
        return v2.functional.pil_to_tensor(img) if isinstance(img, Image.Image) else img

    def __repr__(self) -> str:
        return "PILToTensor()"


def train_transform(image_size: int, resize_mode: str = "crop", augment: Sequence[Any] = (),
                    interpolation: str = "bilinear") -> v2.Compose:
    """pytorch-classifier's training geometry: resize to size * TTA_SCALE (by resize_mode, see
    utils.core.schema.scaled_resize), random crop of size, then the augmentations, then a uint8 tensor."""
    return v2.Compose([
        resize_step(resize_mode, scaled_resize(image_size), interpolation),
        RandomCrop(image_size),
        *augment,
        PILToTensor(),
    ])


def eval_transform(spec: PreprocessSpec) -> v2.Compose:
    """Deterministic test-time transform from a preprocessing spec: PIL image -> uint8 (C, H, W)."""
    return v2.Compose([
        resize_step(spec.resize_mode, spec.resize, spec.interpolation),
        v2.CenterCrop(spec.crop),
        PILToTensor(),
    ])


class _StackCrops:
    def __call__(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([v2.functional.pil_to_tensor(c) for c in crops])


def tta_transform(spec: PreprocessSpec) -> v2.Compose:
    """Test-time augmentation (pytorch-classifier's --test_tta): resize to crop * TTA_SCALE, then TenCrop --
    the four corners and the centre, and their mirror images: uint8 (10, C, H, W) per image.

    Average the ten predictions with `run_with_tta`.
    """
    return v2.Compose([
        resize_step(spec.resize_mode, scaled_resize(spec.crop), spec.interpolation),
        v2.TenCrop(spec.crop),
        _StackCrops(),
    ])


def image_transform(spec: PreprocessSpec, tta: bool = False) -> v2.Compose:
    """PIL image -> uint8 tensor as the model expects it ((10, C, H, W) with TenCrop TTA)."""
    return tta_transform(spec) if tta else eval_transform(spec)


def run_with_tta(fn: Any, images: torch.Tensor) -> torch.Tensor:
    """Apply fn (a batch -> logits or probabilities) to (N, C, H, W), or to TenCrop batches
    (N, K, C, H, W) by flattening the crops and averaging fn's outputs over them."""
    if images.ndim == 4:
        return fn(images)
    n, k = images.shape[:2]
    out = fn(images.flatten(0, 1))
    return out.view(n, k, *out.shape[1:]).mean(dim=1)


class Normalize(torch.nn.Module):
    """uint8 batch on any device -> float, scaled to [0, 1] and normalised by mean/std; laid out
    channels-last (NHWC in memory) when `channels_last`, for a model converted to it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x
