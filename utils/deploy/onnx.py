"""ONNX: float32, float16 (--half, exported on a GPU) and int8 (--int8, onnxruntime static
quantization calibrated on training images), run by ONNX Runtime on numpy.

    files = export(ctx)                                   # best.onnx (+ best_int8.onnx with --int8), each with its .json
    backend = Backend(Path("best.onnx"), Device("cpu"))   # uint8 numpy batch -> float32 logits, no torch needed

OpenVINO and TensorRT are built from the ONNX file (onnx_file_for). The metadata rides in the
file's metadata_props and in the JSON beside it. The runtime imports neither torch nor the
exporters: a deployment machine needs numpy, Pillow and onnxruntime.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from utils.core.device import compute_threads
from utils.core.log import UserError
from utils.deploy.context import INPUT_NAME, OUTPUT_NAME, ExportContext, calibration_batches, quiet
from utils.deploy.runtime import EXPORT_INFO_KEY, NumpyBackend, import_runtime, read_export_info

if TYPE_CHECKING:
    import torch
    from torch import nn

LOGGER = logging.getLogger(__name__)

MAX_OPSET = 20  # the TorchScript-based exporter writes up to opset 20


# ------------------------------------------------------------------------------ export
def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """ONNX (float32, or float16 with --half, exported on the GPU); with --int8 also the int8 model."""
    file = ctx.file(".onnx")
    opts = ctx.options
    onnx_export(ctx.model, ctx.example(opts.half, ctx.device), file, opts.opset, opts.is_dynamic, opts.verbose)
    info = ctx.describe("onnx", file, ctx.precision, opts.is_dynamic, {"opset": opts.opset, "simplified": opts.simplify})
    finish_onnx(file, info, opts.simplify, opts.verbose)
    ctx.write_info(file, info)
    ctx.onnx_files[(opts.half, ctx.device.type)] = file
    files = [(file, ctx.precision)]
    if opts.int8:
        started = time.time()
        files.append((quantize_int8(ctx, file), "int8"))
        LOGGER.info("int8: calibrated on %s (%.1fs)", ctx.calibration[1], time.time() - started)
    return files


def onnx_export(model: nn.Module, example: torch.Tensor, file: Path, opset: int, dynamic: bool, verbose: bool) -> None:
    """torch.onnx.export with the TorchScript-based exporter (dynamo=False): it needs no extra
    package, works offline and handles timm/torchvision CNNs; the dynamo exporter would need onnxscript."""
    import torch

    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with quiet(verbose):
        torch.onnx.export(model, (example,), str(file), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True, verbose=verbose)


def onnx_metadata(info: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props (strings): the model description as flat keys, and the whole export JSON."""
    flat = {k: info[k] for k in ("model_name", "num_classes", "image_size", "image_channel", "resize_mode", "precision")}
    return {
        **{k: str(v) for k, v in flat.items()},
        "class_names": json.dumps(info["class_names"], ensure_ascii=False),
        "mean": json.dumps(info["mean"]), "std": json.dumps(info["std"]),
        "preprocess": json.dumps(info["preprocess"]),
        "input": json.dumps(info["input"]), "output": json.dumps(info["output"]),
        EXPORT_INFO_KEY: json.dumps(info, ensure_ascii=False),
    }


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


def onnx_file_for(ctx: ExportContext, half: bool) -> Path:
    """An ONNX file for a format built from ONNX (OpenVINO, TensorRT): the one this call exported,
    or a temporary one."""
    import torch

    device = ctx.device if half else torch.device("cpu")
    for (file_half, _), file in ctx.onnx_files.items():
        if file_half == half:
            return file
    file = ctx.temp_dir / f"{ctx.stem}{'_fp16' if half else ''}.onnx"
    model = ctx.model if half else ctx.model_cpu
    onnx_export(model, ctx.example(half, device), file, ctx.options.opset, ctx.options.is_dynamic, ctx.options.verbose)
    ctx.onnx_files[(half, device.type)] = file
    return file


# ------------------------------------------------------------------------------ int8
class _CalibrationReader:
    """Feeds onnxruntime's calibration: normalised float batches of training images (context.calibration_batches)."""

    def __init__(self, ctx: ExportContext, batch: int) -> None:
        self.ctx, self.batch = ctx, batch
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        return ({INPUT_NAME: x} for x in calibration_batches(self.ctx, self.batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_int8(ctx: ExportContext, onnx_file: Path) -> Path:
    """Statically quantize the float32 ONNX model with onnxruntime (QDQ format, int8 per-channel
    weights, uint8 activations, min-max calibration on training images).

    Weights use 7-bit range (reduce_range) so the model stays exact on CPUs without VNNI
    instructions, as onnxruntime advises.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    file = ctx.file(".onnx", "int8")
    reader_impl = _CalibrationReader(ctx, ctx.options.batch if not ctx.options.is_dynamic else 16)

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
    info = ctx.describe("onnx", file, "int8", ctx.options.is_dynamic,
                        {"opset": ctx.options.opset, "simplified": ctx.options.simplify,
                         "int8": {"calibration": ctx.calibration[1], **settings}})
    info["input"]["dtype"] = info["output"]["dtype"] = "float32"  # quantize/dequantize nodes are inside the graph
    finish_onnx(file, info, False, ctx.options.verbose)
    ctx.write_info(file, info)
    return file


# ------------------------------------------------------------------------------ runtime
class Backend(NumpyBackend):
    """An ONNX model run by onnxruntime: the CUDA provider on a CUDA device when onnxruntime-gpu
    is installed, else the CPU.

    Args:
        file: the .onnx file.
        device: a torch.device or utils.core.device.Device (cpu or cuda).
        half: refused by the format table (a float16 model is exported with export.py --half).
    """

    model_type = "onnx"

    def __init__(self, file: Path, device: Any, half: bool = False) -> None:
        ort = import_runtime("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's model
        options.intra_op_num_threads = compute_threads()  # one thread setting (OMP_NUM_THREADS) for every backend
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                LOGGER.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu): running %s on the CPU", file.name)
        try:
            self.session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise UserError(f"{file} cannot be loaded by onnxruntime ({str(err).splitlines()[0][:200]})") from None
        embedded = self.session.get_modelmeta().custom_metadata_map.get(EXPORT_INFO_KEY)
        inp = self.session.get_inputs()[0]
        super().__init__(file, read_export_info(file, embedded), inp.shape)
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.providers = self.session.get_providers()
        self.device = device

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
