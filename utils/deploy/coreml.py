"""Core ML (iPhone, iPad, Mac): an .mlpackage (ML program) converted by coremltools, float32 and
float16, a classifier with the class labels and the preprocessing inside.

    files = export(ctx)                        # best.mlpackage, best_fp16.mlpackage (+ their .json)
    problems = package_problems(path, meta)    # coremltools reads the spec back: input, outputs, labels, metadata

The package takes an image (RGB, or grayscale for a one-channel model) of the model's crop size:
Core ML scales its pixels by 1/255, the model subtracts the mean and divides by the std per
channel, and its outputs are `classLabel` (the top class) and `classLabel_probs` (each class's
probability, the calibration temperature applied). Resizing to the crop is the app's (Vision's
imageCropAndScaleOption). Predictions need Apple's Core ML framework, so macOS: elsewhere the
package is validated by its spec and the parity check is reported as not checked, with the reason.
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from utils.core.log import UserError
from utils.core.schema import ModelMeta
from utils.deploy.context import INPUT_NAME, ExportContext, quiet_native
from utils.deploy.runtime import EXPORT_INFO_KEY, export_meta, import_runtime, read_export_info

if TYPE_CHECKING:
    from torch import nn

LOGGER = logging.getLogger(__name__)

LABEL_OUTPUT, PROBS_OUTPUT = "classLabel", "classLabel_probs"  # coremltools' classifier outputs
FOLDER_FILES = ("Manifest.json", "Data")  # what an .mlpackage holds


def refusal(meta: ModelMeta) -> str | None:
    """A multi-label model does not fit a Core ML classifier (one label per image)."""
    if meta.task_type.multilabel:
        return (f"--export coreml writes a Core ML classifier (one label per image) and {meta.model_name} here is a "
                "multilabel model: export onnx, tflite or ncnn for it")
    return None


def unavailable() -> str | None:
    """Core ML predicts through Apple's framework: macOS only."""
    if platform.system() != "Darwin":
        return (f"Core ML models predict on macOS only (this is {platform.system()}): the package was validated by "
                "coremltools; run predict.py / metrice.py on a Mac, or ship it to the app")
    return None


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """best.mlpackage (float32) and best_fp16.mlpackage, each validated by reading its spec back."""
    import coremltools as ct
    import torch

    meta = ctx.meta
    c, s = meta.image_channel, meta.image_size
    with quiet_native(ctx.options.verbose), torch.no_grad():
        traced = torch.jit.trace(_with_preprocessing(ctx.model_cpu, meta).eval(), torch.rand(1, c, s, s))
    layout = ct.colorlayout.GRAYSCALE if c == 1 else ct.colorlayout.RGB
    files = []
    for precision, compute in (("fp32", ct.precision.FLOAT32), ("fp16", ct.precision.FLOAT16)):
        file = ctx.file(".mlpackage", precision)
        info = ctx.describe("coreml", file, precision, False, {"coreml": {"minimum_deployment_target": "iOS15"}})
        info["input"] = {"name": INPUT_NAME, "type": "image", "color_layout": "GRAYSCALE" if c == 1 else "RGB",
                         "shape": [1, c, s, s], "value": "pixels scaled by 1/255 by Core ML; the model subtracts mean and "
                         "divides by std"}
        info["output"] = {"name": PROBS_OUTPUT, "label": LABEL_OUTPUT, "value": "class probabilities (temperature applied)"}
        with quiet_native(ctx.options.verbose):
            package = ct.convert(traced, inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, c, s, s), scale=1 / 255,
                                                              bias=[0.0] * c, color_layout=layout)],
                                 classifier_config=ct.ClassifierConfig(list(meta.class_names)), convert_to="mlprogram",
                                 compute_precision=compute, minimum_deployment_target=ct.target.iOS15)
        package.short_description = f"{meta.model_name}: {meta.num_classes} classes ({precision})"
        package.user_defined_metadata[EXPORT_INFO_KEY] = json.dumps(info, ensure_ascii=False)
        package.save(str(file))
        problems = package_problems(file, meta)
        if problems:
            raise RuntimeError(f"{file.name} does not read back as written: {'; '.join(problems)}")
        info["coreml"]["validated"] = "spec read back by coremltools: image input, classifier outputs, labels, metadata"
        ctx.write_info(file, info)
        files.append((file, precision))
    return files


