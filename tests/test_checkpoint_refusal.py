"""A checkpoint holding a pickled object is refused by every script that loads one, and never run.

The poisoned files are real checkpoints of a trained run with one extra entry: an object whose
unpickling calls open(MARKER, "w"), i.e. creates a file. Loading them the unsafe way creates the
marker (checked first, so the payload is known to work); every loader must stop with one error
line and exit code 2, and the marker must never appear. (Random bytes, as in test_cli_errors, fail
to load whatever the loader does; these files load fine without weights_only=True.)
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_user_error, load_ckpt, run_inprocess, train_args


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle is executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def poisoned(trained_run: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of a trained run whose best.pt and last.pt each carry a Payload."""
    root = tmp_path_factory.mktemp("poisoned")
    run = root / "run"
    shutil.copytree(trained_run.path, run, ignore=shutil.ignore_patterns("events.out.*", "*.png"))
    marker = root / "EXECUTED"
    for name in ("best.pt", "last.pt"):
        ckpt = load_ckpt(run / name)
        ckpt["note"] = Payload(marker)
        torch.save(ckpt, run / name)
    # the payload is live: the unsafe load runs it
    torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert marker.is_file(), "the payload did not run under weights_only=False: the test would prove nothing"
    marker.unlink()
    return {"root": root, "run": run, "marker": marker}


def loader_cases(poisoned: dict[str, Path], tiny_data: Path) -> dict[str, tuple[str, list[Any], str]]:
    run, out = poisoned["run"], poisoned["root"] / "out"
    image = next((tiny_data / "test" / "red").iterdir())
    return {
        # case: (script, arguments, the file the error must name)
        "main --resume (last.pt)": ("main.py", ["--save_path", run, "--resume", "--epoch", "5"], "last.pt"),
        "main --kd --teacher_path (best.pt)": ("main.py", train_args(tiny_data, out / "student", "--kd", "--teacher_path", run), "best.pt"),
        "main --weight (best.pt)": ("main.py", train_args(tiny_data, out / "weight", "--weight", run / "best.pt"), "best.pt"),
        "predict.py (best.pt)": ("predict.py", ["--source", image, "--save_path", run, "--device", "cpu", "--workers", "0"], "best.pt"),
        "metrice.py (best.pt)": ("metrice.py", ["--save_path", run, "--device", "cpu", "--workers", "0"], "best.pt"),
        "export.py (best.pt)": ("export.py", ["--save_path", run, "--export", "onnx", "--device", "cpu"], "best.pt"),
    }


CASES = ["main --resume (last.pt)", "main --kd --teacher_path (best.pt)", "main --weight (best.pt)", "predict.py (best.pt)",
         "metrice.py (best.pt)", "export.py (best.pt)"]


@pytest.mark.parametrize("case", CASES)
def test_pickled_checkpoint_is_refused_and_never_executed(poisoned: dict[str, Path], tiny_data: Path, case: str) -> None:
    script, args, filename = loader_cases(poisoned, tiny_data)[case]
    assert set(CASES) == set(loader_cases(poisoned, tiny_data))
    proc = run_inprocess(script, *args)
    line = assert_user_error(proc, filename)
    assert "safe" in line, line  # "cannot be loaded safely", "as a safe weights file"
    assert not poisoned["marker"].exists(), f"{case}: the pickled object was executed"
    assert not (poisoned["root"] / "out" / "weight" / "last.pt").exists()  # nothing was trained from it
