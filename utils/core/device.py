"""The device and CPU policy of every script: device choice, loader workers, compute threads,
automatic batch size, mixed precision.

    device = select_device(args.device)            # '' = first GPU, else CPU; 'mps' = Apple's GPU
    workers = default_workers()                     # the --workers default of every script
    share_cpu(device, workers)                      # compute threads = the cores the workers leave

Several processes (torchrun) are utils.core.distributed's.

torch is imported inside the functions that use it: with an exported model (onnx, openvino) the
scripts choose a torch-free `Device` and the thread count (`compute_threads`) without PyTorch.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from utils.core.log import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

LOGGER = logging.getLogger(__name__)

_THREADS: list[int] = []  # compute threads chosen by set_threads (share_cpu, serve.py), the last one in use
MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"


def _mps_fallback_before_torch() -> None:
    """On macOS, let an op that Apple's GPU (MPS) lacks run on the CPU, with PyTorch's one warning
    line, instead of stopping the run with NotImplementedError. PyTorch reads the variable once,
    when it loads, so it is set here: every script that takes --device imports this module before
    torch (tests/test_structure.py). A value the user set is kept."""
    if sys.platform == "darwin":
        os.environ.setdefault(MPS_FALLBACK, "1")


_mps_fallback_before_torch()


# ------------------------------------------------------------------------------- torch or not
def import_torch(needed_for: str) -> Any:
    """Import torch, or one clear line saying what needs it and what runs without it.

    torch is imported only where it is used, so prediction and evaluation with an exported model
    (onnx, openvino) run on a machine without PyTorch (requirements/runtime.txt).
    """
    try:
        import torch
    except ImportError as err:
        raise UserError(f"{needed_for} needs PyTorch, which cannot be imported here ({err}): pip install -r "
                        "requirements.txt, or run an exported model with --model_type onnx or openvino") from None
    if _THREADS and torch.get_num_threads() != _THREADS[-1]:
        torch.set_num_threads(_THREADS[-1])  # chosen (set_threads) before torch was needed
    return torch


@dataclass(frozen=True)
class Device:
    """A device chosen without torch (an exported model on a machine without PyTorch): the same
    `type` and `index` as a torch.device."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def compute_threads() -> int:
    """The compute threads of every backend: torch's when torch is loaded (OMP_NUM_THREADS sets it),
    else what share_cpu chose, else OMP_NUM_THREADS, else the CPUs this process may use."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    if _THREADS:
        return _THREADS[-1]
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------ CPU policy
def set_threads(threads: int) -> int:
    """Run every backend on `threads` compute threads: torch now if it is loaded, else when
    import_torch loads it; onnxruntime and OpenVINO read compute_threads() when they start.

    Returns:
        `threads`.
    """
    _THREADS.append(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def default_workers() -> int:
    """Loader processes for every script's --workers default. On 1-2 cores, none: decoding small
    images costs far less than the model step, and a worker competing with the compute threads
    slowed training epochs down 10x on a 2-core machine under load. Above that, up to 4, leaving
    two cores to the compute threads."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus - 2)


def gpu_workers(processes_per_machine: int = 1) -> int:
    """Loader processes per training process on a GPU, where decoding, not the model, is what runs
    short: the cores this process may use, shared by the processes of this machine, less one for
    the process itself, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, processes_per_machine) - 1))


def share_cpu(device: Any, workers: int) -> int:
    """On CPU, give the compute threads the cores the loader processes leave free: oversubscribed
    OpenMP threads spin against the workers and can make a step many times slower. An explicit
    OMP_NUM_THREADS is respected.

    Returns:
        The compute threads in use.
    """
    if device.type == "cpu" and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) - workers)
        if threads < compute_threads():
            set_threads(threads)
            LOGGER.info("--workers %d on %d CPUs: %d compute thread(s)", workers, os.cpu_count(), threads)
    return compute_threads()


def select_device(spec: str = "", torch_runtime: bool = True, model_type: str = "torch") -> Any:
    """Pick the device from a pytorch-classifier --device value.

    Args:
        spec: "" (first GPU if any, else CPU), "cpu", "0", "cuda:1" ..., "mps" (Apple silicon's GPU).
        torch_runtime: whether the model runs through PyTorch (utils.deploy.formats: ModelFormat.torch_runtime);
            the others (onnx, openvino) get a torch-free Device ("" is the CPU there, a GPU index is
            handed to the runtime, which says if it cannot use it).
        model_type: the --model_type, for the message when PyTorch is missing.

    Returns:
        The torch.device (a Device for onnx / openvino).
    """
    given = spec = str(spec).strip().lower()
    if spec == "cuda":
        spec = "0"  # asking for the GPU by name is asking for the first one: an error when there is none
    spec = spec.replace("cuda:", "")
    if not torch_runtime:
        if spec not in ("", "cpu") and not spec.isdigit():
            mps = f" (mps runs PyTorch models, not --model_type {model_type})" if spec == "mps" else ""
            raise UserError(f"--device '{given}' is not valid{mps}: use '', 'cpu', or a GPU index such as 0")
        return Device("cuda", int(spec)) if spec.isdigit() else Device("cpu")
    torch = import_torch(f"--model_type {model_type}")
    if spec == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        return _mps_device(torch)
    if "," in spec:
        raise UserError(f"--device {spec}: one process uses one device; several GPUs train through torchrun "
                        f"(torchrun --standalone --nproc_per_node N main.py ...)")
    if not spec.isdigit():
        raise UserError(f"--device '{spec}' is not valid: use '', 'cpu', a GPU index such as 0, or mps (Apple silicon)")
    if not torch.cuda.is_available():
        raise UserError(f"--device {given}: no CUDA GPU is available here (use --device cpu, or '' for the GPU when there is one)")
    if int(spec) >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) here (indices 0..{torch.cuda.device_count() - 1})")
    return torch.device(f"cuda:{spec}")


def _mps_device(torch: Any) -> torch.device:
    """torch.device("mps") where Apple's GPU is usable, else one line saying why not."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        why = ("this PyTorch build has no MPS support" if mps is None or not mps.is_built() else
               "MPS needs a Mac with Apple silicon (M1 or later) and macOS 12.3+")
        raise UserError(f"--device mps: Apple's GPU (MPS) is not available here ({why}); use --device cpu, or '' "
                        "for the first CUDA GPU when there is one")
    if os.environ.get(MPS_FALLBACK, "0").strip() in ("", "0"):
        LOGGER.warning("--device mps: %s is not 1 when PyTorch loaded, so an op that MPS lacks stops the run; "
                       "start with %s=1 to run such ops on the CPU", MPS_FALLBACK, MPS_FALLBACK)
    return torch.device("mps")


def amp_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for --amp and a note for the console.

    CUDA and MPS: float16 with a gradient scaler (torch.amp.GradScaler(device.type)). CPU: bfloat16
    autocast (no scaler needed).
    """
    import torch

    if not enabled:
        return None, "off"
    if device.type == "cuda":
        return torch.float16, "float16 autocast + GradScaler (CUDA)"
    if device.type == "mps":
        if not torch.amp.is_autocast_available("mps"):
            return None, f"off: this PyTorch {torch.__version__} has no autocast on MPS (float32)"
        return torch.float16, "float16 autocast + GradScaler (MPS)"
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
