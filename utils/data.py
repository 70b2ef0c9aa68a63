"""Datasets: finding images in class folders, loading them correctly, transforms and loaders.

Rules (DESIGN.md, Data):
- class folders may have any names; the class order is a natural sort of the names. The old
  pytorch-classifier layout (folders 0, 1, 2 ... plus a label.txt of names) still works.
- hidden files/folders, non-image files and unreadable images are skipped and reported;
  an empty class folder is an error naming it.
- images: EXIF orientation applied, every PIL mode converted correctly, a decompression-bomb limit.

Images travel through the loader as uint8 tensors; conversion to float and normalisation happen
on the training device, batched (`Normalize`), which keeps worker processes cheap.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from utils.log import UserError

LOGGER = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
# Pillow's own default limit (~89 Mpx) only warns; here an image above the limit is refused.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def natural_key(text: str) -> list[Any]:
    """Sort key where digit runs compare as numbers: 2 < 10, img2 < img10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.casefold()) for tok in re.split(r"(\d+)", text) if tok]


# ----------------------------------------------------------------------------------- images
def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open an image file as 8-bit RGB (channels=3) or L (channels=1), orientation applied.

    Args:
        path: the image file.
        channels: 3 or 1.

    Returns:
        A loaded PIL image in mode RGB or L.

    Raises:
        OSError, ValueError, Image.DecompressionBombError, UnidentifiedImageError for bad files.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    return to_mode(img, channels)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (16-bit, float, palette, alpha, CMYK...) to 8-bit RGB or L."""
    target = "RGB" if channels == 3 else "L"
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif arr.size and arr.max() > 255:
            arr = arr / (65535.0 if arr.max() <= 65535 else arr.max()) * 255.0
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have no defined colour: composite onto white, as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
        mode = img.mode
    if mode == "1":
        img = img.convert("L")
    return img.convert(target) if img.mode != target else img


def check_image_header(path: Path) -> str | None:
    """Cheap check that a file is an image Pillow can read (header only).

    Returns:
        None when it looks readable, else the reason it is not.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
        if width < 1 or height < 1:
            return "image has no pixels"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"larger than the decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, ValueError, SyntaxError) as err:
        return f"unreadable image ({err})"
    return None


# ----------------------------------------------------------------------------- class folders
@dataclass
class ImageSet:
    """The images of one split: samples, class names and what was skipped."""

    root: Path
    samples: list[tuple[str, int]]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.class_names)
        for _, t in self.samples:
            counts[t] += 1
        return counts


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def list_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """All image files under `folder` (recursive, naturally sorted), and the skipped ones.

    Returns:
        (image paths, [(path, reason), ...]) -- hidden entries and non-image files are skipped.
    """
    images: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        for d in list(dirnames):
            if is_hidden(d):
                skipped.append((str(Path(dirpath) / d), "hidden folder"))
                dirnames.remove(d)
        dirnames.sort(key=natural_key)
        for name in sorted(filenames, key=natural_key):
            path = Path(dirpath) / name
            if is_hidden(name):
                skipped.append((str(path), "hidden file"))
            elif path.suffix.lower() not in IMG_EXTENSIONS:
                skipped.append((str(path), f"not an image file ({path.suffix or 'no extension'})"))
            else:
                images.append(path)
    return images, skipped


