"""The device and CPU policy of every script: device choice, loader workers, compute threads,
automatic batch size, mixed precision, and the process-group hooks.

    device = select_device(args.device)            # '' = first GPU, else CPU
    workers = default_workers()                     # the --workers default of every script
    share_cpu(device, workers)                      # compute threads = the cores the workers leave

Several processes (torchrun) are utils.distributed's.

PyTorch is imported inside the functions that use it: the scripts' parsers take their --workers
default from here, and `--help` must not wait for PyTorch to load.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable

from utils.log import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

LOGGER = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ CPU policy
def default_workers() -> int:
    """Loader processes for every script's --workers default. On 1-2 cores, none: decoding small
    images costs far less than the model step, and a worker competing with the compute threads
    slowed training epochs down 10x on a 2-core machine under load. Above that, up to 4, leaving
    two cores to the compute threads."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus - 2)


def share_cpu(device: torch.device, workers: int) -> int:
    """On CPU, give the compute threads the cores the loader processes leave free: oversubscribed
    OpenMP threads spin against the workers and can make a step many times slower. An explicit
    OMP_NUM_THREADS is respected.

    Returns:
        The compute threads in use.
    """
    import torch

    if device.type == "cpu" and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) - workers)
        if threads < torch.get_num_threads():
            torch.set_num_threads(threads)
            LOGGER.info("--workers %d on %d CPUs: %d compute thread(s)", workers, os.cpu_count(), threads)
    return torch.get_num_threads()


def select_device(spec: str = "") -> torch.device:
    """Pick the device from a pytorch-classifier --device value.

    Args:
        spec: "" (first GPU if any, else CPU), "cpu", "0", "cuda:1" ...

    Returns:
        The torch.device.
    """
    import torch

    given = spec = str(spec).strip().lower()
    if spec == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cuda":
        spec = "0"  # asking for the GPU by name is asking for the first one: an error when there is none
    spec = spec.replace("cuda:", "")
    if spec == "cpu":
        return torch.device("cpu")
    if "," in spec:
        raise UserError(f"--device {spec}: one process uses one device; several GPUs train through torchrun "
                        f"(torchrun --standalone --nproc_per_node N main.py ...)")
    if not spec.isdigit():
        raise UserError(f"--device '{spec}' is not valid: use '', 'cpu', or a GPU index such as 0")
    if not torch.cuda.is_available():
        raise UserError(f"--device {given}: no CUDA GPU is available here (use --device cpu, or '' for the GPU when there is one)")
    if int(spec) >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) here (indices 0..{torch.cuda.device_count() - 1})")
    return torch.device(f"cuda:{spec}")


def amp_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for --amp and a note for the console.

    CUDA: float16 with a gradient scaler. CPU: bfloat16 autocast (no scaler needed).
    """
    import torch

    if not enabled:
        return None, "off"
    if device.type == "cuda":
        return torch.float16, "float16 autocast + GradScaler (CUDA)"
    return torch.bfloat16, "bfloat16 autocast on CPU (fast only on CPUs with native bf16; drop --amp if it is slower)"


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """An autocast context for dtype, or a no-op context."""
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def autobatch(model: nn.Module, image_size: int, channels: int, device: torch.device, fraction: float = 0.8,
              step: Callable[[nn.Module, torch.Tensor], None] | None = None) -> int:
    """Largest batch size that uses about `fraction` of the GPU memory in a training step.

    Measures peak memory of a forward+backward pass at a few batch sizes, fits a line and solves
    for the target (as pytorch-classifier did after YOLOv5). On CPU there is no memory to fill:
    it returns 16, pytorch-classifier's choice.

    Returns:
        The batch size.
    """
    import torch

    if device.type != "cuda":
        return 16
    total = torch.cuda.get_device_properties(device).total_memory
    sizes, peaks = [], []
    model.train()
    for b in (2, 4, 8, 16, 32):  # batch norm needs more than one image per batch in training
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randn(b, channels, image_size, image_size, device=device)
            if step is not None:
                step(model, x)
            else:
                model(x).float().sum().backward()
            peaks.append(torch.cuda.max_memory_allocated(device))
            sizes.append(b)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    if len(sizes) < 2:
        return max(1, sizes[-1] if sizes else 1)
    # peak = intercept + slope * batch
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(peaks) / n
    slope = sum((s - mx) * (p - my) for s, p in zip(sizes, peaks)) / max(1e-9, sum((s - mx) ** 2 for s in sizes))
    intercept = my - slope * mx
    if slope <= 0:
        return 16
    return max(1, int((total * fraction - intercept) / slope))
