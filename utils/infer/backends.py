"""Run a trained model behind one call, whatever format it is in.

    backend = load_backend("runs/exp")                          # best.pt of a run folder
    backend = load_backend("runs/exp", model_type="onnx")       # runs/exp/export/best.onnx (export.py)
    backend = load_backend("export/best_int8.onnx")             # a file: its suffix says the format
    images = preprocess_images(backend.meta, pil_images)        # uint8 (N, C, H, W) numpy
    probs = predict_probs(backend, images)                      # (N, num_classes); TenCrop (N, 10, C, H, W) averaged

A backend takes uint8 image batches preprocessed by `preprocess_images` (utils.data.transforms_np, or
the dataset transforms of utils.data.transforms built from `backend.meta.preprocess`), normalises them itself,
and returns float32 logits on the CPU: numpy for a numpy batch, a tensor for a tensor batch.
`backend.meta` is the model's utils.core.schema.ModelMeta: class names, preprocessing, image size and
channels. Prediction is a function of (backend, images), so a server can call it.

The formats and their runtimes are the table of utils.deploy.formats: torch (a checkpoint of this
toolkit), torchscript, onnx (onnxruntime), openvino (IR .xml/.bin, CPU), tensorrt (a serialized
engine, CUDA) and safetensors (a Hub folder timm loads). Exported models take the normalised float
batch ((pixel / 255 - mean) / std, N x C x H x W) and return logits; their metadata (inside the file,
or the JSON export.py writes beside it) gives the class names and preprocessing. This module imports
no torch: onnx and openvino run on numpy (a deployment machine needs numpy, Pillow and the runtime:
requirements/runtime.txt); a format's module is imported only when a model of it is loaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from utils.core.device import import_torch, select_device
from utils.core.files import check_writable
from utils.core.log import UserError
from utils.core.run import RunFolder, model_not_found
from utils.core.schema import ModelMeta
from utils.data.transforms_np import image_transform, run_with_tta
from utils.deploy.formats import MODEL_TYPES, ModelFormat, format_of, get_format, is_model_folder
from utils.deploy.runtime import runtime_device

LOGGER = logging.getLogger(__name__)


def find_export(run: Path, fmt: ModelFormat) -> Path:
    """The exported model of a run folder in a format: <run>/export/best.<suffix> (or beside best.pt),
    the float32 file first, then float16, then int8 (pass a file path to choose another).

    Raises:
        UserError: none exported yet (with the export.py command that makes it).
    """
    folder = RunFolder(run)
    names = fmt.run_files(Path(RunFolder.BEST).stem)
    for where in (folder.export_dir, folder.path):
        for name in names:
            if (where / name).exists():
                if name != names[0]:
                    LOGGER.info("using %s", where / name)
                return where / name
    raise UserError(f"no {fmt.flag} model in {folder.export_dir}: export it with "
                    f"python export.py --save_path {run} --export {fmt.flag}")


def resolve_weights(path: str | Path, model_type: str = "torch") -> Path:
    """A run folder -> its model file for model_type (best.pt for torch, export/best.onnx for onnx ...);
    a file -> itself (after checking that it fits model_type)."""
    path = Path(path)
    fmt = get_format(model_type)
    if path.is_dir() and not is_model_folder(path):  # a --kfold run: its best fold's (RunFolder.model_folder)
        return RunFolder.checkpoint(path) if fmt.flag == "torch" else find_export(RunFolder.model_folder(path), fmt)
    if not path.exists():
        raise model_not_found(path, "model")
    found = format_of(path)
    if found is not None and found is not fmt and not (fmt.flag == "torchscript" and found.flag == "torch"):
        raise UserError(f"{path} looks like a {found.flag} model ({path.suffix or 'a Hub folder'}) but --model_type is "
                        f"{fmt.flag}: pass --model_type {found.flag}")
    return path


def model_type_of(path: str | Path) -> str:
    """The format of a model path: a run folder is torch (its best.pt), a Hub folder safetensors, a
    file tells by its suffix.

    Raises:
        UserError: a file whose suffix names no format.
    """
    path = Path(path)
    if path.is_dir() and not is_model_folder(path):
        return "torch"
    found = format_of(path)
    if found is None:
        if not path.exists():
            raise model_not_found(path, "model")
        raise UserError(f"{path}: '{path.suffix or 'no suffix'}' names no model format; pass --model_type "
                        f"({', '.join(MODEL_TYPES)})")
    return found.flag


def models_from_flags(save_path: Sequence[str] | None, weight: Sequence[str] | None,
                      model_type: str | None) -> tuple[list[str], str]:
    """The models of predict.py / metrice.py from --save_path, --weight and --model_type.

    Args:
        save_path: run folders (or model files), None when not given (default runs/exp).
        weight: model files: a checkpoint or any exported file (export/best_int8.onnx, export/best_hub ...).
        model_type: the format; None: from the first --weight file's suffix, else torch.

    Returns:
        (the model paths, the model type).
    """
    if weight and save_path:
        raise UserError("pass either --save_path (run folders) or --weight (model files), not both")
    if not weight:
        return list(save_path or ["runs/exp"]), model_type or "torch"
    for file in weight:
        if Path(file).is_dir() and not is_model_folder(Path(file)):
            raise UserError(f"--weight {file} is a folder: pass a model file (best.pt, export/best.onnx ...), "
                            "or the run folder with --save_path")
    return list(weight), model_type or model_type_of(weight[0])


def kfold_members(paths: Sequence[str | Path]) -> list[str]:
    """The models that model paths stand for: each main.py --kfold run folder as its K folds (RUN/fold1
    ... RUN/foldK), so metrice.py and predict.py average them as an ensemble (each fold saw (K-1)/K of
    the training set: their mean is the usual, stronger estimate than any one fold); other paths as
    they are. The one place a --kfold run becomes its folds (export.py and serve.py take its best
    fold instead: utils.core.run.RunFolder.model_folder).

    Raises:
        UserError: a --kfold run whose folds are not all finished.
    """
    models: list[str] = []
    for path in paths:
        folder = RunFolder(path)
        if not (Path(path).is_dir() and folder.is_kfold):
            models.append(str(path))
            continue
        record = folder.kfold_record()
        k, finished = record["k"], set(record.get("finished") or [])
        missing = [f for f in range(1, k + 1) if f not in finished]
        if missing:
            raise UserError(f"{path} is a --kfold run whose fold(s) {', '.join(map(str, missing))} of {k} are not finished: "
                            f"resume it with python main.py --save_path {path} --resume, or pass one finished fold "
                            f"({folder.fold(1)} ...)")
        models += [str(folder.fold(f)) for f in range(1, k + 1)]
    return models


def results_home(path: str | Path) -> Path:
    """The folder a model's results go into (predict/, test/, features/ ...): a run folder itself; the
    folder of a model file, or of a Hub folder (never inside it: the folder is what a Hub upload sends)."""
    path = Path(path)
    return path if path.is_dir() and not is_model_folder(path) else path.parent


def results_folder(paths: Sequence[str | Path], name: str, flag: str) -> Path:
    """Where predict.py and metrice.py write about the (first) model: <run>/<name> for a run folder,
    <the model file's folder>/<name> for a file; checked to be writable before any work.

    Args:
        paths: --save_path / --weight.
        name: the sub-folder (predict, test, val, fps, features).
        flag: the flag that named the models (in the error line).

    Raises:
        UserError: the folder cannot be written (a read-only disk, no permission).
    """
    folder = results_home(paths[0]) / name
    check_writable(folder, flag, fix=f"the results go beside the model, so copy the run folder (or the model file with its "
                   f".json) to a folder you can write to and pass that to {flag}")
    return folder


def model_device(spec: str, model_type: str) -> Any:
    """--device for a model of this format: a torch.device where it runs through PyTorch, else a
    torch-free utils.core.device.Device (no torch import for onnx and openvino)."""
    return select_device(spec, get_format(model_type).torch_runtime, model_type)


def load_backend(path: str | Path, model_type: str | None = "torch", device: Any = "cpu", half: bool = False) -> Any:
    """Load a model to run, whatever its format.

    Args:
        path: a run folder or a model file.
        model_type: a format of utils.deploy.formats (torch, torchscript, onnx, openvino, tensorrt,
            safetensors); None: from the file's suffix (model_type_of).
        device: where to run, a torch.device, a utils.core.device.Device or a string (OpenVINO always
            uses the CPU; TensorRT needs CUDA).
        half: float16 inference (CUDA only; the formats whose `half` is set -- the others keep the
            precision they were exported with).

    Returns:
        A callable backend: uint8 batch -> float32 logits (CPU), with `.meta` and `.model_type`.
    """
    fmt = get_format(model_type or model_type_of(path))
    file = resolve_weights(path, fmt.flag)
    if fmt.torch_runtime:
        import_torch(f"--model_type {fmt.flag}")
    return fmt.load(file, runtime_device(fmt.torch_runtime, device), half)


def preprocess_images(meta: ModelMeta, images: Sequence[Image.Image], tta: bool = False) -> np.ndarray:
    """Loaded PIL images (already in the model's mode, see utils.data.decode.load_image) -> a uint8 numpy
    batch (N, C, H, W), or (N, 10, C, H, W) with TenCrop."""
    transform = image_transform(meta.preprocess, tta)
    return np.stack([transform(img) for img in images])


def predict_probs(backend: Any, images: Any) -> Any:
    """Class probabilities (N, num_classes) for a uint8 batch, numpy or torch (the same kind comes
    back): a softmax, or a sigmoid per class for a multi-label model, of the logits divided by the
    model's calibration temperature (ModelMeta.temperature); TenCrop batches are averaged over the
    crops' probabilities."""
    meta = backend.meta
    return run_with_tta(lambda x: meta.probabilities(backend(x)), images)
