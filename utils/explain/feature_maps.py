"""What each stage of a network sees: predict.py --feature_maps.

    stages = find_stages(model, image_size=224)                  # [Stage("stride 4", "layer1", "NCHW"), ...]
    maps = stage_maps(backend, stages, uint8_batch)              # per stage: (N, C, H, W) float32 on the CPU
    grid, info = feature_map_grid(view, pick_channels(maps, 0, 8), ["cat (0.97)"])

Stages are the modules whose outputs are the feature maps at strides 4, 8, 16 and 32
(utils.models.features.feature_taps: timm's feature_info, or a probe of a torchvision CNN). A vision
transformer has one stride: four blocks evenly spaced in depth are shown instead (the last
included), their tokens reshaped to the patch grid with the class and register tokens dropped;
channels-last maps (swin) are permuted. For each stage, the K channels with the largest mean
activation over the map are drawn, side by side, on one colour scale per stage.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from torch import nn

from utils.core.log import UserError
from utils.draw.fonts import check_glyphs
from utils.draw.labels import load_font
from utils.explain.cam import heatmap_colors, output_layout, to_hwc_rgb
from utils.explain.probe import probe, zero_input
from utils.models.features import FeatureRecorder, feature_taps

BLOCKS_SHOWN = 4   # transformer blocks shown (evenly spaced)
TILE = 64          # pixels per channel map
GAP, LABEL_H, LEFT = 4, 14, 84  # between tiles; the text under a tile; the stage labels' column
PNG_KEY = "feature_maps"  # the PNG text chunk that lists the stages and channels drawn (JSON)


@dataclass
class Stage:
    """One stage to draw: its label, module name, output layout and (tokens) class/register tokens."""

    label: str
    name: str
    layout: str  # "NCHW", "NHWC" or "tokens"
    prefix: int = 0

    def to_nchw(self, out: torch.Tensor) -> torch.Tensor:
        """The module's output as (N, C, H, W)."""
        if self.layout == "NHWC":
            return out.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            x = out[:, self.prefix:, :]
            side = math.isqrt(x.shape[1])
            return x.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)
        return out


def _token_blocks(model: nn.Module, records: list[tuple[str, tuple[int, ...]]]) -> list[Stage]:
    """The blocks of a transformer: the largest group of numbered sibling modules (blocks.0,
    blocks.1 ...; encoder_layer_0 ...) whose outputs are tokens (prefix + a square number of
    patches); BLOCKS_SHOWN of them, evenly spaced in depth."""
    groups: dict[tuple[str, str], dict[str, int]] = {}
    declared = getattr(model, "num_prefix_tokens", None)
    for name, shape in records:
        if len(shape) != 3 or "." not in name:
            continue
        parent, last = name.rsplit(".", 1)
        stem = last.rstrip("0123456789")
        if stem == last:
            continue  # not a numbered block
        prefix = declared if isinstance(declared, int) and declared < shape[1] else shape[1] - math.isqrt(shape[1]) ** 2
        patches = shape[1] - prefix
        if patches > 0 and math.isqrt(patches) ** 2 == patches:
            groups.setdefault((parent, stem), {})[name] = prefix
    blocks = max(groups.values(), key=len, default={})
    if len(blocks) < 2:
        return []
    names = list(blocks)
    picks = sorted({round(i) for i in np.linspace(0, len(names) - 1, min(BLOCKS_SHOWN, len(names)))})
    return [Stage(f"block {i + 1}/{len(names)}", names[i], "tokens", blocks[names[i]]) for i in picks]


def find_stages(model: nn.Module, image_size: int, channels: int = 3) -> list[Stage]:
    """The stages --feature_maps draws: strides 4, 8, 16, 32 of a CNN, or a transformer's blocks.

    Raises:
        UserError: the model has neither.
    """
    model.eval()
    try:
        taps = feature_taps(model, channels)
    except Exception:  # noqa: BLE001 - a model that cannot take the 224 px probe: look for blocks below
        taps = {}
    x = zero_input(model, image_size, channels)
    records = [(r.name, r.shape) for r in probe(model, lambda: model(x))[0]]
    shapes = dict(records)
    stages = [Stage(f"stride {s}", name, output_layout(shapes[name], model) or "") for s, name in sorted(taps.items())
              if name in shapes and output_layout(shapes[name], model) in ("NCHW", "NHWC")]
    if len(stages) < 2:
        stages = _token_blocks(model, records) or stages
    if not stages:
        raise UserError(f"--feature_maps: found no feature stages in {type(model).__name__} (no maps at strides 4-32 "
                        "and no transformer blocks)")
    return stages


@torch.inference_mode()
def stage_maps(backend: Any, stages: Sequence[Stage], images: torch.Tensor) -> list[torch.Tensor]:
    """The stages' outputs for a uint8 batch (N, C, H, W), as (N, C, H, W) float32 on the CPU
    (a forward pass of the backend's model on the normalised batch, with hooks on the stages)."""
    x = backend.normalize(images.to(backend.device))
    recorder = FeatureRecorder(backend.model, [s.name for s in stages])
    try:
        backend.model(x.half() if backend.half else x)
        outputs = recorder.features()
    finally:
        recorder.remove()
    return [stage.to_nchw(out).float().cpu() for stage, out in zip(stages, outputs)]