def _with_preprocessing(model: nn.Module, meta: ModelMeta) -> nn.Module:
    """The model with the preprocessing before it and the probabilities after: pixels in [0, 1] ->
    (x - mean) / std -> logits -> softmax(logits / temperature)."""
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            shape = (1, meta.image_channel, 1, 1)
            self.register_buffer("mean", torch.tensor(meta.preprocess.mean, dtype=torch.float32).view(shape))
            self.register_buffer("std", torch.tensor(meta.preprocess.std, dtype=torch.float32).view(shape))
            self.temperature = float(meta.temperature[0]) if meta.temperature else 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.model((x - self.mean) / self.std) / self.temperature, dim=1)

    return Classifier()


def _strings(message: Any) -> list[str]:
    """Every string value inside a protobuf message, in order (the labels of the classify op)."""
    out: list[str] = []
    for _, value in message.ListFields():
        repeated = not isinstance(value, (str, bytes)) and not hasattr(value, "ListFields") and hasattr(value, "__len__")
        items = value if repeated else [value]
        for item in items:
            if isinstance(item, str):
                out.append(item)
            elif hasattr(item, "ListFields"):
                out += _strings(item)
    return out


def package_problems(file: Path, meta: ModelMeta) -> list[str]:
    """What of an .mlpackage does not match the model (empty when all does), read back by coremltools:
    an image input of the crop size, the classifier's two outputs, the class labels in order, and
    the export metadata.

    Args:
        file: the .mlpackage.
        meta: the model it should hold.
    """
    import coremltools as ct

    spec = ct.utils.load_spec(str(file))
    problems = []
    (inp,) = spec.description.input
    if inp.type.WhichOneof("Type") != "imageType":
        problems.append(f"input {inp.name} is not an image")
    elif (inp.type.imageType.width, inp.type.imageType.height) != (meta.image_size, meta.image_size):
        problems.append(f"input image {inp.type.imageType.width}x{inp.type.imageType.height}, not {meta.image_size}")
    if [o.name for o in spec.description.output] != [LABEL_OUTPUT, PROBS_OUTPUT] or \
            spec.description.predictedProbabilitiesName != PROBS_OUTPUT:
        problems.append(f"outputs {[o.name for o in spec.description.output]}, not a classifier's")
    function = spec.mlProgram.functions["main"]
    ops = [op for op in function.block_specializations[function.opset].operations if op.type == "classify"]
    labels = _strings(ops[0].inputs["classes"]) if ops else []
    if labels != list(meta.class_names):
        problems.append(f"class labels {labels[:5]}, not {list(meta.class_names)[:5]}")
    stored = spec.description.metadata.userDefined.get(EXPORT_INFO_KEY)
    if not stored or export_meta(*read_export_info(file, stored)).class_names != meta.class_names:
        problems.append("the export metadata is missing or differs")
    return problems


class Backend:
    """An .mlpackage run by Core ML (macOS): uint8 batch -> the log of its probabilities times the
    temperature, so that meta.probabilities gives the package's own probabilities back.

    Args:
        file: the .mlpackage folder.
        device: Core ML chooses (CPU, GPU, Neural Engine).
        half: refused by the format table.
    """

    model_type = "coreml"

    def __init__(self, file: Path, device: Any, half: bool = False) -> None:
        why = unavailable()
        if why:
            raise UserError(f"{file}: {why}")
        ct = import_runtime("coremltools", "coreml")
        self.file, self.device = Path(file), device
        self.package = ct.models.MLModel(str(file))
        self.info, source = read_export_info(file, self.package.user_defined_metadata.get(EXPORT_INFO_KEY))
        self.meta = export_meta(self.info, source)
        self.batch = None

    def __call__(self, images: Any) -> Any:
        from PIL import Image

        from utils.deploy.runtime import as_numpy, like

        batch = as_numpy(images)
        probs = []
        for image in batch:
            pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            out = self.package.predict({INPUT_NAME: Image.fromarray(np.ascontiguousarray(pixels))})[PROBS_OUTPUT]
            probs.append([out[name] for name in self.meta.class_names])
        temperature = self.meta.temperature[0] if self.meta.temperature else 1.0
        return like(np.log(np.clip(np.asarray(probs, dtype=np.float32), 1e-30, None)) * temperature, images)
