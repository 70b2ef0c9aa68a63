"""metrice.py on an exported model (ONNX, OpenVINO, NCNN, TFLite ... int8 included): the same
images through the checkpoint it was exported from, so the user sees what the export changed
before shipping it -- the top-1 agreement with PyTorch and the accuracy change.

    found = compare_with_checkpoint(ensemble, split, "tflite", batch_size=32, workers=0, tta=False, device="cpu")
    found["top1_agreement"], found["accuracy"]["change"]

The checkpoint is the one the export's metadata names (source), else the run's best.pt around an
export/ folder. It needs PyTorch: on a machine without it the comparison is skipped with a note
(the exported model's own metrics are still computed there).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from utils.core.device import import_torch
from utils.core.log import UserError
from utils.core.run import RunFolder
from utils.deploy.parity import INT8_WARN_AGREEMENT
from utils.evaluate.split import SplitPredictions, predict_split
from utils.infer.backends import model_device
from utils.infer.ensemble import Ensemble, load_ensemble, run_folder_of

LOGGER = logging.getLogger(__name__)


def source_checkpoint(path: Path, backend: Any) -> Path | None:
    """The checkpoint an exported model was made from: its metadata's source if the file is still
    there, else best.pt of the run the export sits in; None when neither is found."""
    source = (getattr(backend, "info", None) or {}).get("source") or {}
    candidates = [Path(source["checkpoint"])] if source.get("checkpoint") else []
    run = run_folder_of(path, backend)
    candidates += [RunFolder(run).path / RunFolder.BEST] if run is not None else []
    return next((c for c in candidates if c.is_file()), None)


def compare_with_checkpoint(ensemble: Ensemble, split: SplitPredictions, model_type: str, batch_size: int, workers: int,
                            tta: bool, device: str) -> dict[str, Any] | None:
    """Predict the split's images with the source checkpoint and compare with the exported model.

    Args:
        ensemble: the exported model metrice.py evaluates (one member; multiclass).
        split: its predictions on the split.
        model_type: its format (nothing is compared for torch).
        batch_size, workers, tta: as the split was predicted.
        device: --device (the checkpoint runs through PyTorch there).

    Returns:
        {checkpoint, images, top1_agreement, accuracy: {pytorch, exported, change}, precision, warning}
        (printed as one line), or None when there is nothing to compare with.
    """
    if model_type == "torch" or len(ensemble.members) != 1 or ensemble.meta.task_type.multilabel:
        return None
    member = ensemble.members[0]
    checkpoint = source_checkpoint(Path(member.name), member.backend)
    if checkpoint is None:
        print(f"vs PyTorch: no checkpoint found for {member.name} (its metadata's source, or the run's best.pt): "
              "agreement not measured", flush=True)
        return None
    try:
        import_torch("the comparison with the PyTorch checkpoint")
    except UserError:
        print(f"vs PyTorch: {checkpoint} needs PyTorch, which is not installed here: agreement not measured", flush=True)
        return None
    reference = load_ensemble([checkpoint], "torch", model_device(device, "torch"))
    kept = [split.samples[i] for i in split.keep]
    torch_split = predict_split(reference, kept, batch_size, workers, tta, desc="best.pt")
    ours, theirs = split.probs.argmax(1), torch_split.probs.argmax(1)
    if len(theirs) != len(ours):
        raise UserError(f"{checkpoint} decoded {len(theirs)} of the {len(ours)} images the exported model read")
    targets = np.asarray(split.targets)
    accuracy = {"pytorch": float((theirs == targets).mean()), "exported": float((ours == targets).mean())}
    accuracy["change"] = accuracy["exported"] - accuracy["pytorch"]
    found = {"checkpoint": str(checkpoint), "images": len(ours), "top1_agreement": float((ours == theirs).mean()),
             "accuracy": accuracy, "precision": (getattr(member.backend, "info", None) or {}).get("precision")}
    print(f"vs PyTorch {checkpoint}: top-1 agreement {found['top1_agreement']:.2%} on {len(ours)} images; accuracy "
          f"{accuracy['pytorch']:.2%} -> {accuracy['exported']:.2%} ({100 * accuracy['change']:+.2f} points)", flush=True)
    found["warning"] = found["precision"] == "int8" and found["top1_agreement"] < INT8_WARN_AGREEMENT
    if found["warning"]:
        LOGGER.warning("int8 %s agrees with PyTorch on %.2f%% of the images (under %.0f%%): check the accuracy change "
                       "above before shipping it", member.name, 100 * found["top1_agreement"], 100 * INT8_WARN_AGREEMENT)
    return found
