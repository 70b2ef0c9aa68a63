"""What the speed work changed must not change results: the fused optimizer step, the curve-drawing
budget, and the scripts' fast exit (the heap settled where the work starts)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TrainedRun, assert_ok, run_inprocess, run_script, train_args
from utils.core.run import RunFolder
from utils.train.optim import build_optimizer


# ------------------------------------------------------------------------------- fused step
def small_model() -> nn.Module:
    """(No bias before the batch norm: its gradient is rounding noise, which Adam scales up to steps.)"""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("name, fused", [("AdamW", True), ("SGD", True), ("adam", True), ("momentum", True),
                                         ("RMSProp", None), ("lion", None)])
def test_torch_optimizers_take_their_fused_step_on_the_cpu(name: str, fused: bool | None) -> None:
    optimizer = build_optimizer(small_model(), name, 1e-2, 0.01, 0.0 if name == "momentum" else 0.9)
    assert optimizer.defaults.get("fused") is fused
    assert all(group.get("fused") is fused for group in optimizer.param_groups)


LOOP_OPTIMIZERS = {"AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-2, foreach=False),
                   "SGD": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True, foreach=False)}


@pytest.mark.parametrize("name", list(LOOP_OPTIMIZERS))
def test_fused_step_is_the_per_tensor_step(name: str) -> None:
    """Three steps of build_optimizer's (fused) optimizer land where torch's per-tensor loop does
    with pytorch-classifier's settings: weight decay 0.05 on the weights, none on biases and norm layers."""
    fused_model = small_model()
    loop_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, name, 1e-2, 0.05, 0.9)
    assert fused.defaults["fused"] is True
    loop = LOOP_OPTIMIZERS[name]([
        {"params": [p for p in loop_model.parameters() if p.ndim > 1], "weight_decay": 0.05},
        {"params": [p for p in loop_model.parameters() if p.ndim <= 1], "weight_decay": 0.0}])
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for _ in range(3):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (n, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(fused_model.parameters(), small_model().parameters()))
    assert moved > 1e-3  # the steps did something


# ------------------------------------------------------------------------------ curve budget
class FakeRun(RunFolder):
    """A run folder that records the figures saved into it instead of drawing them."""

    main = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saved: list[str] = []

    def savefig(self, fig: object, name: str) -> None:
        self.saved.append(name)


