"""The test-time preprocessing of a PreprocessSpec in numpy and Pillow: what prediction and
evaluation run, with or without torch.

    transform = image_transform(spec)                 # PIL image (RGB or L) -> uint8 (C, H, W)
    batch = np.stack([transform(load_image(f, spec.channels)) for f in files])
    x = normalize(batch, spec.mean, spec.std)         # float32 (pixel / 255 - mean) / std
    probs = run_with_tta(lambda b: meta.task_type.probabilities(model(b)), batch)

This is the second implementation of the one definition in utils.core.schema.PreprocessSpec;
utils.data.transforms builds the same steps from torchvision for training. tests/test_deploy.py checks that both give
the same bytes for every resize mode and interpolation. Resizing calls Pillow exactly as
torchvision's v2.Resize does on a PIL image (`Image.resize(size, resample)`: no reducing_gap, so
Pillow's antialiased two-pass filter), and the sizes follow torchvision's rules (crop: the short
side to `resize`, the long side `int(resize * long / short)`); crops, padding, flips and the
channel layout are numpy slices. No torch import: a deployment machine runs it with numpy and
Pillow alone.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image

from utils.core import schema
from utils.core.log import UserError
from utils.core.schema import INTERPOLATIONS, RESIZE_MODES, PreprocessSpec, scaled_resize

PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resized_size(width: int, height: int, mode: str, size: int) -> tuple[int, int]:
    """(width, height) after the resize step of `mode` (crop: short side to size; squash: size x
    size; letterbox: long side to size, before padding)."""
    if mode == "squash":
        return size, size
    if mode == "letterbox":
        scale = size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    if mode == "crop":
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        return (size, new_long) if width <= height else (new_long, size)
    raise UserError(f"unknown resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")


def pixels(img: Image.Image) -> np.ndarray:
    """An RGB or L PIL image -> a read-only uint8 (C, H, W) view of its bytes (C = 1 for L)."""
    width, height = img.size
    # tobytes + frombuffer: a third cheaper than np.asarray's array interface on small images
    arr = np.frombuffer(img.tobytes(), dtype=np.uint8)
    return arr.reshape(1, height, width) if img.mode == "L" else arr.reshape(height, width, -1).transpose(2, 0, 1)


def filled(arr: np.ndarray, channels: int | None = None, axis: int = 0) -> np.ndarray:
    """A pixels() array (or a view of one) -> contiguous and writable, a gray image's channel (at
    `axis`) repeated three times for channels=3 (the bytes of convert("RGB"))."""
    if channels == 3 and arr.shape[axis] == 1:
        return np.repeat(arr, 3, axis=axis)
    return np.array(arr, order="C")


def resized(img: Image.Image, mode: str, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The resize step of a resize mode: PIL image (RGB or L) -> uint8 (C, H, W), C = 1 for L,
    possibly a read-only view (letterbox: padded to a square). An L image meant for 3 channels is
    resized as L and its channel repeated afterwards: the same bytes as resizing its RGB conversion
    (Pillow resamples each channel alike), a third of the work."""
    if interpolation not in PIL_RESAMPLE:
        raise UserError(f"unknown interpolation '{interpolation}'; choose one of {', '.join(INTERPOLATIONS)}")
    new = resized_size(img.width, img.height, mode, size)
    if new != img.size:
        img = img.resize(new, PIL_RESAMPLE[interpolation])
    arr = pixels(img)
    if mode != "letterbox":
        return arr
    canvas = np.full((arr.shape[0], size, size), schema.LETTERBOX_FILL, dtype=np.uint8)
    top, left = (size - new[1]) // 2, (size - new[0]) // 2
    canvas[:, top:top + new[1], left:left + new[0]] = arr
    return canvas


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size of (C, H, W); a smaller side is first padded with zeros around it
    (torchvision's CenterCrop rules, including its rounding of the offset)."""
    _, height, width = arr.shape
    if size > height or size > width:
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        arr = np.pad(arr, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)))
        _, height, width = arr.shape
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return arr[:, top:top + size, left:left + size]


def five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops of (C, H, W)."""
    _, height, width = arr.shape
    if size > height or size > width:
        raise UserError(f"TenCrop: crop {size} is larger than the resized image ({height}x{width})")
    return [arr[:, :size, :size], arr[:, :size, width - size:], arr[:, height - size:, :size],
            arr[:, height - size:, width - size:], center_crop(arr, size)]


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The five crops and the five crops of the mirrored image: uint8 (10, C, size, size)."""
    return np.stack(five_crop(arr, size) + five_crop(arr[:, :, ::-1], size))


class ImageTransform:
    """PIL image (already in the model's mode, see utils.data.decode.load_image; or L for a 3-channel
    model, repeated) -> uint8 (C, H, W), or
    (10, C, H, W) with TenCrop test-time augmentation. Picklable (loader processes use it).

    Args:
        spec: the model's preprocessing.
        tta: TenCrop: resize to crop * TTA_SCALE by the resize mode (utils.core.schema.scaled_resize),
            then the ten crops.
    """

    def __init__(self, spec: PreprocessSpec, tta: bool = False) -> None:
        self.spec = spec
        self.tta = tta

    def view(self, img: Image.Image) -> np.ndarray:
        """The transformed image before contiguity and channel repeat: uint8 (C, H, W), or
        (10, C, H, W) with TenCrop; C = 1 for an L image (broadcast to the spec's channels)."""
        spec = self.spec
        if self.tta:
            return ten_crop(resized(img, spec.resize_mode, scaled_resize(spec.crop), spec.interpolation), spec.crop)
        return center_crop(resized(img, spec.resize_mode, spec.resize, spec.interpolation), spec.crop)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return filled(self.view(img), self.spec.channels, axis=1 if self.tta else 0)

    def fill(self, img: Image.Image, out: np.ndarray) -> None:
        """Write the transformed image into `out` (a batch's slot of the output's shape): one copy,
        a gray image's channel broadcast (what a loader building a batch in place calls)."""
        out[...] = self.view(img)

    def output_shape(self) -> tuple[int, ...]:
        """The shape __call__ returns: (C, H, W), or (10, C, H, W) with TenCrop."""
        spec = self.spec
        return ((10,) if self.tta else ()) + (spec.channels, spec.crop, spec.crop)

    def __repr__(self) -> str:
        return f"ImageTransform({self.spec}, tta={self.tta})"


def image_transform(spec: PreprocessSpec, tta: bool = False) -> ImageTransform:
    """The test-time transform of a spec (numpy output)."""
    return ImageTransform(spec, tta)


def normalize(images: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (pixel - 255 mean) / (255 std), in the same float32 steps as
    utils.data.transforms.Normalize (so both give the same bits)."""
    m = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(1, -1, 1, 1)
    s = (np.asarray(std, dtype=np.float32) * np.float32(255.0)).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) - m) / s


def run_with_tta(fn: Callable[[Any], Any], images: Any) -> Any:
    """Apply fn (a batch -> logits or probabilities) to (N, C, H, W), or to TenCrop batches
    (N, K, C, H, W) by flattening the crops and averaging fn's outputs over them. Works on numpy
    arrays and torch tensors alike."""
    if images.ndim == 4:
        return fn(images)
    n, k = images.shape[:2]
    out = fn(images.reshape(n * k, *images.shape[2:]))
    return out.reshape(n, k, *out.shape[1:]).mean(axis=1)
