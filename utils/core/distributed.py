"""Training on several processes (GPUs, machines) with torchrun and DistributedDataParallel.

    torchrun --standalone --nproc_per_node 4 main.py --model_name resnet50 ...        # one machine, 4 GPUs
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 main.py ...

torchrun starts the processes and sets RANK, LOCAL_RANK and WORLD_SIZE; `init_from_env` joins
them into one process group (NCCL on CUDA, gloo on the CPU). Everything the toolkit does across
processes goes through the few functions here: which process writes files and prints
(`is_main_process`), summing metrics (`reduce_sum`), agreeing on when to stop (`any_true`),
sharing a value chosen by the first process (`broadcast_object`). In a single process they are
trivial, and PyTorch is imported only when one is called.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any

from utils.core.log import UserError

if TYPE_CHECKING:
    import torch

LOGGER = logging.getLogger(__name__)

# How long a process waits for the others in a collective before failing (a dead peer, a hung one).
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("PYTORCH_CLASSIFIER_DIST_TIMEOUT_MIN", "10")))


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Whether a process group of several processes is running."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside a process group."""
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes files and prints summaries (rank 0)."""
    return world_info()[0] == 0


def init_from_env(device_spec: str) -> "torch.device | None":
    """Join the process group torchrun set up, and pick this process's device.

    CUDA: NCCL, one GPU per process (LOCAL_RANK); CPU: gloo. Processes other than rank 0 print
    nothing (their stdout goes to /dev/null) and log errors only, so the console shows one run.

    Args:
        device_spec: --device ('' = GPUs if any, 'cpu', or a GPU list that must match --nproc_per_node).

    Returns:
        The device, or None when this is a single process (not started by torchrun).

    Raises:
        UserError: --device asks for something the processes cannot have.
    """
    if not launched_by_torchrun():
        return None
    import torch
    import torch.distributed as dist

    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    spec = str(device_spec).strip().lower()
    use_cuda = torch.cuda.is_available() and spec != "cpu"
    if spec not in ("", "cpu") and not torch.cuda.is_available():
        raise UserError(f"--device {device_spec}: no CUDA GPU here; under torchrun use --device cpu (gloo) or ''")
    if use_cuda:
        gpus = [int(g) for g in spec.replace("cuda:", "").split(",") if g.strip()] if spec else list(range(torch.cuda.device_count()))
        if local_rank >= len(gpus):
            raise UserError(f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this machine but --device names "
                            f"{len(gpus)} GPU(s): pass --nproc_per_node {len(gpus)}")
        device = torch.device(f"cuda:{gpus[local_rank]}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT,
                            device_id=device if use_cuda else None)
    if rank != 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the life of the process
        logging.getLogger().setLevel(logging.ERROR)
    return device


def reduce_sum(tensor: "torch.Tensor") -> "torch.Tensor":
    """A tensor of sums added up over all processes (the tensor itself in a single process)."""
    if not is_distributed():
        return tensor
    import torch
    import torch.distributed as dist

    out = tensor.detach().clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    moved = out.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def any_true(*flags: bool) -> list[bool]:
    """For each flag, whether any process set it: all processes agree (one small all-reduce)."""
    if not is_distributed():
        return [bool(f) for f in flags]
    import torch

    summed = reduce_sum(torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64))
    return [bool(v > 0) for v in summed.tolist()]


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every process (e.g. the run folder it claimed)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(tensor: "torch.Tensor") -> "torch.Tensor":
    """Every process's rows (N_r, ...) concatenated in rank order (the tensor itself in one process)."""
    if not is_distributed():
        return tensor
    import torch
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts)


