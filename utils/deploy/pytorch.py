"""The checkpoint format: a best.pt / last.pt of this toolkit, run by PyTorch (--model_type torch).

    backend = Backend(Path("runs/exp/best.pt"), torch.device("cpu"))
    logits = backend(images)      # uint8 (N, C, H, W), numpy or torch -> float32 logits of the same kind (CPU)

main.py writes it; export.py exports from it (there is no exporter of this format). The model is
rebuilt from the checkpoint's model name and weights (utils.models.weights), so this runtime needs
timm and the model code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.core.checkpoint import load_checkpoint
from utils.core.schema import ModelMeta
from utils.data.transforms import Normalize
from utils.deploy.runtime import torch_input, torch_output
from utils.models.weights import model_from_checkpoint


class Backend:
    """A checkpoint of this toolkit (best.pt / last.pt) run by PyTorch.

    Args:
        file: the checkpoint.
        device: where to run.
        half: float16 weights and inputs (CUDA only).
    """

    model_type = "torch"

    def __init__(self, file: Path, device: torch.device, half: bool = False) -> None:
        ckpt = load_checkpoint(file, what="model")
        self.file = Path(file)
        self.meta: ModelMeta = ckpt.meta
        self.checkpoint = ckpt
        self.device = device
        self.half = half
        self.model = model_from_checkpoint(ckpt).to(device)
        if half:
            self.model.half()
        if device.type == "cuda":  # batches of one size: let cuDNN time its algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: Any) -> Any:
        x = self.normalize(torch_input(images, self.device))
        if self.half:
            x = x.half()
        return torch_output(self.model(x), images)
