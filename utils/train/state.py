"""Everything a training run would lose if the process stopped, saved and restored as one.

    state = TrainState()
    state.add("model", ModuleState(model))
    state.add("optimizer", optimizer)
    state.add("scaler", scaler, required=False)        # may be absent when a CPU run resumes on a GPU
    last = state.state_dict()                          # plain tensors and values: last.pt's train_state
    fresh.load_state_dict(last)                        # same tensors, same RNG streams, same position

A part is anything with `state_dict()` / `load_state_dict()`; adding a component to training is
one `add` call, and saving (last.pt) and resuming (--resume) pick it up. Besides the parts the
state holds the position in the run (epoch, step within it, the running sums of a half-done
epoch) and the Python, numpy and torch RNG states.
"""
from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from utils.core.log import UserError
from utils.models.weights import load_module_state


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class ModuleState:
    """A module (the model, distillation layers) as a TrainState part: its state_dict as CPU
    tensors in their own precision (last.pt holds the exact weights; best.pt keeps float16 ones).
    On the CPU they are the module's own tensors, not copies: whoever keeps them while training
    goes on copies them (the background checkpoint writer snapshots them into buffers it reuses)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_module_state(self.module, state)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned (CUDA states only when the GPU count matches)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class TrainState:
    """The stateful parts of a training run and its position.

    Attributes:
        epoch: epochs completed (0-based index of the epoch in progress).
        step: batches each process did in that epoch (non-zero only when stopped mid-epoch).
        samples: training images all processes together took in that epoch (where a resumed run
            continues, with any number of processes).
        sums: the running metric sums of a half-done epoch (utils.evaluate.metrics.EpochSums.state_dict), or None.
        extra: the running sums of the objective's extra terms (e.g. kd_loss) of a half-done epoch.
    """

    POSITION = ("epoch", "step", "samples", "train_sums", "train_extra", "rng")

    def __init__(self) -> None:
        self.parts: dict[str, Stateful] = {}
        self.required: dict[str, bool] = {}
        self.epoch = 0
        self.step = 0
        self.samples = 0
        self.sums: dict[str, Any] | None = None
        self.extra: dict[str, float] | None = None

    def add(self, name: str, part: Stateful | None, required: bool = True) -> None:
        """Register a part under `name` (None: nothing to add). A part that is not `required` may
        be missing from a saved state (it then starts fresh)."""
        if name in self.POSITION or name in self.parts:
            raise ValueError(f"TrainState part name '{name}' is taken")
        if part is not None:
            self.parts[name] = part
            self.required[name] = required

    def state_dict(self) -> dict[str, Any]:
        """Every part's state, the position and the RNG states."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state.update(epoch=self.epoch, step=self.step, samples=self.samples, train_sums=self.sums, train_extra=self.extra,
                     rng=rng_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part, the position and the RNG states.

        Raises:
            UserError: the saved state lacks a required part (it was saved by a run with other options).
        """
        missing = [name for name in self.parts if state.get(name) is None and self.required[name]]
        if missing:
            raise UserError(f"the saved training state has no {', '.join(missing)}: it was written by a run with other "
                            "options, so it cannot be resumed exactly")
        for name, part in self.parts.items():
            if state.get(name) is not None:
                part.load_state_dict(state[name])
        self.epoch, self.step = int(state["epoch"]), int(state.get("step") or 0)
        self.samples = int(state.get("samples") or 0)  # 0 in files written before it was kept
        self.sums, self.extra = state.get("train_sums"), state.get("train_extra")
        set_rng_state(state["rng"])
