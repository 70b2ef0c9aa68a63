"""main.py --lr_find, the learning-rate range test (utils.train.lr_find): its suggestion on a problem
whose divergent lr is known (gradient descent on a quadratic), its smoothing and stop, and the command
line end to end (files, printed suggestion, no weights, one lr per optimizer update, refusals)."""
from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (assert_ok, assert_user_error, describe, run_inprocess, run_script, train_args,
                      write_multilabel_split)
from utils.core.task import MULTICLASS
from utils.evaluate.metrics import new_sums
from utils.train.engine import StepParts
from utils.train.lr_find import RangeTest, run_range_test


def read_rows(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def steepest_reference(lrs: list[float], smoothed: list[float], skip: int = 5) -> float:
    """The documented rule, written again: argmin of d(smoothed)/d(log lr) from update `skip` to the minimum."""
    slope = np.gradient(np.array(smoothed), np.log(np.array(lrs)))
    end = int(np.argmin(smoothed)) + 1
    return lrs[skip + int(np.argmin(slope[skip:end]))]


@pytest.mark.parametrize("curvature", [0.5, 8.0])
def test_quadratic_suggestion_lies_in_the_convergent_band_and_the_test_stops_after_divergence(curvature: float) -> None:
    """Full-batch gradient descent on 0.5 |XW - Y|^2 / N with X'X/N = curvature * I converges for
    lr < 2/curvature (fastest at 1/curvature) and diverges above: the suggestion must lie well inside,
    and the test must stop soon after 2/curvature, before its last step."""
    torch.manual_seed(0)
    n, d, k = 64, 8, 3
    q, _ = torch.linalg.qr(torch.randn(n, d))
    x = q * math.sqrt(n * curvature)  # every eigenvalue of the Hessian is `curvature`
    y = torch.randint(0, k, (n,))
    model = nn.Linear(d, k, bias=False)

    def objective(m: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = m(images)
        return 0.5 * ((logits - nn.functional.one_hot(targets, k).float()) ** 2).sum(1).mean(), logits, {}

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    test = RangeTest(optimizer, 1e-4, 1e3, 100)
    loader = [{"images": x, "targets": y, "failed": []}]  # one batch: each pass is one full-batch update
    result = run_range_test(model, StepParts(objective, optimizer), loader, torch.device("cpu"), nn.Identity(),
                            lambda: new_sums(MULTICLASS, k), test)
    limit = 2 / curvature
    assert 0.05 / curvature < result.steepest < limit / 2, (result.steepest, limit)
    assert result.minimum_tenth < limit
    assert result.stop == "diverged" and len(result.lrs) < 100
    assert limit < result.lrs[-1] < 10 * limit  # not before the divergence, and within ~14 updates of it
    assert all(a > b for a, b in zip(result.losses[30:45], result.losses[31:46]))  # falling well below the limit


def test_smoothing_is_bias_corrected_and_divergence_is_four_times_the_best() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    test = RangeTest(optimizer, 1e-3, 1.0, 50, smoothing=0.9)
    losses = [1.0, 0.8, 0.6, 0.5, 0.5, 0.6, 1.0, 3.0, 9.0, 30.0, 100.0]
    stopped_at = next(i for i, loss in enumerate(losses) if test.record(loss))
    average, expected = 0.0, []
    for i, loss in enumerate(losses[:stopped_at + 1], 1):
        average = 0.9 * average + 0.1 * loss
        expected.append(average / (1 - 0.9 ** i))
    assert test.smoothed == pytest.approx(expected)
    first = next(i for i, s in enumerate(expected) if s > 4 * min(expected[:i + 1]))
    assert stopped_at == first and test.stop == "diverged"
    assert test.lrs == pytest.approx([1e-3 * 1000 ** (i / 49) for i in range(stopped_at + 1)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(test.lrs[-1])  # no lr set after the stop


def test_main_lr_find_writes_the_curve_and_suggestion_and_no_weights(tiny_data: Path, tmp_path: Path) -> None:
    proc = run_script("main.py", *train_args(tiny_data, tmp_path / "find", "--lr_find", "--lr_find_steps", "40",
                                              "--lr_find_start", "1e-5", "--lr_find_end", "100", "--optimizer", "SGD"))
    assert_ok(proc)
    run = tmp_path / "find"
    assert (run / "lr_find.png").stat().st_size > 0 and (run / "args.yaml").is_file()
    assert not list(run.rglob("*.pt")), sorted(p.name for p in run.iterdir())
    rows = read_rows(run / "lr_find.csv")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and 10 <= len(rows) <= 40
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(1e-5)
    assert np.allclose(np.array(lrs[1:]) / np.array(lrs[:-1]), 1e7 ** (1 / 39))  # exponential, to 100 at step 40
    assert len(rows) == 40 or "diverged" in proc.stdout or "not finite" in proc.stdout
    printed = float(re.search(r"suggested lr: (\S+)", proc.stdout).group(1))
    expected = steepest_reference(lrs, [r["smoothed"] for r in rows])
    assert printed == pytest.approx(expected, rel=2e-3), describe(proc)  # printed to 3 digits
    # the command printed trains the same run at that lr
    command = re.search(r"train with it: python main.py (.*)", proc.stdout).group(1)
    import main as main_script

    trained = main_script.parse_args(shlex.split(command))
    asked = main_script.parse_args(train_args(tiny_data, tmp_path / "find", "--optimizer", "SGD"))
    assert not trained.lr_find and trained.lr == pytest.approx(printed, rel=2e-3)
    assert trained.replace(lr=0, explicit=None).to_dict() == asked.replace(lr=0, explicit=None).to_dict()


def test_one_lr_per_optimizer_update_with_accumulate_amp_and_freeze(tiny_data: Path, tmp_path: Path) -> None:
    """--accumulate 2: each update sees two batches and one lr; the lr each update ran with is the csv's;
    --freeze: only the head (fc.weight, fc.bias) gets gradients, as in the first epochs of training."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    used: list[float] = []
    trained: list[int] = []

    def hook(opt: torch.optim.Optimizer, *_: object) -> None:
        used.append(opt.param_groups[0]["lr"])
        trained.append(sum(p.grad is not None for g in opt.param_groups for p in g["params"]))

    handle = register_optimizer_step_post_hook(hook)
    try:
        proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "acc", "--lr_find", "--lr_find_steps", "7",
                                                     "--accumulate", "2", "--amp", "--freeze", "1", "--batch_size", "6"))
    finally:
        handle.remove()
    assert_ok(proc)
    rows = read_rows(tmp_path / "acc" / "lr_find.csv")
    assert len(rows) == 7 and used == pytest.approx([r["lr"] for r in rows])  # 24 images / 6 = 4 batches: 2 updates a pass
    assert trained == [2] * 7


def test_multilabel_lr_find_uses_the_tasks_loss(tmp_path: Path) -> None:
    lists = {s: write_multilabel_split(tmp_path, s, n, seed) for s, n, seed in (("train", 16, 0), ("val", 4, 1))}
    proc = run_inprocess("main.py", *train_args(None, tmp_path / "ml", "--lr_find", "--lr_find_steps", "6",
                                                 "--train_path", lists["train"], "--val_path", lists["val"],
                                                 "--test_path", ""))
    assert_ok(proc)
    assert "loss: BCEWithLogitsLoss" in (tmp_path / "ml" / "args.yaml").read_text()
    first = read_rows(tmp_path / "ml" / "lr_find.csv")[0]["loss"]
    assert 0.4 < first < 0.9  # a sigmoid per class at the start: about log 2 each, not a softmax's log 4


@pytest.mark.parametrize("flags, needle", [
    (["--resume"], "--resume"),
    (["--kfold", "3"], "--kfold"),
    (["--lr_find_start", "1", "--lr_find_end", "0.1"], "0 < start < end"),
    (["--lr_find_steps", "2"], "--lr_find_steps"),
])
def test_lr_find_refuses_what_makes_no_sense(flags: list[str], needle: str, tiny_data: Path, tmp_path: Path) -> None:
    proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "r", "--lr_find", *flags))
    assert_user_error(proc, needle)
    assert not (tmp_path / "r").exists()


def test_lr_find_refuses_torchrun(monkeypatch: pytest.MonkeyPatch, tiny_data: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_user_error(run_inprocess("main.py", *train_args(tiny_data, tmp_path / "r", "--lr_find")), "torchrun")


def test_steepest_lr_is_the_fastest_fall_per_decade_before_the_minimum() -> None:
    """Known answers: the slope is taken against log(lr), so lrs that are not evenly spaced on the log
    axis change which point is steepest (against the index, 1e-4 would be); none before 3 points."""
    from utils.train.lr_find import steepest_lr

    lrs, smoothed = [1e-4, 1e-3, 1.1e-3, 1e-1, 1.0], [2.0, 1.5, 1.45, 1.0, 3.0]
    assert steepest_lr(lrs, smoothed, skip_start=0) == 1.1e-3
    assert steepest_lr(lrs, smoothed, skip_start=3) == 1.1e-3  # the skip never leaves fewer than 2 points
    assert steepest_lr([1e-3, 1e-2, 1e-1], [1.0, 0.5, 2.0], skip_start=0) == 1e-3
    assert steepest_lr([1e-3, 1e-2], [1.0, 0.5]) is None
    # the default skip of the first 5 updates, on 6: the last two points are searched (not the steep start)
    six = [10.0 ** k for k in range(-6, 0)]
    assert steepest_lr(six, [3.0, 1.0, 0.9, 0.8, 0.65, 0.6]) == six[4]
    # the minimum is the first point: the window would be empty, so the whole curve is searched
    assert steepest_lr([1e-3, 1e-2, 1e-1, 1.0], [0.5, 0.9, 0.6, 2.0], skip_start=0) == 1e-2  # the gentlest rise
