"""TFLite (LiteRT): converted by litert-torch from the PyTorch model, float32, float16 weights
and (--int8) int8 calibrated on training images with ai-edge-quantizer; run by ai-edge-litert's
interpreter on numpy.

    files = export(ctx)                                  # best.tflite, best_fp16.tflite (+ best_int8.tflite with --int8)
    backend = Backend(Path("best.tflite"), Device("cpu"))   # uint8 batch -> float32 logits, no torch needed

The input stays NCHW float32 ("images", as every exported model here takes), so a phone app feeds
the normalised image; the int8 file takes and returns int8 tensors with their scale and zero point
in the file (the runtime here quantizes and dequantizes with them). The float16 file stores its
weights in float16 and computes in float32. The metadata lives in the JSON beside the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from utils.core.device import Device, compute_threads
from utils.core.log import UserError
from utils.deploy.context import ExportContext, calibration_batches, quiet_native
from utils.deploy.runtime import NumpyBackend, import_runtime, read_export_info

LOGGER = logging.getLogger(__name__)

SIGNATURE = "serving_default"  # the one signature litert-torch writes


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """best.tflite (float32) and best_fp16.tflite; with --int8 also best_int8.tflite."""
    import litert_torch

    litert_torch.config.show_progress = ctx.options.verbose
    file = ctx.file(".tflite", "fp32")
    with quiet_native(ctx.options.verbose):
        converted = litert_torch.convert(ctx.model_cpu, (ctx.example(False, _cpu()),))
        converted.export(str(file))
    files = [(_finish(ctx, file, "fp32", {}), "fp32")]
    fp16 = ctx.file(".tflite", "fp16")
    _quantize(file, fp16, _fp16_recipe(), None, ctx.options.verbose)
    files.append((_finish(ctx, fp16, "fp16", {"weights": "float16", "compute": "float32"}), "fp16"))
    if ctx.options.int8:
        from ai_edge_quantizer import recipe

        int8 = ctx.file(".tflite", "int8")
        batches = ({_input_name(file): x} for x in calibration_batches(ctx, ctx.options.batch))
        _quantize(file, int8, recipe.static_wi8_ai8(), batches, ctx.options.verbose)
        settings = {"calibration": ctx.calibration[1], "recipe": "static_wi8_ai8 (ai-edge-quantizer: int8 weights and "
                    "activations, min-max)", "io": "int8 with the scale and zero point of the file"}
        files.append((_finish(ctx, int8, "int8", {"int8": settings}), "int8"))
    return files


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _finish(ctx: ExportContext, file: Path, precision: str, extra: dict[str, Any]) -> Path:
    info = ctx.describe("tflite", file, precision, False, {"tflite": {"signature": SIGNATURE, **extra}})
    info["input"]["dtype"] = info["output"]["dtype"] = "int8" if precision == "int8" else "float32"
    ctx.write_info(file, info)
    return file


def _input_name(file: Path) -> str:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(str(file)).get_signature_list()[SIGNATURE]["inputs"][0]


def _fp16_recipe() -> Any:
    """Float16 weights, float32 compute (ai-edge-quantizer's float casting)."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                   algorithm_key=AlgorithmName.FLOAT_CASTING)
    return manager.get_quantization_recipe()


def _quantize(source: Path, target: Path, recipe: Any, calibration: Any, verbose: bool) -> None:
    """Apply an ai-edge-quantizer recipe to the float32 file (calibrated when batches are given)."""
    from ai_edge_quantizer import quantizer

    with quiet_native(verbose):
        quant = quantizer.Quantizer(str(source))
        quant.load_quantization_recipe(recipe)
        ranges = quant.calibrate({SIGNATURE: list(calibration)}) if calibration is not None else None
        quant.quantize(ranges).export_model(str(target), overwrite=True)


class Backend(NumpyBackend):
    """A .tflite model run by ai-edge-litert's interpreter (XNNPACK) on the CPU; the batch size is
    set to each call's (the file is traced at one batch, its batch dimension resizes).

    Args:
        file: the .tflite file.
        device: only the CPU is used; a CUDA device is reported and ignored.
        half: refused by the format table.
    """

    model_type = "tflite"

    def __init__(self, file: Path, device: Any, half: bool = False) -> None:
        interpreter = import_runtime("ai_edge_litert.interpreter", "tflite")
        if device.type != "cpu":
            LOGGER.warning("TFLite runs %s on the CPU here", file.name)
        try:
            self.interpreter = interpreter.Interpreter(str(file), num_threads=compute_threads())
        except Exception as err:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError for bad files
            raise UserError(f"{file} cannot be loaded by LiteRT ({str(err).splitlines()[0][:200]})") from None
        self.inp, self.out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        super().__init__(file, read_export_info(file), [None, *map(int, self.inp["shape"][1:])])
        self.rows = -1  # the batch the tensors are allocated for
        self.device = Device("cpu")

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self.rows:
            self.interpreter.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self.rows = x.shape[0]
        self.interpreter.set_tensor(self.inp["index"], _quantized(x, self.inp))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.out["index"])
        if out.dtype != np.float32:  # int8 output: dequantize with the file's scale and zero point
            scale, zero = self.out["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out


def _quantized(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A float batch as the input tensor's type: itself for float32, else quantized with its scale and zero point."""
    if detail["dtype"] == np.float32:
        return x.astype(np.float32, copy=False)
    scale, zero = detail["quantization"]
    limits = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), limits.min, limits.max).astype(detail["dtype"])
