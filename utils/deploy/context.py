"""What an exporter is handed: the options of export.py, the model in its deploy form, and helpers
that name its files and write the metadata every exported file carries.

    def export(ctx: ExportContext) -> list[tuple[Path, str]]:      # a format module's exporter
        file = ctx.file(".onnx")                                     # best.onnx (best_fp16.onnx with --half)
        ...
        ctx.write_info(file, ctx.info("onnx", file, ctx.precision, dynamic=True))
        return [(file, ctx.precision)]

Every exported model takes the normalised float batch -- images resized and cropped as `preprocess`
says, scaled to [0, 1], minus mean, divided by std, shape (N, C, H, W), input name "images" -- and
returns the logits (N, num_classes), output name "logits".
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from utils.core.files import atomic_write_text
from utils.core.names import DEFAULT_OPSET
from utils.core.schema import FORMAT, VERSION, Checkpoint, ModelMeta, PreprocessSpec
from utils.deploy.formats import info_path

if TYPE_CHECKING:
    import torch
    from torch import nn

LOGGER = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class ExportOptions:
    """What to export and how (export.py's flags).

    Args:
        formats: --export values (utils.deploy.formats.EXPORT_FLAGS).
        device: '' (GPU if any, else CPU), cpu, or a GPU index.
        batch_size: the batch the model is traced with; without `dynamic`, the only batch it takes.
        dynamic: any batch size (the default when batch_size is None).
        half: float16 (CUDA only).
        int8: also write an int8 model of the formats that quantize (ONNX).
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

    @property
    def precision(self) -> str:
        """fp16 with --half, else fp32 (int8 files are written besides, by the formats that quantize)."""
        return "fp16" if self.half else "fp32"


@dataclass
class ExportContext:
    """Everything an exporter needs, and the ONNX files the formats built from ONNX share.

    Attributes:
        options: export.py's options.
        device: the export device.
        model: the deploy form (re-parameterised, conv+bn folded), on the device, float16 with --half.
        model_cpu: the deploy form, float32, CPU.
        trained: the model as trained (float32, CPU): for formats that must rebuild it by name (the Hub folder).
        checkpoint: the checkpoint exported.
        info: what every export records (source, deploy steps, versions, parity images).
        out_dir: the staging folder the files are written into.
        stem: the checkpoint's stem (best).
        temp_dir: a folder for intermediate files that are not kept.
        calibration: int8 calibration samples [(path, target)] and their description.
        onnx_files: (float16?, device type) -> an ONNX file already exported by this call.
    """

    options: ExportOptions
    device: torch.device
    model: nn.Module
    model_cpu: nn.Module
    trained: nn.Module
    checkpoint: Checkpoint
    info: dict[str, Any]
    out_dir: Path
    stem: str
    temp_dir: Path
    calibration: tuple[list[tuple[str, Any]], str] = ([], "")
    onnx_files: dict[tuple[bool, str], Path] = field(default_factory=dict)

    @property
    def meta(self) -> ModelMeta:
        return self.checkpoint.meta

    @property
    def precision(self) -> str:
        return self.options.precision

    def file(self, suffix: str, precision: str | None = None) -> Path:
        """best.onnx, best_fp16.onnx, best_int8.onnx ... in the staging folder."""
        precision = precision or self.precision
        return self.out_dir / f"{self.stem}{'' if precision == 'fp32' else '_' + precision}{suffix}"

    def example(self, half: bool, device: torch.device) -> torch.Tensor:
        """A zero input batch of the model's shape (the traced batch size)."""
        import torch

        c, s = self.meta.image_channel, self.meta.image_size
        return torch.zeros(self.options.batch, c, s, s, device=device, dtype=torch.float16 if half else torch.float32)

    def describe(self, model_type: str, file: Path, precision: str, dynamic: bool,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metadata of one exported file: the model (class names, preprocessing), its input and
        output, how it was exported."""
        meta = self.meta
        c, s, k = meta.image_channel, meta.image_size, meta.num_classes
        batch: Any = "batch" if dynamic else self.options.batch
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
            "batch_size": self.options.batch,
            **self.info,
            **(extra or {}),
        }

    @staticmethod
    def write_info(file: Path, info: dict[str, Any]) -> None:
        """The JSON beside an exported file (best.onnx -> best.onnx.json), written atomically."""
        write_json(info_path(file), info)


def load_batch(samples: Sequence[tuple[str, Any]], spec: PreprocessSpec) -> torch.Tensor:
    """The uint8 batch (N, C, H, W) of image samples through the test-time transform (the images of a
    parity check, a calibration batch); a file that fails to decode is left out with a warning."""
    from utils.data.loaders import ImageDataset, collate
    from utils.data.transforms import eval_transform

    dataset = ImageDataset([(path, 0) for path, _ in samples], eval_transform(spec), spec.channels)  # labels unused
    batch = collate([dataset[i] for i in range(len(dataset))])
    for path, reason in batch["failed"]:
        LOGGER.warning("skipped %s: %s", path, reason)
    return batch["images"]


def calibration_batches(ctx: ExportContext, batch: int) -> Iterator[np.ndarray]:
    """The int8 calibration images (ctx.calibration: drawn from the run's training split) as
    normalised float32 batches of exactly `batch` images (the last filled by repeating its images:
    a fixed-batch model takes only full batches), the input every exported model takes. Shared by
    the formats that quantize (ONNX, TFLite)."""
    from utils.data.transforms import Normalize

    samples, spec = list(ctx.calibration[0]), ctx.meta.preprocess
    normalize = Normalize(spec.mean, spec.std)
    for start in range(0, len(samples), batch):
        images = load_batch(samples[start:start + batch], spec)
        if len(images) == 0:
            continue
        if len(images) < batch:
            images = images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
        yield normalize(images).numpy()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file beside it, then rename)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


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


@contextlib.contextmanager
def quiet_native(verbose: bool) -> Iterator[None]:
    """`quiet`, and the converters' own output to the process's stdout and stderr (pnnx, LiteRT and
    coremltools print from C++ and through progress bars) kept in a temporary file, unless --verbose.
    The file's tail is logged at debug level."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as log, quiet(False), contextlib.redirect_stderr(io.StringIO()):
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            log.seek(0)
            LOGGER.debug("converter output: %s", log.read()[-2000:].decode("utf-8", "replace"))