def broadcast_buffers(module: "torch.nn.Module") -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every process."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def broadcast_module(module: "torch.nn.Module") -> None:
    """Copy rank 0's parameters and buffers to every process."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def all_equal(tensors: list["torch.Tensor"]) -> bool:
    """Whether these tensors are bit-identical on every process (a hash of their bytes compared across ranks)."""
    if not is_distributed():
        return True
    import hashlib

    import torch
    import torch.distributed as dist

    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    value = int.from_bytes(digest.digest()[:7], "little")  # fits an int64
    high, low = torch.tensor([value]), torch.tensor([value])
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(high.item() == low.item())


def shutdown() -> None:
    """Leave the process group (at the end of a distributed run)."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launch_command(script: str = "main.py") -> str:
    """How this process was started, as the user types it again: `torchrun --standalone
    --nproc_per_node N main.py` under torchrun on one machine (N its processes), torchrun with
    --nnodes on several, `python main.py` in a single process."""
    if not launched_by_torchrun():
        return f"python {script}"
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", max(1, world // max(1, local))))
    if nodes <= 1:
        return f"torchrun --standalone --nproc_per_node {local} {script}"
    return f"torchrun --nnodes {nodes} --nproc_per_node {local} --rdzv_backend c10d --rdzv_endpoint HOST:PORT {script}"


def resume_command(run_path: str | os.PathLike, script: str = "main.py") -> str:
    """The command that continues the run in `run_path` from its last.pt, launched as this one was."""
    return f"{launch_command(script)} --save_path {shlex.quote(str(run_path))} --resume"


# What a collective (or DistributedDataParallel's gradient all-reduce) raises when another process of
# the run is gone: an error of the communication library (gloo, NCCL, c10d) that says the connection
# was reset or closed, a broken pipe, a timeout, NCCL's remote error.
_COMMUNICATION = re.compile(r"gloo|nccl|c10d", re.IGNORECASE)
_LOST_PROCESS = re.compile(r"connection (?:reset|closed|refused)[a-z ]*|broken pipe|timed? ?out|"
                           r"remote process exited|nccl error[^.\n]*", re.IGNORECASE)


def lost_process_reason(err: BaseException) -> str | None:
    """The short reason when `err` means another process of this torchrun job is gone (killed,
    crashed, out of memory, its machine stopped); None for any other error, or in one process."""
    if not launched_by_torchrun() or "torch.distributed" not in sys.modules or not isinstance(err, RuntimeError):
        return None
    import torch.distributed as dist

    text = str(err)
    if not (isinstance(err, getattr(dist, "DistError", ())) or _COMMUNICATION.search(text)):
        return None
    found = _LOST_PROCESS.search(text)
    return found.group(0).strip() if found else None


class LostProcess(UserError):
    """Another process of the run is gone: this one ends with one line (and without leaving the
    process group, which would wait for the process that is gone)."""


def lost_process_error(err: BaseException, resume: str | None = None) -> LostProcess | None:
    """The one line a surviving process ends with when another process of the run is gone (None when
    `err` is something else). From here the process only ends: torchrun's SIGTERM to the survivors
    is ignored, so it cannot cut the line off.

    Args:
        err: what the training raised.
        resume: the command that continues the run from its last.pt, or None when there is no last.pt yet.
    """
    reason = lost_process_reason(err)
    if reason is None:
        return None
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        pass
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    then = (f"continue from last.pt with: {resume}" if resume else
            f"no epoch was saved yet, so start the run again: {launch_command()} ...")
    return LostProcess(f"process {rank} of {world} stops: another process of the run ended ({reason}; torchrun's report "
                       f"says which and why); {then}")


def refuse_device_list(spec: str) -> None:
    """--device 0,1 in a single process: one line with the torchrun command to use instead.

    Raises:
        UserError: when `spec` names several devices and torchrun did not start this process.
    """
    if "," in str(spec) and not launched_by_torchrun():
        gpus = [g.strip() for g in str(spec).split(",") if g.strip()]
        raise UserError(f"--device {spec}: one process trains on one device; for {len(gpus)} GPUs run "
                        f"torchrun --standalone --nproc_per_node {len(gpus)} main.py --device {spec} ... "
                        "(the batch size is per process)")
