"""OpenVINO IR (.xml + .bin): converted from the float32 ONNX file, run by OpenVINO on the CPU, on numpy.

    files = export(ctx)                                     # best.xml + best.bin (+ best.xml.json)
    backend = Backend(Path("best.xml"), Device("cpu"))      # no torch needed

--half stores the weights in float16 (OpenVINO computes in float32). The metadata rides in the
model's rt_info and in the JSON beside it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from utils.core.device import Device, compute_threads
from utils.core.log import UserError
from utils.deploy.context import ExportContext
from utils.deploy.onnx import onnx_file_for
from utils.deploy.runtime import EXPORT_INFO_KEY, NumpyBackend, import_runtime, read_export_info

LOGGER = logging.getLogger(__name__)

RT_INFO_PATH = [EXPORT_INFO_KEY, "export_info"]  # where the metadata lives in the model's rt_info


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """OpenVINO IR converted from the float32 ONNX; --half stores the weights in float16."""
    import openvino as ov

    file = ctx.file(".xml")
    info = ctx.describe("openvino", file, ctx.precision, ctx.options.is_dynamic, {"opset": ctx.options.opset})
    model = ov.convert_model(str(onnx_file_for(ctx, half=False)))
    model.set_rt_info(json.dumps(info, ensure_ascii=False), RT_INFO_PATH)
    ov.save_model(model, str(file), compress_to_fp16=ctx.options.half)
    ctx.write_info(file, info)
    return [(file, ctx.precision)]


class Backend(NumpyBackend):
    """An OpenVINO IR model (.xml + .bin) on the CPU, compiled with float32 inference precision
    (OpenVINO would otherwise pick bfloat16 on CPUs that have it, which changes the outputs).

    Args:
        file: the .xml file (the .bin beside it).
        device: only the CPU is used; a CUDA device is reported and ignored.
        half: refused by the format table.
    """

    model_type = "openvino"

    def __init__(self, file: Path, device: Any, half: bool = False) -> None:
        ov = import_runtime("openvino", "openvino")
        if device.type != "cpu":
            LOGGER.warning("OpenVINO runs %s on the CPU (it does not use CUDA devices)", file.name)
        core = ov.Core()
        try:
            model = core.read_model(str(file))
        except Exception as err:  # noqa: BLE001 - openvino raises RuntimeError for bad/missing files
            raise UserError(f"{file} cannot be read by OpenVINO ({str(err).splitlines()[0][:200]})") from None
        embedded = model.get_rt_info(RT_INFO_PATH).astype(str) if model.has_rt_info(RT_INFO_PATH) else None
        shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
        super().__init__(file, read_export_info(file, embedded), shape)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": compute_threads()})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.device = Device("cpu")

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[self.output], dtype=np.float32)  # a copy: the request reuses its buffer