def pick_channels(maps: Sequence[torch.Tensor], index: int, k: int) -> list[tuple[torch.Tensor, list[int], list[float]]]:
    """For image `index`: per stage, its k strongest channels by mean activation (maps, channel
    indices, means), strongest first."""
    picked = []
    for fmap in maps:
        means = fmap[index].mean(dim=(1, 2))
        order = torch.argsort(means, descending=True, stable=True)[: min(k, len(means))]
        picked.append((fmap[index, order].clone(), order.tolist(), means[order].tolist()))
    return picked


def stage_row_top(row: int) -> int:
    """The y pixel where the tiles of stage `row` start in a grid (the left edge of channel j: LEFT + j * (TILE + GAP))."""
    return TILE + 2 * GAP + row * (TILE + LABEL_H + GAP)


def feature_map_grid(view: torch.Tensor, picked: Sequence[tuple[torch.Tensor, list[int], list[float]]],
                     stages: Sequence[Stage], lines: Sequence[str]) -> tuple[Image.Image, PngInfo]:
    """The grid of one image: the input and the label on top, then a row per stage (its label,
    then its strongest channels on one colour scale, each with its index and mean).

    Returns:
        (the RGB image, PNG text info listing the stages and channels drawn, under PNG_KEY).
    """
    k = max((len(ch) for _, ch, _ in picked), default=1)
    font = load_font(11)
    check_glyphs(lines)
    height = TILE + 2 * GAP + len(picked) * (TILE + LABEL_H + GAP) + GAP
    text_width = TILE + 4 * GAP + max((int(font.getlength(line)) for line in lines), default=0)
    grid = Image.new("RGB", (max(LEFT + k * (TILE + GAP) + GAP, text_width), height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    grid.paste(Image.fromarray(to_hwc_rgb(view)).resize((TILE, TILE), Image.BILINEAR), (GAP, GAP))
    for j, line in enumerate(lines):
        draw.text((TILE + 3 * GAP, GAP + 14 * j), line, fill=(200, 0, 0) if j == 0 else (0, 0, 0), font=font)
    info = []
    for row, ((maps, channels, means), stage) in enumerate(zip(picked, stages)):
        y = stage_row_top(row)
        low, high = float(maps.min()), float(maps.max())
        scaled = (maps - low) / (high - low) if high > low else torch.full_like(maps, 0.5)
        for j, text in enumerate((stage.label, stage.name[-14:], f"{maps.shape[1]}x{maps.shape[2]}")):
            draw.text((GAP, y + 4 + 14 * j), text, fill=(0, 0, 0), font=font)
        for col, (channel, mean) in enumerate(zip(channels, means)):
            x = LEFT + col * (TILE + GAP)
            grid.paste(Image.fromarray(heatmap_colors(scaled[col].numpy())).resize((TILE, TILE), Image.NEAREST), (x, y))
            draw.text((x, y + TILE + 1), f"c{channel} {mean:.2f}", fill=(0, 0, 0), font=font)
        info.append({"stage": stage.label, "module": stage.name, "map": list(maps.shape[1:]), "channels": channels,
                     "means": [round(m, 6) for m in means]})
    png = PngInfo()
    png.add_text(PNG_KEY, json.dumps(info))
    return grid, png


def save_grid(view: torch.Tensor, picked: Sequence[tuple[torch.Tensor, list[int], list[float]]], stages: Sequence[Stage],
              lines: Sequence[str], dest: Path) -> None:
    """Draw one image's grid and write it as a PNG (with the PNG_KEY text chunk)."""
    grid, png = feature_map_grid(view, picked, stages, lines)
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest, format="PNG", pnginfo=png, compress_level=1)


class FeatureMapWriter:
    """predict.py --feature_maps K: the stages of a PyTorch backend's model, and a grid per image.

    Args:
        backend: the model (utils.infer.backends.TorchBackend).
        k: channels drawn per stage.
    """

    def __init__(self, backend: Any, k: int) -> None:
        spec = backend.meta.preprocess
        self.backend, self.k = backend, k
        self.stages = find_stages(backend.model, spec.crop, spec.channels)

    def describe(self) -> str:
        """'layer1 (stride 4), layer2 (stride 8) ...'"""
        return ", ".join(f"{s.name} ({s.label})" for s in self.stages)

    def submit(self, inputs: np.ndarray, rows: Sequence[dict[str, Any]], rels: Sequence[Path], folder: Path,
               submit: Callable[..., None]) -> None:
        """Record the stages for a uint8 batch (TenCrop: its centre crop) and hand each image's grid
        to `submit(fn, *args)` (predict.py's image-writing thread), as folder/<rel>.png."""
        from utils.infer.rows import label_text, output_name

        images = torch.from_numpy(np.ascontiguousarray(inputs if inputs.ndim == 4 else inputs[:, 4]))  # TenCrop: centre
        maps = stage_maps(self.backend, self.stages, images)
        for n, (row, rel) in enumerate(zip(rows, rels)):
            lines = [label_text(row), self.backend.meta.model_name, f"{self.k} strongest channels per stage",
                     "(by mean activation)"]
            submit(save_grid, images[n], pick_channels(maps, n, self.k), self.stages, lines,
                   folder / output_name(rel, keep_formats=(".png",)))
