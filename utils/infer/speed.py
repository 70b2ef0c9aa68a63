"""Timing model calls: the one timer of metrice.py --task fps and the benchmarks.

    times = time_batches(lambda: predict_probs(backend, x), device)     # seconds per call, after a warm-up
    row = speed_row(times, batch_size=64)                                # images/s, ms/image, median, p10, p90

CUDA work is synchronised around every timed call, so a figure is the time the results take to
exist, not the time to queue the kernels. torch is imported only for a CUDA device or a torch
model: an exported model (onnx, openvino) is timed without it.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from utils.core.device import compute_threads
from utils.core.schema import PreprocessSpec
from utils.deploy.formats import FORMATS
from utils.infer.backends import predict_probs

# warm up, then time single calls until both minimums are met (or the cap)
WARMUP_SECONDS, MIN_ITERS, MIN_SECONDS, MAX_SECONDS = 0.5, 20, 1.5, 20.0


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    torch = sys.modules.get("torch")  # a CUDA device means torch (an exported runtime syncs itself)
    if device is not None and device.type == "cuda" and torch is not None:
        torch.cuda.synchronize(str(device))


def warm_up(step: Callable[[], Any], device: Any = None, seconds: float = WARMUP_SECONDS,
            min_calls: int = 3, max_calls: int = 50) -> None:
    """Call `step` at least `min_calls` times and for at least `seconds` (at most `max_calls` calls)."""
    start = time.perf_counter()
    calls = 0
    while calls < min_calls or (time.perf_counter() - start < seconds and calls < max_calls):
        step()
        calls += 1
    synchronize(device)


def time_batches(step: Callable[[], Any], device: Any = None, min_iters: int = MIN_ITERS,
                 min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS, warmup: bool = True) -> list[float]:
    """Seconds per call of `step`: after a warm-up (unless warmup=False), at least `min_iters` calls
    and `min_seconds` in all, stopping at `max_seconds` (and never fewer than 3 calls).

    Returns:
        The seconds of each timed call.
    """
    if warmup:
        warm_up(step, device)
    times: list[float] = []
    total = 0.0
    while len(times) < 3 or ((len(times) < min_iters or total < min_seconds) and total < max_seconds):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return times


def speed_row(times: list[float], batch_size: int) -> dict[str, Any]:
    """Images per second (from the median call), ms per image, and the spread of the calls."""
    median = statistics.median(times)
    return {"batch_size": batch_size, "images_per_s": batch_size / median, "ms_per_image": median * 1000 / batch_size,
            "batch_ms_median": median * 1000, "batch_ms_p10": float(np.percentile(times, 10)) * 1000,
            "batch_ms_p90": float(np.percentile(times, 90)) * 1000, "iterations": len(times)}


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Any) -> str:
    """The GPU's name, or the CPU model and the compute threads in use."""
    if device.type == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    threads = compute_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''}"


def measure_backend(backend: Any, spec: PreprocessSpec, batch_size: int, tta: bool = False) -> list[dict[str, Any]]:
    """images/second of one backend on random uint8 batches already on its device (decoding and
    resizing excluded); for a PyTorch model in both memory formats, the faster one marked.

    Returns:
        One speed_row per memory format, with "memory_format" and "fastest".
    """
    device = getattr(backend, "device", None)
    shape = (*((batch_size, 10) if tta else (batch_size,)), spec.channels, spec.crop, spec.crop)
    formats = ["-"]  # exported runtimes choose their own layout
    if FORMATS[backend.model_type].torch_runtime:
        import torch

        x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        if isinstance(getattr(backend, "model", None), torch.nn.Module):  # channels_last for a PyTorch module
            formats = ["contiguous", "channels_last"]
    else:
        x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        device = None  # the runtime returns its results to the CPU: nothing to synchronise
    model = getattr(backend, "model", None)
    rows = []
    for memory_format in formats:
        inp = x
        if memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
            inp = x if tta else x.contiguous(memory_format=torch.channels_last)
        times = time_batches(lambda: predict_probs(backend, inp), device)
        if memory_format == "channels_last":
            model.to(memory_format=torch.contiguous_format)
        rows.append(speed_row(times, batch_size) | {"memory_format": memory_format})
    best = max(rows, key=lambda r: r["images_per_s"])
    for r in rows:
        r["fastest"] = r is best
    return rows
