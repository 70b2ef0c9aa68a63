"""The parity check of an exported file: it must predict what the trained PyTorch model predicts.

    reference = probabilities of the trained checkpoint (float32, CPU) on real images
    report = check_parity(file, FORMATS["onnx"], "fp32", images, reference, device)
    report["ok"], report["max_abs_diff"], report["top1_agreement"]

The file is run through its format's runtime, as metrice.py and predict.py run it; the largest
difference of the class probabilities and the top-1 agreement must stay within PARITY_TOLERANCE of
its precision. A file whose runtime cannot run here (no GPU for TensorRT, say) is reported as not
checked rather than failed.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.core.log import UserError
from utils.deploy.formats import ModelFormat
from utils.deploy.runtime import runtime_device

if TYPE_CHECKING:
    import torch

# What "the exported model agrees with PyTorch" means, per precision: the largest absolute
# difference of any class probability, and the fraction of images with the same top-1 class.
PARITY_TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-4},
    "fp16": {"max_abs_diff": 1e-2},
    "int8": {"top1_agreement": 0.95},
}
# An int8 file that agrees with PyTorch on fewer images than this passes the check but is warned
# about (export.py, metrice.py): a drop the user should measure on the test split before shipping.
INT8_WARN_AGREEMENT = 0.99


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
    import torch

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
    """A tolerance as a person reads it: 'max |dp| <= 0.0001', 'top-1 agreement >= 95%'."""
    parts = []
    if "max_abs_diff" in tol:
        parts.append(f"max |dp| <= {tol['max_abs_diff']:g}")
    if "top1_agreement" in tol:
        parts.append(f"top-1 agreement >= {tol['top1_agreement']:.0%}")
    return " and ".join(parts)


def check_parity(file: Path, fmt: ModelFormat, precision: str, images: torch.Tensor, reference: torch.Tensor,
                 device: torch.device) -> dict[str, Any]:
    """Run the exported file through its format's runtime on `images` and compare with PyTorch's
    probabilities. Formats whose parity_on_export_device is set are checked where they were exported;
    the others on the CPU, where their float32 arithmetic is exact.

    Returns:
        parity_report's dict plus the device, or {"ok": None, "skipped": why} when the runtime cannot run here.
    """
    import torch

    run_on = device if fmt.parity_on_export_device else torch.device("cpu")
    why = fmt.unavailable()
    if why:  # e.g. Core ML off macOS: its exporter validated the file; its predictions cannot be had here
        return {"ok": None, "skipped": why, "precision": precision, "tolerance": PARITY_TOLERANCE[precision]}
    try:
        backend = fmt.load(file, runtime_device(fmt.torch_runtime, run_on))
        logits = torch.cat([torch.as_tensor(backend(images[i:i + 64])) for i in range(0, len(images), 64)])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the runtime cannot run the file: report, do not crash
        return {"ok": None, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", "precision": precision,
                "tolerance": PARITY_TOLERANCE[precision]}
    report = parity_report(reference, backend.meta.probabilities(logits), precision)
    report["device"] = str(run_on)
    return report
