"""Images and class folders, without torch: finding the images of a split, and loading them correctly.

    image_set = scan_split("dataset/train")            # samples [(path, class index)], class names, skipped
    img = load_image("cat.jpg", channels=3)            # 8-bit RGB, EXIF orientation applied

Rules:
- class folders may have any names; the class order is a natural sort of the names. The old
  pytorch-classifier layout (folders 0, 1, 2 ... plus a label.txt of names) still works.
- hidden files/folders, non-image files and unreadable images are skipped and reported
  (path and reason); an empty class folder is an error naming it.
- images: EXIF orientation applied, every PIL mode converted correctly, a decompression-bomb limit.

processing.py, the training data (utils.data), prediction and the deployment predictor all read
images through this module; it imports only Pillow and numpy.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.log import UserError

LOGGER = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
# Pillow's own default limit (~89 Mpx) only warns; here an image above the limit is refused.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

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


def map_class_folders(root: Path, folders: list[str], class_names: Sequence[str] | None, label_path: str | Path | None,
                      what: str) -> tuple[list[str], dict[str, int]]:
    """The class names and each folder's class index: from the folders (and a label.txt) when
    `class_names` is None, else the folders are matched to the model's classes by name (or by
    number in the old numbered layout).

    Raises:
        UserError: a folder that is not one of `class_names`.
    """
    if class_names is None:
        return resolve_class_names(folders, label_path)
    names = list(class_names)
    by_name = {n: i for i, n in enumerate(names)}
    folder_index = {}
    for f in folders:
        if f in by_name:
            folder_index[f] = by_name[f]
        elif f.isdigit() and int(f) < len(names):
            folder_index[f] = int(f)  # numbered folders of the old layout
        else:
            raise UserError(f"{what} {root} has a class folder '{f}' that the model does not know "
                            f"(its classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
    return names, folder_index


def scan_class_folder(folder: Path, check_headers: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """The readable images of one class folder (recursive, natural order) and the skipped files.

    Args:
        folder: the class folder.
        check_headers: open each file's header to skip non-images early.

    Returns:
        (image paths, [(path, reason), ...]).
    """
    files, skipped = list_files(folder)
    good = []
    for path in files:
        reason = check_image_header(path) if check_headers else None
        if reason:
            skipped.append((str(path), reason))
        else:
            good.append(path)
    return good, skipped


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
    names, folder_index = map_class_folders(root, folders, class_names, label_path, what)
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for f in folders:
        good, skip = scan_class_folder(root / f, check_headers)
        skipped.extend(skip)
        if not good and class_names is None:
            raise UserError(f"class folder {root / f} holds no readable images: add images or remove the folder")
        samples.extend((str(path), folder_index[f]) for path in good)
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
