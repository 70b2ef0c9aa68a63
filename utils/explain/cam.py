"""Class activation maps (the grad-cam package) for any timm or torchvision classifier.

    layer = find_cam_layer(model, image_size=224, channels=3)           # or name="layer3"
    maps = cam_maps(model, images, layer, "GradCAM", class_indices)     # (N, H, W) in [0, 1]
    panel = cam_panel(view, maps[0], ["cat 0.97"])                      # PIL image: input | overlay | label

`images` are the model's normalised float inputs. The target layer is found by running the model
once on a dummy input: for a timm model, the module that produces `forward_features`' output
(the last feature stage); otherwise the last module with an image-shaped output before the
pooling and classifier. Vision transformers use the first norm of their last block (the class
token is mixed with the patch tokens there; after it, only the class token reaches the head), with
the class/prefix tokens dropped and the patch tokens reshaped to their grid. Channels-last outputs
(timm's swin) are permuted to channels-first.

A map that says nothing (NaN, or constant: e.g. all zero when nothing at the layer supports the
class) is reported (a warning, or DegenerateCAMError with on_degenerate="raise") before it is
cleaned up for drawing, never silently drawn as a blank heatmap. EigenCAM's principal component
is oriented so that the salient region is positive (an SVD's sign is arbitrary).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import io
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from utils.core.log import UserError
from utils.core.names import CAM_TYPES
from utils.draw.fonts import check_glyphs
from utils.draw.labels import load_font
from utils.explain.probe import Record, probe, zero_input

if TYPE_CHECKING:  # torch is imported where a map is computed: the names and drawing work without it
    import torch
    from torch import nn

LOGGER = logging.getLogger(__name__)

# --cam_type name -> grad-cam class name (the names pytorch-classifier used).
def _pooling_types() -> tuple[type, ...]:
    """Modules whose outputs are pooled or flattened: never a CAM layer."""
    from torch import nn

    return nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout
_TOKEN_NORMS = ("norm1", "ln_1")  # first norm of a timm / torchvision transformer block


# ------------------------------------------------------------------------------ reshapes
class TokensToNCHW:
    """(B, prefix + H*W, C) transformer tokens -> (B, C, H, W): drop class/prefix tokens, make the grid."""

    def __init__(self, prefix: int, height: int, width: int) -> None:
        self.prefix, self.height, self.width = prefix, height, width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.prefix:, :]
        return x.reshape(x.shape[0], self.height, self.width, x.shape[2]).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokensToNCHW(prefix={self.prefix}, grid={self.height}x{self.width})"


class NHWCToNCHW:
    """Channels-last feature maps (timm's swin) -> channels-first."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return "NHWCToNCHW()"


@dataclass
class CamLayer:
    """The layer a CAM is computed on, and how its output becomes (B, C, H, W)."""

    name: str
    module: nn.Module
    layout: str  # "NCHW", "NHWC" or "tokens"
    shape: tuple[int, ...]  # output shape for one input
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def describe(self) -> str:
        return f"{self.name} ({type(self.module).__name__}, output {tuple(self.shape[1:])}, {self.layout})"


def output_layout(shape: Sequence[int], model: nn.Module) -> str | None:
    """tokens / NCHW / NHWC for a layer output shape (inputs are square, so the grid is H == W)."""
    if len(shape) == 3:
        return "tokens"
    if len(shape) != 4:
        return None
    _, a, b, c = shape
    if b == c and a != b:
        return "NCHW"
    if a == b and b != c:
        return "NHWC"
    return "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"


def _spatial(shape: Sequence[int], layout: str) -> int:
    return shape[2] * shape[3] if layout == "NCHW" else shape[1] * shape[2]


def _make_layer(model: nn.Module, record: Record) -> CamLayer:
    shape = record.shape
    layout = output_layout(shape, model)
    if layout is None:
        raise UserError(f"--cam_layer {record.name}: its output has shape {shape}; a CAM needs an image-shaped "
                        "(B, C, H, W) or token (B, N, C) output; choose another layer")
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    if layout == "tokens":
        tokens = shape[1]
        prefix = getattr(model, "num_prefix_tokens", None)
        if not isinstance(prefix, int) or prefix >= tokens:
            prefix = tokens - math.isqrt(tokens) ** 2  # class (and register) tokens come first
        side = math.isqrt(tokens - prefix)
        if side * side != tokens - prefix or side == 0:
            raise UserError(f"--cam_layer {record.name}: {tokens} tokens do not form a square patch grid "
                            f"after {prefix} prefix token(s); choose another layer")
        transform = TokensToNCHW(prefix, side, side)
    elif layout == "NHWC":
        transform = NHWCToNCHW()
    return CamLayer(record.name, record.module, layout, shape, transform)


def _is_candidate(record: Record, model: nn.Module) -> bool:
    if isinstance(record.module, _pooling_types()) or type(record.module).__name__ in ("SelectAdaptivePool2d", "ClassifierHead"):
        return False
    return output_layout(record.shape, model) is not None


def module_names(model: nn.Module) -> list[str]:
    """Every sub-module name (what --cam_layer accepts)."""
    return [name for name, _ in model.named_modules() if name]


def find_cam_layer(model: nn.Module, image_size: int, channels: int = 3, name: str | None = None) -> CamLayer:
    """The layer to explain: `name` if given, else the last feature stage (see the module docstring).

    Args:
        model: the classifier (any device; left in eval mode).
        image_size: the model's square input size.
        channels: its input channels.
        name: a module name from model.named_modules() (--cam_layer), or None to choose.

    Returns:
        The CamLayer, with the reshape its output needs.

    Raises:
        UserError: an unknown name (with close matches) or a layer whose output is not a map.
    """
    from torch import nn

    model.eval()
    x = zero_input(model, image_size, channels)
    records, _ = probe(model, lambda: model(x))
    if name:
        modules = dict(model.named_modules())
        if name not in modules or not name:
            close = difflib.get_close_matches(name, module_names(model), n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--cam_layer '{name}' is not a module of {type(model).__name__}{hint} "
                            "(names as in model.named_modules(), e.g. layer4 or blocks.11.norm1)")
        mine = [r for r in records if r.name == name]
        if not mine:
            raise UserError(f"--cam_layer '{name}' is not run by the model's forward pass (or returns no tensor); choose another layer")
        return _make_layer(model, mine[-1])

    chosen: Record | None = None
    # timm: the module whose output *is* forward_features' output (the last one to finish: the outermost
    # container, not an in-place activation inside it)
    if callable(getattr(model, "forward_features", None)):
        try:
            feat_records, feats = probe(model, lambda: model.forward_features(x))
        except Exception:  # noqa: BLE001 - a model whose forward_features needs more; fall back below
            feat_records, feats = [], None
        same = [r for r in feat_records if r.output is feats and not isinstance(r.module, nn.Identity)]
        if same:
            by_name = {r.name: r for r in records}
            chosen = by_name.get(same[-1].name, same[-1])
    if chosen is None:
        candidates = [r for r in records if _is_candidate(r, model)]
        if not candidates:
            raise UserError(f"cannot find an image-shaped layer in {type(model).__name__} for a CAM: pass --cam_layer NAME")
        chosen = candidates[-1]
    layout = output_layout(chosen.shape, model)
    if layout == "tokens":
        norms = [r for r in records if r.name.rsplit(".", 1)[-1] in _TOKEN_NORMS and r.output.ndim == 3]
        if norms:
            chosen = norms[-1]
    elif layout is not None and _spatial(chosen.shape, layout) == 1:
        # At small input sizes the last stage is 1x1 and its map says nothing: take the last layer
        # before it that still has a grid.
        index = next(i for i, r in enumerate(records) if r.name == chosen.name)
        earlier = [r for r in records[:index] if _is_candidate(r, model)
                   and output_layout(r.shape, model) == layout and _spatial(r.shape, layout) > 1]
        depth = chosen.name.count(".")
        # prefer a whole stage (a sibling of the chosen layer, or one level down) to a layer inside a block
        earlier = [r for r in earlier if r.name.count(".") <= depth + 1] or earlier
        if earlier:
            LOGGER.info("CAM: %s is 1x1 at %d px; explaining %s instead (set --cam_layer to choose)",
                        chosen.name, image_size, earlier[-1].name)
            chosen = earlier[-1]
    return _make_layer(model, chosen)


# ---------------------------------------------------------------------------------- maps
def import_grad_cam() -> Any:
    """The grad-cam package (imported on first use: it takes seconds and pulls OpenCV and SciPy)."""
    from utils.core.device import import_torch

    import_torch("a class activation map (--cam_visual)")
    try:
        import pytorch_grad_cam
    except ImportError as err:
        raise UserError(f"Grad-CAM needs the optional grad-cam package ({err}): pip install 'grad-cam>=1.5' "
                        "(or pip install -r requirements/extras.txt)") from None
    return pytorch_grad_cam


def _cam_class(cam_type: str) -> Any:
    pytorch_grad_cam = import_grad_cam()
    if cam_type not in CAM_TYPES:
        raise UserError(f"unknown --cam_type '{cam_type}'; choose one of {', '.join(CAM_TYPES)}")
    if cam_type == "EigenCAM":
        return _oriented_eigencam(pytorch_grad_cam.EigenCAM)
    return getattr(pytorch_grad_cam, cam_type)


def orient_projection(projection: np.ndarray) -> np.ndarray:
    """Fix the arbitrary sign of EigenCAM's first principal component, per image.

    An SVD returns v or -v depending on the LAPACK build (pytorch-grad-cam issue #315): the flipped
    map highlights the background. The salient region is the one farther from the mean, so each
    (H, W) projection is flipped when its most negative value outweighs its most positive one
    (as grad-cam's newer get_2d_projection_with_sign_correction does).
    """
    projection = np.array(projection, dtype=np.float32, copy=True)
    flat = projection.reshape(projection.shape[0], -1)
    flip = np.abs(flat.min(axis=1)) > np.abs(flat.max(axis=1))
    projection[flip] *= -1.0
    return projection


_ORIENTED: dict[Any, Any] = {}


def _oriented_eigencam(eigen_cam: Any) -> Any:
    """grad-cam's EigenCAM with orient_projection applied to its projection."""
    if eigen_cam not in _ORIENTED:
        class OrientedEigenCAM(eigen_cam):
            def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
                return orient_projection(super().get_cam_image(*args, **kwargs))

        _ORIENTED[eigen_cam] = OrientedEigenCAM
    return _ORIENTED[eigen_cam]


class DegenerateCAMError(ValueError):
    """A CAM that says nothing: NaN/infinite values, or a constant map.

    Attributes:
        reasons: {image index in the batch: why its map is degenerate}.
    """

    def __init__(self, message: str, reasons: dict[int, str]) -> None:
        super().__init__(message)
        self.reasons = reasons


def degenerate_reason(cam: np.ndarray, tolerance: float = 1e-6) -> str | None:
    """Why a raw (unclipped) map is degenerate, or None if it is a usable map.

    Non-finite values (NaN or inf) and maps without variation (all zero: no positive evidence for the
    class at this layer; or any other constant) are degenerate.
    """
    cam = np.asarray(cam)
    finite = np.isfinite(cam)
    if not finite.all():
        nan, inf = int(np.isnan(cam).sum()), int(np.isinf(cam).sum())
        return f"not finite ({nan} NaN, {inf} infinite of {cam.size} values)"
    if cam.size == 0:
        return "empty"
    low, high = float(cam.min()), float(cam.max())
    if high - low <= tolerance:
        return "all zero (no positive evidence for the class at this layer)" if abs(high) <= tolerance else f"constant ({high:.4g})"
    return None


def cam_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: CamLayer | str | None,
    cam_type: str,
    class_indices: Sequence[int],
    batch_size: int = 32,
    on_degenerate: str = "warn",
    raw: bool = False,
) -> np.ndarray:
    """Class activation maps of a batch.

    Args:
        model: the classifier (float32 or float16; on any device; gradients are enabled here even if
            the caller runs under no_grad, and the parameters' requires_grad flags are restored).
        images: normalised float inputs (N, C, H, W).
        layer: a CamLayer from find_cam_layer, a module name, or None to choose automatically.
        cam_type: one of CAM_TYPES.
        class_indices: the class to explain, one per image.
        batch_size: forward passes per batch inside ScoreCAM and AblationCAM.
        on_degenerate: what to do when a map is degenerate (NaN/infinite, or constant, see
            degenerate_reason), checked on the raw maps before any clean-up: "warn" (log one
            warning naming the images), "raise" (DegenerateCAMError) or "ignore".
        raw: return grad-cam's maps as they are (NaN or values outside [0, 1] kept), for checks.

    Returns:
        float32 (N, H, W) maps of the input's size: in [0, 1] with NaN as 0 (unless raw).
    """
    import torch

    if on_degenerate not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_degenerate must be warn, raise or ignore, got {on_degenerate!r}")
    cam_class = _cam_class(cam_type)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(class_indices) != len(images):
        raise ValueError(f"one class per image: {len(class_indices)} classes for {len(images)} images")
    param = next(model.parameters())
    copied = param.dtype != torch.float32
    if copied:
        model = copy.deepcopy(model).float()  # gradients and SVDs in float16 lose the map
        param = next(model.parameters())
    if not isinstance(layer, CamLayer):
        layer = find_cam_layer(model, images.shape[-1], images.shape[1], layer)
    elif copied:
        layer = dataclasses.replace(layer, module=model.get_submodule(layer.name))
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    targets = [ClassifierOutputTarget(int(c)) for c in class_indices]
    # a caller under torch.inference_mode() (a server) still gets gradients here
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().to(param.device, torch.float32).clone()
        maps = _run_cam(model, x, layer, cam_type, cam_class, targets, batch_size, flags)
    maps = np.asarray(maps, dtype=np.float32)
    reasons = {i: r for i, cam in enumerate(maps) if (r := degenerate_reason(cam)) is not None}
    if reasons and on_degenerate != "ignore":
        shown = "; ".join(f"image {i} (class {int(class_indices[i])}): {r}" for i, r in list(reasons.items())[:5])
        more = f"; ... {len(reasons) - 5} more" if len(reasons) > 5 else ""
        message = (f"{cam_type} on layer {layer.name}: {len(reasons)} of {len(maps)} map(s) degenerate, "
                   f"they show nothing: {shown}{more}")
        if on_degenerate == "raise":
            raise DegenerateCAMError(message, reasons)
        LOGGER.warning("%s (try another --cam_layer or --cam_type)", message)
    if raw:
        return maps
    maps = np.nan_to_num(maps, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(maps, 0.0, 1.0)


def _run_cam(model: nn.Module, x: torch.Tensor, layer: CamLayer, cam_type: str, cam_class: Any, targets: list[Any],
             batch_size: int, flags: list[bool]) -> np.ndarray:
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

    try:
        # Gradients w.r.t. activations only: no weight gradients are computed or stored.
        for p in model.parameters():
            p.requires_grad_(False)
        x.requires_grad_(True)
        if cam_type == "FullGrad":
            # FullGrad ignores the layer: it sums the bias gradients of every Conv2d / BatchNorm2d (NCHW)
            cam = cam_class(model, [])
        elif cam_type == "AblationCAM":
            # AblationLayerVit ablates the last dimension: the channels of tokens and of NHWC maps
            ablation = AblationLayer() if layer.layout == "NCHW" else AblationLayerVit()
            cam = AblationCAM(model, [layer.module], reshape_transform=layer.reshape_transform,
                              ablation_layer=ablation, batch_size=batch_size)
        else:
            cam = cam_class(model, [layer.module], reshape_transform=layer.reshape_transform)
            cam.batch_size = batch_size  # ScoreCAM's masked forward passes
        try:
            # grad-cam draws a progress bar per image for ScoreCAM / AblationCAM, and FullGrad prints
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                return cam(input_tensor=x, targets=targets)
        finally:
            cam.activations_and_grads.release()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------- drawing
_JET: np.ndarray | None = None


def heatmap_colors(cam: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> uint8 (H, W, 3) jet colours."""
    global _JET
    if _JET is None:
        from matplotlib import colormaps

        _JET = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return _JET[np.clip(np.rint(cam * 255), 0, 255).astype(np.int64)]


def overlay(view: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image blended with the jet heatmap of `cam` (H, W in [0, 1])."""
    heat = heatmap_colors(cam).astype(np.float32)
    return np.clip(view.astype(np.float32) * (1 - alpha) + heat * alpha, 0, 255).astype(np.uint8)


def to_hwc_rgb(view: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) tensor (C = 1 or 3) -> uint8 (H, W, 3)."""
    arr = view.detach().cpu().numpy() if hasattr(view, "detach") else np.asarray(view)
    arr = np.transpose(arr, (1, 2, 0)) if arr.ndim == 3 and arr.shape[0] in (1, 3) else arr
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr.astype(np.uint8)


def cam_panel(view: torch.Tensor | np.ndarray, cam: np.ndarray, lines: Sequence[str], size: int = 224) -> Image.Image:
    """The model's input view, the heatmap overlay and the label, side by side.

    Args:
        view: what the model saw, uint8 (C, H, W).
        cam: its map (H, W) in [0, 1].
        lines: text for the label panel (class, probability, CAM type ...).
        size: height of the panel in pixels (small inputs are enlarged to it).

    Returns:
        An RGB image of width 3 * size.
    """
    rgb = to_hwc_rgb(view)
    image = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    heat = Image.fromarray(overlay(rgb, cam)).resize((size, size), Image.BILINEAR)
    panel = Image.new("RGB", (size * 3, size), (255, 255, 255))
    panel.paste(image, (0, 0))
    panel.paste(heat, (size, 0))
    draw = ImageDraw.Draw(panel)
    font_size = max(10, size // 12)
    font = load_font(font_size)
    check_glyphs(lines)
    y = font_size // 2
    for k, line in enumerate(lines):
        draw.text((2 * size + font_size // 2, y), line, fill=(0, 0, 0) if k else (200, 0, 0), font=font)
        y += int(font_size * 1.4)
    return panel
