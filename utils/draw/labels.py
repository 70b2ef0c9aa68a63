"""Images with text drawn on them, with Pillow: batch grids with their labels, a prediction's banner
on an image, and the font they are written in (utils.draw.fonts: one with CJK and Latin-1 glyphs).

    grid = batch_grid(images, ["cat", "dog"])            # uint8 (N, C, H, W) -> one RGB image
    drawn = annotate(load_image("cat.jpg"), "cat (0.97)")
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from utils.draw.fonts import check_glyphs, pillow_font

if TYPE_CHECKING:  # torch is imported where it is used: predict.py draws without torch
    import torch


def load_font(size: int) -> Any:
    """The font of every text Pillow draws, at `size` px: the CJK and Latin-1 font of utils.draw.fonts
    (Pillow's bundled one where the machine has none)."""
    return pillow_font(size)


def batch_grid(images: torch.Tensor, labels: Sequence[str], title: str = "", max_images: int = 32, tile: int = 96) -> Image.Image:
    """A grid of uint8 images (N, C, H, W) with their labels under each, drawn with Pillow
    (a few milliseconds, where a matplotlib figure of 32 images takes over a second).

    Returns:
        The RGB image.
    """
    n = min(len(images), max_images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    font = load_font(11)
    check_glyphs([title, *map(str, labels[:n])])
    label_h, title_h, gap = 16, 20 if title else 0, 6
    cell = tile + gap
    grid = Image.new("RGB", (cols * cell, title_h + rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0), font=font)
    for i in range(n):
        array = np.asarray(images[i].detach().cpu() if hasattr(images[i], "detach") else images[i]).transpose(1, 2, 0)
        img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")
        scale = tile / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.NEAREST if scale >= 1 else Image.BILINEAR)
        x, y = (i % cols) * cell + gap // 2, title_h + (i // cols) * (cell + label_h) + gap // 2
        grid.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        draw.text((x, y + tile + 1), str(labels[i])[:16], fill=(0, 0, 0), font=font)
    return grid


def annotate(image: Image.Image, text: str, min_side: int = 128) -> Image.Image:
    """A copy of `image` (RGB) with `text` on a banner at the top; images smaller than min_side
    are enlarged (nearest neighbour) first so the text stays readable."""
    check_glyphs([text])
    image = image.convert("RGB")
    short = min(image.size)
    if short < min_side:
        scale = math.ceil(min_side / short)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    else:
        image = image.copy()
    size = max(10, min(image.size) // 14)
    font = load_font(size)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    draw.rectangle((0, 0, min(image.width, box[2] + 2 * pad), box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    return image
