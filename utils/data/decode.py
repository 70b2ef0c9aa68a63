"""Image files decoded correctly, whatever their mode: the one loader of training, evaluation,
prediction, serving and deployment.

    img = load_image("cat.jpg", channels=3)      # 8-bit RGB (or L for channels=1), EXIF orientation applied
    reason = check_image_header(Path("x.png"))  # None when Pillow can read it, else why not

Every PIL mode is converted correctly (16-bit, float, palette, alpha composited on white, CMYK),
and an image over the decompression-bomb limit is refused. Imports only Pillow and numpy.
An image inside a container (a tar shard's member, a dataset's row) is named "CONTAINER#MEMBER" and
read through utils.data.containers, so every loader above takes it like a file.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.data.png import simple_png

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


# Pillow's own default limit (~89 Mpx) only warns; here an image above the limit is refused.
MAX_IMAGE_PIXELS = 16384 * 16384


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------------- images
def image_source(path: str | Path | IO[bytes]) -> str | Path | IO[bytes]:
    """What Pillow opens for `path`: the file itself, or the bytes of a container's member
    ("shards/train-000000.tar#000012.jpg", "hf:data/digits#12"; utils.data.containers).

    Raises:
        OSError: a member that cannot be read (a truncated shard ...), naming its container.
    """
    if isinstance(path, (str, Path)) and "#" in str(path):
        from utils.data.containers import member_bytes  # noqa: PLC0415 - only names with a '#' need it

        data = member_bytes(str(path))
        if data is not None:
            return io.BytesIO(data)
    return path


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
    return to_mode(open_image(path), channels)


# Where Pillow's getexif finds an orientation (ImageOps.exif_transpose reads it there): the info
# keys of an EXIF block (JPEG, WebP, PNG eXIf), a PNG's text chunk of EXIF, XMP; and a TIFF's tags.
ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


SMALL_PNG = 1 << 22  # .png files up to this size are read whole and tried by utils.data.png.simple_png


def small_file(path: str | Path, limit: int, first: int = 1 << 16) -> bytes | None:
    """A file's bytes when it holds at most `limit` of them, else None: one read of `first` bytes
    takes a small file whole. A missing or unreadable file raises OSError naming it, as Pillow's
    open does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, first)
        if len(data) < first:
            return data
        if os.fstat(fd).st_size > limit:
            return None
        parts = [data]
        while chunk := os.read(fd, limit):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def open_image(path: str | Path | IO[bytes]) -> Image.Image:
    """Open and decode an image file in its own mode, EXIF orientation applied (load_image without
    the mode conversion: what a caller needing several channel counts decodes once).

    Raises:
        OSError, ValueError, Image.DecompressionBombError, UnidentifiedImageError for bad files.
    """
    source = image_source(path)
    if isinstance(source, io.BytesIO):  # the common PNG skips Image.open's chunk parsing (utils.data.png: the same pixels)
        with source.getbuffer() as view:
            img = simple_png(view) if len(view) <= SMALL_PNG else None
        if img is not None:
            return img
    elif isinstance(source, (str, Path)) and str(source)[-4:].lower() == ".png":
        data = small_file(source, SMALL_PNG)
        if data is not None:
            img = simple_png(data)
            if img is not None:
                return img  # else Pillow opens the file itself (its messages name the file)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            img.load()
            # An image with nowhere to hold an orientation (most PNGs) skips the EXIF parse.
            if hasattr(img, "tag_v2") or any(key in img.info for key in ORIENTATION_KEYS):
                ImageOps.exif_transpose(img, in_place=True)  # turned in place: no copy of the pixels
    return img


def to_mode(img: Image.Image, channels: int, keep_gray: bool = False) -> Image.Image:
    """Convert any PIL mode (16-bit, float, palette, alpha, CMYK...) to 8-bit RGB or L.

    Args:
        img: a decoded image.
        channels: 3 (RGB) or 1 (L).
        keep_gray: an 8-bit gray (L) image stays L for channels=3 too: for a transform that repeats
            its channel (utils.data.transforms_np), the bytes of convert("RGB") at a third of the work.
    """
    target = "RGB" if channels == 3 else "L"
    mode = img.mode
    if keep_gray and mode == "L":
        return img
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


@dataclass(frozen=True)
class Header:
    """What an image file's header says: its format, size and Pillow mode."""

    format: str
    width: int
    height: int
    mode: str

    def __str__(self) -> str:
        return f"{self.width}x{self.height} {self.mode}"


class HeaderError(ValueError):
    """Why a file's header is not a readable image.

    Attributes:
        kind: empty, bomb (over the decompression-bomb limit), unknown (no format Pillow knows),
            unreadable, or no pixels.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def read_header(source: str | Path | IO[bytes]) -> Header:
    """An image's header, read without decoding its pixels (a file, or a seekable stream of its bytes).

    Raises:
        HeaderError: what is wrong with it.
    """
    try:
        source = image_source(source)  # a container's member that cannot be read: unreadable, like a file
        stream = not isinstance(source, (str, Path))
        size = source.seek(0, 2) if stream else Path(source).stat().st_size
        if stream:
            source.seek(0)
        if size == 0:
            raise HeaderError("empty", "empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                header = Header(img.format or "image", *img.size, img.mode)
    except HeaderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HeaderError("bomb", f"larger than the decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise HeaderError("unknown", "not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise HeaderError("unreadable", f"unreadable image ({err})") from None
    if header.width < 1 or header.height < 1:
        raise HeaderError("no pixels", "image has no pixels")
    return header


def check_image_header(path: Path) -> str | None:
    """Cheap check that a file is an image Pillow can read (header only).

    Returns:
        None when it looks readable, else the reason it is not.
    """
    try:
        read_header(path)
    except HeaderError as err:
        return str(err)
    return None