def read_label_file(path: str | Path) -> list[str]:
    """Class names from a label.txt: one per line, in index order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


def class_folders(root: Path) -> list[str]:
    """Names of the visible sub-folders of `root`, naturally sorted."""
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)), key=natural_key)


def resolve_class_names(folders: list[str], label_path: str | Path | None) -> tuple[list[str], dict[str, int]]:
    """Decide the class names and which folder holds which index.

    Folder names in natural order are the class names, unless the folders are pytorch-classifier's
    numbered ones (0, 1, 2 or 00, 01 ...) and a label.txt lists a name per index.

    Returns:
        (class_names, {folder name: class index})
    """
    numbered = bool(folders) and all(f.isdigit() for f in folders)
    if numbered and label_path and Path(label_path).is_file():
        names = read_label_file(label_path)
        idx = {f: int(f) for f in folders}
        if max(idx.values()) < len(names) and names != [str(i) for i in range(len(names))]:
            return names, idx
    return list(folders), {f: i for i, f in enumerate(folders)}


def scan_split(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    label_path: str | Path | None = None,
    check_headers: bool = True,
    what: str = "dataset",
) -> ImageSet:
    """Find the images of one split (root/<class>/**/image).

    Args:
        root: the split folder.
        class_names: the model's classes (for val/test); None to derive them from the folders.
        label_path: a pytorch-classifier label.txt, used when the folders are numbered.
        check_headers: open each file's header to skip non-images early.
        what: how the split is called in messages ("train set", "val set" ...).

    Returns:
        The ImageSet.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{what} folder not found: {root} (split a dataset with processing.py, or pass the right path)")
    if not root.is_dir():
        raise UserError(f"{what} path is not a folder: {root}")
    folders = class_folders(root)
    if not folders:
        raise UserError(f"{what} folder {root} has no class folders: expected {root}/<class name>/<images>")
    if class_names is None:
        names, folder_index = resolve_class_names(folders, label_path)
    else:
        names = list(class_names)
        by_name = {n: i for i, n in enumerate(names)}
        folder_index = {}
        for f in folders:
            if f in by_name:
                folder_index[f] = by_name[f]
            elif f.isdigit() and int(f) < len(names) and f not in by_name:
                folder_index[f] = int(f)  # numbered folders of the old layout
            else:
                raise UserError(
                    f"{what} {root} has a class folder '{f}' that the model does not know "
                    f"(its classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''})"
                )
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for f in folders:
        files, skip = list_files(root / f)
        skipped.extend(skip)
        good = 0
        for path in files:
            reason = check_image_header(path) if check_headers else None
            if reason:
                skipped.append((str(path), reason))
                continue
            samples.append((str(path), folder_index[f]))
            good += 1
        if good == 0 and class_names is None:
            raise UserError(f"class folder {root / f} holds no readable images: add images or remove the folder")
    for p in root.iterdir():
        if p.is_file():
            skipped.append((str(p), "file outside the class folders"))
    if not samples:
        raise UserError(f"{what} folder {root} holds no readable images")
    return ImageSet(root=root, samples=samples, class_names=names, skipped=skipped)


def report_skipped(skipped: Sequence[tuple[str, str]], what: str, limit: int = 20) -> None:
    """Log the skipped files (path and reason), the first `limit` in full."""
    if not skipped:
        return
    LOGGER.warning("%s: skipped %d file(s):", what, len(skipped))
    for path, reason in skipped[:limit]:
        LOGGER.warning("  %s: %s", path, reason)
    if len(skipped) > limit:
        LOGGER.warning("  ... and %d more", len(skipped) - limit)


# ------------------------------------------------------------------------------- transforms
RESIZE_MODES = ("crop", "letterbox", "squash")
LETTERBOX_FILL = 114  # grey borders, as YOLO-style letterboxing uses