def test_curves_are_redrawn_within_their_share_of_the_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """loss.png, acc.png and lr.png: drawn once the time since the last drawing is 1/CURVE_SHARE
    times what it took (the first: once due, set by hand here); when forced (end of run, stop) whenever a
    row was written since the last drawing, and never twice for the same rows."""
    from utils.train import epoch_log

    (tmp_path / "train.log").write_text("epoch,lr,loss,acc,mean_acc,test_loss,test_acc,test_mean_acc\n"
                                        "1,0.001,2.0,0.3,0.3,2.1,0.25,0.25\n")
    clock = {"now": 100.0}

    def fake_plot(rows, metrics):
        clock["now"] += 1.0  # drawing takes one (fake) second
        return {"loss.png": object(), "acc.png": object(), "lr.png": object()}

    monkeypatch.setattr(epoch_log.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(epoch_log, "plot_curves", fake_plot)
    log = epoch_log.EpochLog.__new__(epoch_log.EpochLog)
    log.run, log.metrics, log._drawn_at, log._draw_seconds = FakeRun(tmp_path), ("acc", "mean_acc"), None, 0.0
    log._rows, log._drawn_rows = 1, 0                               # epoch 1's row is written
    log.draw_curves(force=False)
    assert log.run.saved == ["loss.png", "acc.png", "lr.png"]       # the first epoch draws
    due = 1.0 / epoch_log.CURVE_SHARE
    log._rows += 1
    clock["now"] += due - 0.5
    log.draw_curves(force=False)
    assert len(log.run.saved) == 3                                   # not yet: it would exceed the share
    clock["now"] += 0.5
    log.draw_curves(force=False)
    assert len(log.run.saved) == 6                                   # due now
    log.draw_curves(force=True)
    assert len(log.run.saved) == 6                                   # the end, but these rows are drawn already
    log._rows += 1
    log.draw_curves(force=True)
    assert len(log.run.saved) == 9                                   # a new row: the end of the run draws it
    clock["now"] += 10 * due
    log.draw_curves(force=False)
    assert len(log.run.saved) == 9                                   # due, but nothing new to show
    assert epoch_log.CURVE_SHARE <= 0.02


# ------------------------------------------------------------------------------- fast exit
def test_scripts_exit_with_their_code_and_flushed_output(tmp_path: Path) -> None:
    """exit_cli ends the process with run_cli's code; everything printed and written is there."""
    missing = tmp_path / "nothing"
    proc = run_script("processing.py", "--data_path", missing, "--output_path", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and str(missing) in proc.stderr
    proc = run_script("main.py", "--help")
    assert proc.returncode == 0 and "--cache_images" in proc.stdout and proc.stderr == ""


def test_exit_cli_collects_garbage_before_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finalisers of what is already garbage run (a loader's workers stop, files close) before the
    live objects are frozen out of the collector; then the exit code goes out."""
    import gc

    from utils.core.log import exit_cli

    finalised = []

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            finalised.append(True)

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    gc.disable()
    try:
        Cycle()
        with pytest.raises(SystemExit) as exit_info:
            exit_cli(3)
    finally:
        gc.enable()
    assert finalised == [True] and calls == ["freeze"] and exit_info.value.code == 3


def test_settle_heap_freezes_only_in_a_scripts_own_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a test or a notebook (run_cli in-process) settle_heap does nothing: frozen objects that
    later become garbage would never be freed. In a script's own process it freezes the heap."""
    import gc

    import utils.core.log

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    utils.core.log.settle_heap()
    assert calls == []
    monkeypatch.setattr(utils.core.log, "_OWN_PROCESS", True)
    utils.core.log.settle_heap()
    assert calls == ["freeze"]


def test_script_main_is_a_scripts_own_process(tmp_path: Path) -> None:
    """script_main (every script's __main__ line) lets settle_heap act, and exits with run_cli's code."""
    code = ("import gc, sys, utils.core.log as L\n"
            "def main(args):\n"
            "    L.settle_heap(); print('frozen', gc.get_freeze_count() > 0, flush=True)\n"
            "    raise L.UserError('stop here')\n"
            "L.script_main(main, lambda argv: None)\n")
    script = tmp_path / "probe.py"
    script.write_text(code)
    proc = run_script(str(script), env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.stdout.strip() == "frozen True" and proc.returncode == 2 and proc.stderr.strip() == "error: stop here"


def test_training_and_prediction_settle_the_heap_where_the_work_starts(tiny_data: Path, trained_run: TrainedRun,
                                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main.py freezes once, after the model and the data are built and before the first epoch;
    predict.py once, after the model is loaded and before the first batch. (And main.py draws the
    curves once per new train.log row at most.)"""
    import gc

    import utils.core.log
    import utils.train.engine
    import utils.train.epoch_log

    events: list[str] = []
    monkeypatch.setattr(utils.core.log, "_OWN_PROCESS", True)
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    train_one_epoch = utils.train.engine.train_one_epoch
    monkeypatch.setattr("utils.train.trainer.train_one_epoch", lambda *a, **k: events.append("epoch") or train_one_epoch(*a, **k))
    plot_curves = utils.train.epoch_log.plot_curves
    monkeypatch.setattr("utils.train.epoch_log.plot_curves", lambda *a: events.append("curves") or plot_curves(*a))
    assert_ok(run_inprocess("main.py", *train_args(tiny_data, tmp_path / "run", "--epoch", "2")))
    # the curves: not before their share of the time is due (epochs of a second or so: not during this run),
    # then once at the end for both rows (never twice)
    assert events == ["freeze", "epoch", "epoch", "curves"]
    assert (tmp_path / "run" / "loss.png").is_file()

    events.clear()
    load_batch = utils.infer.loader.PredictDataset.load_batch
    monkeypatch.setattr(utils.infer.loader.PredictDataset, "load_batch", lambda self, i: events.append("batch") or load_batch(self, i))
    assert_ok(run_inprocess("predict.py", "--source", tiny_data / "test", "--save_path", trained_run.path, "--device", "cpu"))
    assert events[:2] == ["freeze", "batch"] and events.count("freeze") == 1
