"""Export a trained checkpoint to TorchScript, ONNX (float32, float16, int8), OpenVINO and TensorRT,
and check every exported file against PyTorch.

    results = export_checkpoint("runs/exp/best.pt", ExportOptions(formats=["onnx", "openvino"]))

The formats are a table (EXPORT_FORMATS: name, flag, suffix, where it runs) with one function
each, after ultralytics' exporter. Before export the model is put in its deploy form:
re-parameterisable blocks (RepVGG, RepGhost, MobileOne ...) are merged by timm's
`reparameterize_model`, then every BatchNorm that directly follows a convolution is folded into
it; the outputs are compared before and after, and a step that changes them is undone.

Every exported model takes the normalised float batch -- images resized and cropped as
`preprocess` says, scaled to [0, 1], minus mean, divided by std, shape (N, C, H, W), input name
"images" -- and returns the logits (N, num_classes), output name "logits". The class names and the
preprocessing travel with the file (ONNX metadata_props, a TorchScript extra file, OpenVINO
rt_info) and in a JSON beside it (best.onnx -> best.onnx.json), which also records the parity check.

Parity: PyTorch (the checkpoint as trained, float32, CPU) and the exported file (through
utils.infer.backends, as metrice.py and predict.py run it) predict the same real images; the largest
difference of the class probabilities and the top-1 agreement must stay within PARITY_TOLERANCE.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import importlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from prettytable import PrettyTable
from torch import nn

from utils.core.checkpoint import load_checkpoint
from utils.core.device import select_device
from utils.core.files import atomic_write_text, remove_stale_temps, temp_prefix
from utils.core.log import UserError
from utils.core.names import DEFAULT_OPSET, EXPORT_NAMES
from utils.core.schema import FORMAT, VERSION, Checkpoint, ModelMeta, PreprocessSpec
from utils.data.loaders import ImageDataset, collate
from utils.data.sources import scan_split
from utils.data.transforms import Normalize, eval_transform
from utils.data.transforms_np import probabilities
from utils.infer.backends import EXPORT_DIR, MODEL_TYPES, load_backend
from utils.infer.runtimes import EXPORT_INFO_KEY, export_info_path
from utils.models.weights import model_from_checkpoint

LOGGER = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "logits"
MAX_OPSET = 20
TENSORRT_MAX_BATCH = 32  # largest batch of a dynamic TensorRT engine when --batch_size is not given

# What "the exported model agrees with PyTorch" means, per precision: the largest absolute
# difference of any class probability, and the fraction of images with the same top-1 class.
PARITY_TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-4},
    "fp16": {"max_abs_diff": 1e-2},
    "int8": {"top1_agreement": 0.95},
}


@dataclass
class ExportOptions:
    """What to export and how (export.py's flags).

    Args:
        formats: flags of EXPORT_FORMATS (torchscript, onnx, openvino, tensorrt).
        device: '' (GPU if any, else CPU), cpu, or a GPU index.
        batch_size: the batch the model is traced with; without `dynamic`, the only batch it takes.
        dynamic: any batch size (the default when batch_size is None).
        half: float16 (CUDA only).
        int8: also write an int8 ONNX model (onnxruntime static quantization).
        simplify: run onnxslim on the ONNX graph.
        opset: ONNX opset.
        workspace: TensorRT builder workspace in GiB.
        verbose: the exporters' own logs.
        val_path: images for the parity check ('' = the run's val split, else test, else train).
        train_path: calibration images for int8 ('' = the run's train split).
        parity_images: how many images the parity check runs.
        calibration_images: how many images calibrate int8.
        output_dir: where the files go ('' = <run>/export).
    """

    formats: Sequence[str] = ("onnx",)
    device: str = ""
    batch_size: int | None = None
    dynamic: bool = False
    half: bool = False
    int8: bool = False
    simplify: bool = False
    opset: int = DEFAULT_OPSET
    workspace: float = 4.0
    verbose: bool = False
    val_path: str = ""
    train_path: str = ""
    parity_images: int = 64
    calibration_images: int = 300
    output_dir: str = ""

    @property
    def is_dynamic(self) -> bool:
        return self.dynamic or self.batch_size is None

    @property
    def batch(self) -> int:
        return self.batch_size or 1


@dataclass
class ExportFormat:
    """One row of the exporter table."""

    name: str            # how it is called in messages
    flag: str            # the --export value (and the --model_type of metrice.py / predict.py)
    suffix: str          # file suffix
    cpu: bool            # runs on the CPU
    gpu: bool            # runs on a CUDA GPU
    packages: tuple[str, ...]  # what the export needs (import names)
    function: Callable[["ExportContext"], Path]


@dataclass
class ExportContext:
    """Everything an exporter function needs, and the ONNX file it may share with the next one."""

    options: ExportOptions
    device: torch.device
    model: nn.Module                 # deploy form, on the device, float16 with --half
    model_cpu: nn.Module             # deploy form, float32, CPU
    meta: ModelMeta                  # the checkpoint's model description
    info: dict[str, Any]             # what every export records (source, deploy steps, versions)
    out_dir: Path
    stem: str
    temp_dir: Path
    onnx_files: dict[tuple[bool, str], Path] = field(default_factory=dict)  # (half, device type) -> ONNX

    @property
    def precision(self) -> str:
        return "fp16" if self.options.half else "fp32"

    def file(self, suffix: str, precision: str | None = None) -> Path:
        """best.onnx, best_fp16.onnx, best_int8.onnx ..."""
        precision = precision or self.precision
        return self.out_dir / f"{self.stem}{'' if precision == 'fp32' else '_' + precision}{suffix}"

    def example(self, half: bool, device: torch.device) -> torch.Tensor:
        c, s = self.meta.image_channel, self.meta.image_size
        return torch.zeros(self.options.batch, c, s, s, device=device, dtype=torch.float16 if half else torch.float32)


# ---------------------------------------------------------------------------- deploy form
_BN_TYPES: tuple[type, ...] = (nn.BatchNorm2d,)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm after folding it into the convolution before it: nothing, or the
    dropout + activation of timm's BatchNormAct2d."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(bn.drop, bn.act)


def _foldable_bn(module: nn.Module) -> bool:
    if type(module) is nn.BatchNorm2d:
        return True
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return False
    return type(module) is BatchNormAct2d


def fuse_conv_bn(model: nn.Module, example: torch.Tensor) -> int:
    """Fold each BatchNorm that directly follows a convolution into it, in place (eval mode).

    Which BatchNorm follows which convolution is observed on one forward pass (hooks, no graph
    tracing): a pair is folded when the BatchNorm's input is exactly the convolution's output and
    each runs once. Plain nn.Conv2d only (weight-standardised and other special convolutions are
    left alone). The caller checks that the outputs did not change.

    Args:
        model: the model, in eval mode.
        example: an input batch.

    Returns:
        How many pairs were folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep outputs alive so no two tensors share an id during the pass
    calls: Counter = Counter()
    pairs: list[tuple[str | None, str]] = []
    hooks = []

    def conv_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name
                alive.append(output)
        return hook

    def bn_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any) -> None:
            calls[name] += 1
            pairs.append((produced.get(id(inputs[0])), name))
        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif _foldable_bn(module):
            hooks.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        alive.clear()
    fused = 0
    for conv_name, bn_name in pairs:
        if conv_name is None or calls[conv_name] != 1 or calls[bn_name] != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            continue
        model.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        model.set_submodule(bn_name, _bn_replacement(bn))
        fused += 1
    return fused


def reparameterize(model: nn.Module) -> tuple[nn.Module, int]:
    """Switch re-parameterisable blocks (RepVGG, RepGhost, MobileOne, LeViT's fused layers ...) to
    their deploy form with timm's `reparameterize_model` (a copy).

    Returns:
        (the deploy model, how many blocks had a deploy form).
    """
    blocks = sum(1 for m in model.modules() if m is not model and any(
        callable(getattr(m, a, None)) for a in ("fuse", "reparameterize", "switch_to_deploy")))
    if not blocks:
        return model, 0
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model).eval(), blocks


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    return probabilities(model(x), multilabel)


def deploy_model(model: nn.Module, x: torch.Tensor, tolerance: float = PARITY_TOLERANCE["fp32"]["max_abs_diff"]
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """The model in its deploy form (a copy): re-parameterised, then conv+bn folded, each step kept
    only when the class probabilities stay within `tolerance` of the original's on `x`.

    Args:
        model: the trained model (float32, CPU, eval mode).
        x: a normalised float batch (real images).
        tolerance: largest allowed probability difference.

    Returns:
        (deploy model, report: reparameterized, fused_conv_bn, max_abs_diff, notes).
    """
    ref = _probs(model, x)
    report: dict[str, Any] = {"reparameterized": 0, "fused_conv_bn": 0, "max_abs_diff": 0.0, "notes": []}
    current = model
    try:
        rep, blocks = reparameterize(model)
    except Exception as err:  # noqa: BLE001 - a third-party block without a working deploy form
        rep, blocks = model, 0
        report["notes"].append(f"re-parameterisation failed ({type(err).__name__}: {err}); exported as trained")
    if blocks:
        diff = (_probs(rep, x) - ref).abs().max().item()
        if diff <= tolerance:
            current, report["reparameterized"], report["max_abs_diff"] = rep, blocks, diff
        else:
            report["notes"].append(f"re-parameterisation changed the outputs (max |dp| {diff:.2e}); exported as trained")
    fused = copy.deepcopy(current)
    pairs = fuse_conv_bn(fused, x[:1])
    if pairs:
        diff = (_probs(fused, x) - ref).abs().max().item()
        if diff <= tolerance:
            current, report["fused_conv_bn"], report["max_abs_diff"] = fused, pairs, diff
        else:
            report["notes"].append(f"conv+bn folding changed the outputs (max |dp| {diff:.2e}); left unfolded")
    for p in current.parameters():
        p.requires_grad_(False)
    return current.eval(), report


# ------------------------------------------------------------------------------- images
def _split_candidates(ckpt: Checkpoint, override: str, keys: Sequence[str]) -> list[tuple[str, str]]:
    if override:
        return [("given", override)]
    args = ckpt.args
    return [(k.removesuffix("_path"), str(args[k])) for k in keys if args.get(k)]


def load_split_images(ckpt: Checkpoint, override: str, keys: Sequence[str], limit: int
                      ) -> tuple[list[tuple[str, int]], str]:
    """Up to `limit` image samples, spread evenly over the first split folder that exists.

    Args:
        ckpt: the checkpoint (its args name the run's splits).
        override: a folder given on the command line ('' = use the run's).
        keys: the run's split options to try in order (val_path, test_path, train_path).
        limit: most samples.

    Returns:
        (samples, description such as '64 val images from dataset/val'); no samples when no folder exists.
    """
    for split, folder in _split_candidates(ckpt, override, keys):
        if not Path(folder).exists():
            if split == "given":
                raise UserError(f"image folder not found: {folder}")
            continue
        image_set = scan_split(folder, class_names=ckpt.meta.class_names, what=f"{split} set",
                               list_sep=ckpt.args.get("list_sep"))
        samples = image_set.samples
        if len(samples) > limit:
            pick = np.linspace(0, len(samples) - 1, limit).round().astype(int)
            samples = [samples[i] for i in pick]
        name = "" if split == "given" else f"{split} "
        return samples, f"{len(samples)} {name}images from {folder}"
    return [], ""


def load_batch(samples: Sequence[tuple[str, int]], spec: PreprocessSpec) -> torch.Tensor:
    """The uint8 batch (N, C, H, W) of the samples through the test-time transform."""
    dataset = ImageDataset([(path, 0) for path, _ in samples], eval_transform(spec), spec.channels)  # labels unused
    batch = collate([dataset[i] for i in range(len(dataset))])
    for path, reason in batch["failed"]:
        LOGGER.warning("skipped %s: %s", path, reason)
    return batch["images"]


# ------------------------------------------------------------------------------- metadata
def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("torch", *packages):
        try:
            out[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            pass
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file beside it, then rename)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def export_info(ctx: ExportContext, model_type: str, file: Path, precision: str, dynamic: bool,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of one exported file: the model (class names, preprocessing), its input and
    output, how it was exported."""
    meta = ctx.meta
    c, s, k = meta.image_channel, meta.image_size, meta.num_classes
    batch: Any = "batch" if dynamic else ctx.options.batch
    dtype = "float16" if precision == "fp16" else "float32"
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_type": model_type,
        "file": file.name,
        **meta.to_dict(),
        "resize_mode": meta.preprocess.resize_mode,
        "input": {"name": INPUT_NAME, "shape": [batch, c, s, s], "dtype": dtype, "layout": "NCHW",
                  "value": "(pixel / 255 - mean) / std, after the resize and crop of preprocess"},
        "output": {"name": OUTPUT_NAME, "shape": [batch, k], "dtype": dtype, "value": "logits (softmax for probabilities)"},
        "precision": precision,
        "dynamic": dynamic,
        "batch_size": ctx.options.batch,
        **ctx.info,
        **(extra or {}),
    }


def onnx_metadata(info: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props (strings): the model description as flat keys, and the whole export JSON."""
    flat = {k: info[k] for k in ("model_name", "num_classes", "image_size", "image_channel", "resize_mode", "precision")}
    return {
        **{k: str(v) for k, v in flat.items()},
        "class_names": json.dumps(info["class_names"], ensure_ascii=False),
        "mean": json.dumps(info["mean"]), "std": json.dumps(info["std"]),
        "preprocess": json.dumps(info["preprocess"]),
        "input": json.dumps(info["input"]),
        EXPORT_INFO_KEY: json.dumps(info, ensure_ascii=False),
    }


# ------------------------------------------------------------------------------ exporters
@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporters' deprecation and tracer warnings unless --verbose (torch.jit and the
    TorchScript-based ONNX exporter are deprecated by PyTorch but still work in the pinned version)."""
    with warnings.catch_warnings():
        if verbose:
            yield
            return
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's quantization tools print progress
            yield


def onnx_export(model: nn.Module, example: torch.Tensor, file: Path, opset: int, dynamic: bool, verbose: bool) -> None:
    """torch.onnx.export with the TorchScript-based exporter (dynamo=False): it needs no extra
    package, works offline and handles timm/torchvision CNNs; the dynamo exporter would need onnxscript."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with quiet(verbose):
        torch.onnx.export(model, (example,), str(file), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True, verbose=verbose)


def finish_onnx(file: Path, info: dict[str, Any], simplify: bool, verbose: bool) -> None:
    """Simplify (onnxslim), attach the metadata, run onnx.checker's full check, save."""
    import onnx

    model = onnx.load(str(file))
    if simplify:
        import onnxslim

        slim = onnxslim.slim(model, verbose=verbose)
        if slim is not None:
            model = slim
    onnx.helper.set_model_props(model, onnx_metadata(info))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"onnx.checker rejected {file.name}: {str(err).splitlines()[0]}") from None
    onnx.save(model, str(file))


def export_torchscript(ctx: ExportContext) -> Path:
    """TorchScript by torch.jit.trace; the metadata rides in the file as meta.json."""
    file = ctx.file(".torchscript")
    info = export_info(ctx, "torchscript", file, ctx.precision, True)
    with quiet(ctx.options.verbose):
        traced = torch.jit.trace(ctx.model, ctx.example(ctx.options.half, ctx.device), strict=False)
        torch.jit.save(traced, str(file), _extra_files={"meta.json": json.dumps(info, ensure_ascii=False)})
    write_json(export_info_path(file), info)
    return file


def export_onnx(ctx: ExportContext) -> Path:
    """ONNX (float32, or float16 with --half, exported on the GPU)."""
    file = ctx.file(".onnx")
    opts = ctx.options
    onnx_export(ctx.model, ctx.example(opts.half, ctx.device), file, opts.opset, opts.is_dynamic, opts.verbose)
    info = export_info(ctx, "onnx", file, ctx.precision, opts.is_dynamic,
                       {"opset": opts.opset, "simplified": opts.simplify})
    finish_onnx(file, info, opts.simplify, opts.verbose)
    write_json(export_info_path(file), info)
    ctx.onnx_files[(opts.half, ctx.device.type)] = file
    return file


def intermediate_onnx(ctx: ExportContext, half: bool) -> Path:
    """An ONNX file for OpenVINO or TensorRT: the one this call exported, or a temporary one."""
    device = ctx.device if half else torch.device("cpu")
    for (file_half, _), file in ctx.onnx_files.items():
        if file_half == half:
            return file
    file = ctx.temp_dir / f"{ctx.stem}{'_fp16' if half else ''}.onnx"
    model = ctx.model if half else ctx.model_cpu
    onnx_export(model, ctx.example(half, device), file, ctx.options.opset, ctx.options.is_dynamic, ctx.options.verbose)
    ctx.onnx_files[(half, device.type)] = file
    return file


def export_openvino(ctx: ExportContext) -> Path:
    """OpenVINO IR (.xml + .bin) converted from the float32 ONNX; --half stores the weights in float16."""
    import openvino as ov

    file = ctx.file(".xml")
    info = export_info(ctx, "openvino", file, ctx.precision, ctx.options.is_dynamic, {"opset": ctx.options.opset})
    model = ov.convert_model(str(intermediate_onnx(ctx, half=False)))
    model.set_rt_info(json.dumps(info, ensure_ascii=False), [EXPORT_INFO_KEY, "export_info"])
    ov.save_model(model, str(file), compress_to_fp16=ctx.options.half)
    write_json(export_info_path(file), info)
    return file


def export_tensorrt(ctx: ExportContext) -> Path:
    """A TensorRT engine built from the ONNX file (TensorRT 8.6+ Python API); FP16 with --half.

    float32 engines are built without TF32, so they match PyTorch's float32 outputs. A dynamic
    engine takes batches of 1 to --batch_size (TENSORRT_MAX_BATCH without it).
    """
    import tensorrt as trt

    opts = ctx.options
    onnx_file = intermediate_onnx(ctx, half=opts.half)
    file = ctx.file(".engine")
    logger = trt.Logger(trt.Logger.VERBOSE if opts.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_file.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace * (1 << 30)))
    if opts.half:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    c, s = ctx.meta.image_channel, ctx.meta.image_size
    max_batch = opts.batch_size or TENSORRT_MAX_BATCH
    if opts.is_dynamic:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, (1, c, s, s), (max(1, max_batch // 2), c, s, s), (max_batch, c, s, s))
        config.add_optimization_profile(profile)
    with torch.cuda.device(ctx.device):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (rerun with --verbose for its log)")
    with open(file, "wb") as fh:
        fh.write(serialized)
    info = export_info(ctx, "tensorrt", file, ctx.precision, opts.is_dynamic,
                       {"opset": opts.opset, "max_batch": max_batch if opts.is_dynamic else opts.batch,
                        "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(ctx.device)})
    write_json(export_info_path(file), info)
    return file


EXPORT_FORMATS: dict[str, ExportFormat] = {f.flag: f for f in (
    ExportFormat("TorchScript", "torchscript", ".torchscript", True, True, (), export_torchscript),
    ExportFormat("ONNX", "onnx", ".onnx", True, True, ("onnx", "onnxruntime"), export_onnx),
    ExportFormat("OpenVINO", "openvino", ".xml", True, False, ("onnx", "openvino"), export_openvino),
    ExportFormat("TensorRT", "tensorrt", ".engine", False, True, ("onnx", "tensorrt"), export_tensorrt),
)}
assert set(EXPORT_FORMATS) == set(MODEL_TYPES) - {"torch"} == set(EXPORT_NAMES), "every exported format needs a backend"


def formats_table() -> PrettyTable:
    """The exporter table as a person reads it."""
    table = PrettyTable(["format", "--export", "suffix", "CPU", "GPU", "needs"])
    for f in EXPORT_FORMATS.values():
        table.add_row([f.name, f.flag, f.suffix, "yes" if f.cpu else "-", "yes" if f.gpu else "-", " ".join(f.packages) or "torch"])
    table.align = "l"
    return table


# ------------------------------------------------------------------------------ int8
class _CalibrationReader:
    """Feeds onnxruntime's calibration: normalised float batches of training images."""

    def __init__(self, samples: Sequence[tuple[str, int]], spec: PreprocessSpec, batch: int) -> None:
        self.samples, self.spec, self.batch = list(samples), spec, batch
        self.normalize = Normalize(spec.mean, spec.std)
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.samples), self.batch):
            images = load_batch(self.samples[start:start + self.batch], self.spec)
            if len(images) == 0:
                continue
            if len(images) < self.batch:  # a fixed-batch model takes only full batches: repeat images to fill it
                images = images.repeat(-(-self.batch // len(images)), 1, 1, 1)[: self.batch]
            yield {INPUT_NAME: self.normalize(images).numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_int8(ctx: ExportContext, onnx_file: Path, samples: Sequence[tuple[str, int]], described: str) -> Path:
    """Statically quantize the float32 ONNX model with onnxruntime (QDQ format, int8 per-channel
    weights, uint8 activations, min-max calibration on training images).

    Weights use 7-bit range (reduce_range) so the model stays exact on CPUs without VNNI
    instructions, as onnxruntime advises.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    file = ctx.file(".onnx", "int8")
    reader_impl = _CalibrationReader(samples, ctx.meta.preprocess, ctx.options.batch if not ctx.options.is_dynamic else 16)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader_impl.get_next()

        def rewind(self) -> None:
            reader_impl.rewind()

    prepared = ctx.temp_dir / "int8_prepared.onnx"
    settings = {"per_channel": True, "reduce_range": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                "calibrate_method": "MinMax", "quant_format": "QDQ"}
    with quiet(ctx.options.verbose):
        try:
            quant_pre_process(str(onnx_file), str(prepared))
            source = prepared
        except Exception as err:  # noqa: BLE001 - pre-processing is an optimisation; quantize without it
            LOGGER.info("int8: onnxruntime pre-processing skipped (%s)", str(err).splitlines()[0][:120])
            source = onnx_file
        quantize_static(str(source), str(file), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    info = export_info(ctx, "onnx", file, "int8", ctx.options.is_dynamic,
                       {"opset": ctx.options.opset, "simplified": ctx.options.simplify,
                        "int8": {"calibration": described, **settings}})
    info["input"]["dtype"] = info["output"]["dtype"] = "float32"  # quantize/dequantize nodes are inside the graph
    finish_onnx(file, info, False, ctx.options.verbose)
    write_json(export_info_path(file), info)
    return file


# ------------------------------------------------------------------------------ parity
def parity_report(reference: torch.Tensor, probs: torch.Tensor, precision: str) -> dict[str, Any]:
    """Compare class probabilities (N, K) of the exported model with PyTorch's.

    Args:
        reference: PyTorch's probabilities.
        probs: the exported model's.
        precision: fp32, fp16 or int8 (chooses the tolerance).

    Returns:
        {ok, images, max_abs_diff, top1_agreement, tolerance, precision}; ok is False past the
        tolerance or on any non-finite output.
    """
    tol = PARITY_TOLERANCE[precision]
    if probs.shape != reference.shape:
        return {"ok": False, "images": int(reference.shape[0]), "max_abs_diff": None, "top1_agreement": None,
                "tolerance": tol, "precision": precision, "error": f"output shape {tuple(probs.shape)} != {tuple(reference.shape)}"}
    diff = (probs.float() - reference.float()).abs().max().item()
    agree = int((probs.argmax(dim=1) == reference.argmax(dim=1)).sum()) / max(1, reference.shape[0])  # exact: 19/20 == 0.95
    ok = bool(torch.isfinite(probs).all()) and diff <= tol.get("max_abs_diff", float("inf")) \
        and agree >= tol.get("top1_agreement", 0.0)
    return {"ok": ok, "images": int(reference.shape[0]), "max_abs_diff": diff, "top1_agreement": agree,
            "tolerance": tol, "precision": precision}


def describe_tolerance(tol: dict[str, float]) -> str:
    parts = []
    if "max_abs_diff" in tol:
        parts.append(f"max |dp| <= {tol['max_abs_diff']:g}")
    if "top1_agreement" in tol:
        parts.append(f"top-1 agreement >= {tol['top1_agreement']:.0%}")
    return " and ".join(parts)


def check_parity(file: Path, model_type: str, precision: str, images: torch.Tensor, reference: torch.Tensor,
                 device: torch.device) -> dict[str, Any]:
    """Run the exported file through utils.infer.backends (as metrice.py / predict.py do) on `images` and
    compare with PyTorch. ONNX and OpenVINO files are checked on the CPU, where their float32
    arithmetic is exact; TorchScript and TensorRT on the export device."""
    run_on = device if model_type in ("torchscript", "tensorrt") else torch.device("cpu")
    try:
        backend = load_backend(file, model_type, run_on)
        logits = torch.cat([backend(images[i:i + 64]) for i in range(0, len(images), 64)])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the runtime cannot run the file: report, do not crash
        return {"ok": None, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", "precision": precision,
                "tolerance": PARITY_TOLERANCE[precision]}
    report = parity_report(reference, probabilities(logits, backend.meta.multilabel), precision)
    report["device"] = str(run_on)
    return report


# ------------------------------------------------------------------------------ checks
def check_request(opts: ExportOptions) -> torch.device:
    """Refuse what cannot work before doing any work: unknown formats, missing packages, --half or
    TensorRT without a CUDA GPU, --int8 without ONNX.

    Returns:
        The export device.
    """
    unknown = [f for f in opts.formats if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"unknown --export '{unknown[0]}'; choose from {', '.join(EXPORT_FORMATS)}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {opts.batch_size}")
    if not 7 <= opts.opset <= MAX_OPSET:
        raise UserError(f"--opset {opts.opset} is not supported: use 7 to {MAX_OPSET} (default {DEFAULT_OPSET})")
    if opts.parity_images < 1 or opts.calibration_images < 1:
        raise UserError("--parity_images and --calibration_images must be positive")
    if opts.int8 and "onnx" not in opts.formats:
        raise UserError("--int8 quantizes the ONNX model: add onnx to --export (e.g. --export onnx --int8)")
    if opts.int8 and opts.half:
        raise UserError("--int8 and --half exclude each other: choose one precision")
    device = select_device(opts.device)
    if "tensorrt" in opts.formats:
        if device.type != "cuda":
            why = "this machine has none" if not torch.cuda.is_available() else f"--device {opts.device} is not one"
            raise UserError(f"--export tensorrt needs a CUDA GPU, and {why}: export onnx or openvino here, and build the "
                            "engine on the GPU machine that will run it (python export.py --export tensorrt --device 0)")
        if importlib.util.find_spec("tensorrt") is None:
            raise UserError("--export tensorrt needs the tensorrt package: pip install tensorrt (on the GPU machine)")
    if opts.half and device.type != "cuda":
        raise UserError("--half exports float16 models and needs a CUDA GPU (float16 on a CPU is slow and inexact): "
                        "drop --half, or pass --device 0 on a GPU machine")
    needed = {p for f in opts.formats for p in EXPORT_FORMATS[f].packages if p != "tensorrt"}
    needed |= {"onnxslim"} if opts.simplify and "onnx" in opts.formats else set()
    missing = sorted(p for p in needed if importlib.util.find_spec(p) is None)
    if missing:
        raise UserError(f"--export {' '.join(opts.formats)} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    if opts.simplify and "onnx" not in opts.formats:
        LOGGER.warning("--simplify applies to ONNX only; ignored for %s", ", ".join(opts.formats))
    return device


# ------------------------------------------------------------------------------ export
def parity_images(ckpt: Checkpoint, opts: ExportOptions) -> tuple[torch.Tensor, str]:
    """The uint8 images the parity check runs: up to --parity_images of the run's val split (else
    test, else train, or --val_path), or seeded random images when no folder is found.

    Returns:
        (images (N, C, H, W), a description for messages and the JSON).
    """
    spec = ckpt.meta.preprocess
    samples, described = load_split_images(ckpt, opts.val_path, ("val_path", "test_path", "train_path"), opts.parity_images)
    images = load_batch(samples, spec) if samples else torch.empty(0)
    if len(images):
        return images, described
    LOGGER.warning("no val/test/train images found (pass --val_path FOLDER): the parity check uses %d random images",
                   opts.parity_images)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (opts.parity_images, spec.channels, spec.crop, spec.crop), generator=gen, dtype=torch.uint8)
    return images, f"{opts.parity_images} random images (no image folder found)"


def export_checkpoint(weights: str | Path, opts: ExportOptions) -> list[dict[str, Any]]:
    """Export a checkpoint of this toolkit in every format of `opts.formats`, checking each file
    against PyTorch.

    Args:
        weights: best.pt (or any checkpoint this toolkit wrote).
        opts: the options.

    Returns:
        One export info dict per file written (with its "parity" report).

    Raises:
        UserError: a request that cannot work, a failed export, or a parity failure (the files are
            kept and their JSON says "parity": {"ok": false}).
    """
    device = check_request(opts)
    weights = Path(weights)
    ckpt = load_checkpoint(weights, what="checkpoint")
    meta = ckpt.meta
    spec, channels = meta.preprocess, meta.image_channel
    out_dir = Path(opts.output_dir) if opts.output_dir else weights.parent / EXPORT_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_path {out_dir} is a file: pass a folder")
    check_targets(out_dir, weights.stem, opts)
    t0 = time.time()

    images, described = parity_images(ckpt, opts)
    calibration: list[tuple[str, int]] = []
    calibration_described = ""
    if opts.int8:  # before any work: int8 without calibration images cannot be done
        calibration, calibration_described = load_split_images(ckpt, opts.train_path, ("train_path",), opts.calibration_images)
        if not calibration:
            raise UserError("--int8 needs calibration images and the run's train split is not here: pass --train_path FOLDER")
    print(f"export {weights} ({meta.model_name}, {meta.num_classes} classes, {channels}x{meta.image_size}x"
          f"{meta.image_size}, epoch {ckpt.epoch}) on {device}; parity on {described}", flush=True)

    trained = model_from_checkpoint(ckpt)
    x = Normalize(spec.mean, spec.std)(images)
    with torch.no_grad():
        reference = torch.cat([_probs(trained, x[i:i + 64], meta.multilabel) for i in range(0, len(x), 64)])
    model_cpu, deploy = deploy_model(trained, x)
    for note in deploy["notes"]:
        LOGGER.warning("deploy form: %s", note)
    print(f"deploy form: {deploy['reparameterized']} block(s) re-parameterised, {deploy['fused_conv_bn']} conv+bn pair(s) "
          f"folded; max |dp| vs the trained model {deploy['max_abs_diff']:.1e}", flush=True)
    model = copy.deepcopy(model_cpu).to(device)
    if opts.half:
        model.half()
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cuda":  # float32 checks against PyTorch's CPU result: no TF32 shortcuts
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    packages = sorted({p for f in opts.formats for p in EXPORT_FORMATS[f].packages})
    base_info = {
        "source": {"checkpoint": str(weights), "epoch": ckpt.epoch, "best": ckpt.best, "metrics": ckpt.metrics},
        "deploy": {k: deploy[k] for k in ("reparameterized", "fused_conv_bn")},
        "versions": _versions(*packages),
        "exported": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "parity_images": described,
    }
    results: list[dict[str, Any]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # files are made in a staging folder beside their place and moved in whole (os.replace):
        # a reader never sees half a file, and two exports at once never read each other's
        remove_stale_temps(out_dir)
        with tempfile.TemporaryDirectory(prefix=temp_prefix("export"), dir=out_dir) as tmp:
            _export_all(opts, device, model, model_cpu, meta, base_info, out_dir, weights.stem, Path(tmp), calibration,
                        calibration_described, images, reference, results)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    _print_summary(results, out_dir, time.time() - t0)
    failed = [r for r in results if r["parity"].get("ok") is False]
    if failed:
        names = ", ".join(f"{r['file']} (max |dp| {_fmt(r['parity'].get('max_abs_diff'))}, top-1 "
                          f"{_pct(r['parity'].get('top1_agreement'))}; allowed {describe_tolerance(r['parity']['tolerance'])})"
                          for r in failed)
        raise UserError(f"parity check failed for {names}: the file(s) are kept in {out_dir} and flagged "
                        "\"parity\": {\"ok\": false} in their JSON; do not deploy them")
    return results


def _export_all(opts: ExportOptions, device: torch.device, model: nn.Module, model_cpu: nn.Module, meta: ModelMeta,
                info: dict[str, Any], out_dir: Path, stem: str, temp_dir: Path, calibration: list[tuple[str, int]],
                calibration_described: str, images: torch.Tensor, reference: torch.Tensor, results: list[dict[str, Any]]) -> None:
    """Each format in table order (ONNX before the formats built from it), each file checked in the
    staging folder `temp_dir`, then moved into `out_dir`."""
    work = temp_dir / "work"  # intermediate files that are not kept
    work.mkdir()
    ctx = ExportContext(opts, device, model, model_cpu, meta, info, temp_dir, stem, work)
    for flag in [f for f in EXPORT_FORMATS if f in opts.formats]:
        fmt = EXPORT_FORMATS[flag]
        files = [(_run_exporter(fmt, ctx), ctx.precision)]
        if flag == "onnx" and opts.int8:
            started = time.time()
            onnx_file = files[0][0]
            files.append((_run_step(f"{fmt.name} int8", opts.verbose,
                                    lambda: quantize_int8(ctx, onnx_file, calibration, calibration_described)), "int8"))
            LOGGER.info("int8: calibrated on %s (%.1fs)", calibration_described, time.time() - started)
        for file, precision in files:
            results.append(_check_and_record(file, fmt, precision, images, reference, device, out_dir / file.name))
    # every file into place at the end: a later format may be built from an earlier one (OpenVINO from ONNX)
    for result in results:
        commit_export(temp_dir / Path(result["path"]).name, out_dir)


def export_files(file: Path) -> list[Path]:
    """An exported model's files: the model (and OpenVINO's .bin), then the JSON beside it."""
    extra = [file.with_suffix(".bin")] if file.suffix == ".xml" else []
    return [file, *extra, export_info_path(file)]


def commit_export(staged: Path, out_dir: Path) -> Path:
    """Move a staged export into `out_dir`, each file by an atomic rename; returns its new path."""
    for part in export_files(staged):
        os.replace(part, out_dir / part.name)
    return out_dir / staged.name


def is_our_export(file: Path) -> bool:
    """Whether `file` was written by export.py (its JSON beside carries our format tag)."""
    try:
        info = json.loads(export_info_path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def check_targets(out_dir: Path, stem: str, opts: ExportOptions) -> None:
    """Refuse to overwrite a file in `out_dir` that export.py did not write.

    Raises:
        UserError: naming the file and what to do.
    """
    precision = "fp16" if opts.half else "fp32"
    names = []
    for flag in opts.formats:
        suffix = EXPORT_FORMATS[flag].suffix
        names.append(f"{stem}{'' if precision == 'fp32' else '_' + precision}{suffix}")
        if flag == "onnx" and opts.int8:
            names.append(f"{stem}_int8.onnx")
    for name in names:
        for part in export_files(out_dir / name):
            if part.exists() and not is_our_export(out_dir / name):
                raise UserError(f"{part} exists and was not written by export.py: export.py only replaces its own "
                                "files; move it away or pass another --output_path")


def _run_step(what: str, verbose: bool, fn: Callable[[], Path]) -> Path:
    """Run an export step; a failure of the exporting library becomes one clear line."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.onnx, onnx, openvino, tensorrt raise many types
        if verbose:
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UserError(f"{what} export failed: {type(err).__name__}: {first} (rerun with --verbose for the details)") from None


def _run_exporter(fmt: ExportFormat, ctx: ExportContext) -> Path:
    started = time.time()
    file = _run_step(fmt.name, ctx.options.verbose, lambda: fmt.function(ctx))
    LOGGER.info("%s: %s (%.1fs)", fmt.name, file.name, time.time() - started)
    return file


def _check_and_record(file: Path, fmt: ExportFormat, precision: str, images: torch.Tensor, reference: torch.Tensor,
                      device: torch.device, final: Path) -> dict[str, Any]:
    """The parity check of a staged file, written into its JSON and printed as one line under the
    path it will have (`final`)."""
    json_file = export_info_path(file)
    info = json.loads(json_file.read_text(encoding="utf-8"))
    parity = check_parity(file, fmt.flag, precision, images, reference, device)
    info["parity"] = parity
    write_json(json_file, info)
    if parity.get("ok") is None:
        LOGGER.warning("%s: parity not checked (%s)", final.name, parity["skipped"])
        verdict = "not checked"
    else:
        verdict = "ok" if parity["ok"] else "FAILED"
        print(f"{final}: parity vs PyTorch on {parity['images']} images: max |dp| {_fmt(parity['max_abs_diff'])}, "
              f"top-1 agreement {_pct(parity['top1_agreement'])} (allowed: {describe_tolerance(parity['tolerance'])}): {verdict}",
              flush=True)
    return info | {"path": str(final), "size_mb": _size_mb(file), "verdict": verdict}


def _size_mb(file: Path) -> float:
    size = file.stat().st_size
    if file.suffix == ".xml" and file.with_suffix(".bin").exists():
        size += file.with_suffix(".bin").stat().st_size
    return size / 1e6


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _print_summary(results: list[dict[str, Any]], out_dir: Path, seconds: float) -> None:
    table = PrettyTable(["format", "file", "MB", "precision", "batch", "max |dp|", "top-1 agree", "parity"])
    table.title = f"export: {out_dir} ({seconds:.1f}s)"
    for r in results:
        p = r["parity"]
        table.add_row([r["model_type"], r["file"], f"{r['size_mb']:.1f}", r["precision"],
                       "dynamic" if r["dynamic"] else r["batch_size"], _fmt(p.get("max_abs_diff")),
                       _pct(p.get("top1_agreement")), r["verdict"]])
    table.align = "l"
    print(table, flush=True)