def preprocess_spec(image_size: int, channels: int, mean: Sequence[float], std: Sequence[float],
                    resize_mode: str = "crop") -> dict[str, Any]:
    """The test-time preprocessing, as plain data stored with the model.

    Geometry by resize_mode -- crop: short side to `resize`, center-crop `crop`; letterbox: long
    side to `resize`, pad to a square, center-crop; squash: resize to resize x resize, ignoring the
    aspect ratio, center-crop. Then scale to [0, 1] and normalise by mean/std.
    """
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode '{resize_mode}'; choose one of {', '.join(RESIZE_MODES)}")
    return {
        "resize": int(image_size),
        "crop": int(image_size),
        "resize_mode": resize_mode,
        "interpolation": "bilinear",
        "channels": int(channels),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


class Letterbox:
    """Resize the long side to `size` and pad the short side to a centred square."""

    def __init__(self, size: int, fill: int = LETTERBOX_FILL) -> None:
        self.size = size
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        scale = self.size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(new, Image.BILINEAR, reducing_gap=None)
        fill = self.fill if img.mode == "L" else (self.fill,) * len(img.getbands())
        canvas = Image.new(img.mode, (self.size, self.size), fill)
        canvas.paste(img, ((self.size - new[0]) // 2, (self.size - new[1]) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"Letterbox(size={self.size}, fill={self.fill})"


def resize_step(mode: str, size: int) -> Any:
    """The resize of a resize mode (see preprocess_spec)."""
    if mode == "crop":
        return v2.Resize(size, antialias=True)
    if mode == "squash":
        return v2.Resize((size, size), antialias=True)
    if mode == "letterbox":
        return Letterbox(size)
    raise UserError(f"unknown resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")


def train_transform(image_size: int, resize_mode: str = "crop", augment: Sequence[Any] = ()) -> v2.Compose:
    """pytorch-classifier's training geometry: resize to size*1.1 (by resize_mode), random crop of size,
    then the augmentations, then a uint8 tensor."""
    return v2.Compose([
        resize_step(resize_mode, int(image_size + image_size * 0.1)),
        v2.RandomCrop(image_size),
        *augment,
        v2.PILToTensor(),
    ])


def eval_transform(spec: dict[str, Any]) -> v2.Compose:
    """Deterministic test-time transform from a preprocessing spec: PIL image -> uint8 (C, H, W)."""
    return v2.Compose([
        resize_step(spec.get("resize_mode", "crop"), spec["resize"]),
        v2.CenterCrop(spec["crop"]),
        v2.PILToTensor(),
    ])


class _StackCrops:
    def __call__(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([v2.functional.pil_to_tensor(c) for c in crops])


def tta_transform(spec: dict[str, Any]) -> v2.Compose:
    """Test-time augmentation (pytorch-classifier's --test_tta): resize to crop*1.1, then TenCrop --
    the four corners and the centre, and their mirror images: uint8 (10, C, H, W) per image.

    Average the ten predictions with `run_with_tta`.
    """
    return v2.Compose([
        resize_step(spec.get("resize_mode", "crop"), int(spec["crop"] + spec["crop"] * 0.1)),
        v2.TenCrop(spec["crop"]),
        _StackCrops(),
    ])


def run_with_tta(fn: Any, images: torch.Tensor) -> torch.Tensor:
    """Apply fn (a batch -> logits or probabilities) to (N, C, H, W), or to TenCrop batches
    (N, K, C, H, W) by flattening the crops and averaging fn's outputs over them."""
    if images.ndim == 4:
        return fn(images)
    n, k = images.shape[:2]
    out = fn(images.flatten(0, 1))
    return out.view(n, k, *out.shape[1:]).mean(dim=1)


class Normalize(torch.nn.Module):
    """uint8 batch on any device -> float, scaled to [0, 1] and normalised by mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


# ---------------------------------------------------------------------------------- dataset
def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A seed per (run, epoch, image): augmentation does not depend on workers or on resume."""
    return (base_seed * 1_000_003 + epoch * 7_919_993 + index * 2_654_435_761) % (2**63 - 1)


class ImageDataset(Dataset):
    """Images of an ImageSet through a transform; keys are indices or (epoch, index) pairs.

    An image that fails to decode (a truncated JPEG, say) is returned as None with the reason;
    `collate` drops it from the batch and reports it, so nothing is silently trained on.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Any, channels: int = 3, seed: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.channels = channels
        self.seed = seed  # None: deterministic transform, no reseeding needed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, str, str | None]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, target = self.samples[index]
        try:
            img = load_image(path, self.channels)
        except Exception as err:  # noqa: BLE001 - any decoder failure means 'skip and report'
            return None, target, path, f"{type(err).__name__}: {err}"
        if self.seed is None:
            return self.transform(img), target, path, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img), target, path, None


def collate(batch: Sequence[tuple[Any, int, str, str | None]]) -> dict[str, Any]:
    """Stack the good images; keep the failures as (path, reason)."""
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else torch.empty(0, dtype=torch.uint8)
    return {
        "images": images,
        "targets": torch.tensor([b[1] for b in good], dtype=torch.long),
        "paths": [b[2] for b in good],
        "failed": [(b[2], b[3]) for b in batch if b[0] is None],
    }


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a seeded permutation per epoch, sharded by rank.

    `set_epoch` chooses the epoch; `skip` drops the first n keys of it (exact mid-epoch resume).
    The order depends only on (seed, epoch), never on how many epochs ran in this process.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.start = skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world_size)
        order += order[: per_rank * self.world_size - self.size]  # pad so every rank has as many
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start :]:
            yield (self.epoch, index)

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size) - self.start


def build_loader(
    dataset: ImageDataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with persistent workers (restarting them every epoch costs on small machines).

    Args:
        dataset: the ImageDataset.
        batch_size: images per batch.
        sampler: where keys come from (an EpochSampler; a distributed run passes its rank's).
        workers: worker processes; 0 loads in the main process.
        pin_memory: pin host memory for faster CUDA copies.
        drop_last: drop the last incomplete batch.

    Returns:
        The loader.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def compute_mean_std(
    samples: Sequence[tuple[str, int]], image_size: int, channels: int, workers: int = 0, max_images: int = 5000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images at the model's input size, in [0, 1].

    Uses at most `max_images` images, drawn at random (seeded) when there are more.

    Returns:
        (mean, std), one value per channel.
    """
    if len(samples) > max_images:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(samples), generator=gen)[:max_images].tolist()
        samples = [samples[i] for i in sorted(pick)]
    spec = preprocess_spec(image_size, channels, [0.0] * channels, [1.0] * channels)
    dataset = ImageDataset(samples, eval_transform(spec), channels)
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=collate)
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for batch in loader:
        x = batch["images"].to(torch.float64) / 255.0
        if not len(x):
            continue
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise UserError("no training image could be decoded to compute the mean/std")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()
