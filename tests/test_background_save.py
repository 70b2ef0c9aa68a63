"""Checkpoints written in the background (utils.core.checkpoint.CheckpointWriter) and main.py --save_period.

- the file written is the state at the save call, however training changes the tensors before the
  writer gets to them (the snapshot is a copy, also when its buffers are reused);
- a writer killed mid-file (kill -9) leaves the previous last.pt whole and loadable, its temporary
  hidden and removed by the next run; no partial file is ever named last.pt;
- a background write that fails is one error line and exit code 2, with last.pt as it was;
- --save_period 3: a run killed in epoch 5 resumes from epoch 3's end, where it says it does.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from conftest import REPO, SUBPROCESS_ENV, TrainedRun, assert_ok, assert_user_error, describe, run_inprocess, run_script
from utils.core.checkpoint import load_checkpoint
from utils.core.run import Run, RunFolder
from utils.core.schema import ModelMeta, PreprocessSpec
from utils.train.saver import CheckpointSaver
from utils.train.state import ModuleState, TrainState

TEMP_NAME = re.compile(r"^\..*\.tmp-\d+-")  # utils.core.files' temporaries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_run(run: Path, dest: Path) -> Path:
    """A run folder's files (not its folders) copied to `dest`."""
    dest.mkdir(parents=True)
    for file in run.iterdir():
        if file.is_file() and not TEMP_NAME.match(file.name):
            shutil.copy2(file, dest / file.name)
    return dest


def _parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainState]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()  # AdamW's moments exist
    state = TrainState()
    state.add("model", ModuleState(model))
    state.add("optimizer", optimizer)
    return model, optimizer, state


def _saver(folder: Path, state: TrainState) -> tuple[CheckpointSaver, Run]:
    run = Run(folder)
    meta = ModelMeta("tiny", ("a", "b"), PreprocessSpec(resize=5, crop=5, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    saver = CheckpointSaver(run, meta, {"epoch": 3}, "acc", 0, background=True)
    state.add("best", saver)
    return saver, run


def test_last_pt_is_the_state_at_the_save_call_not_a_later_one(tmp_path: Path, monkeypatch) -> None:
    """The writer is held back until the model and the optimizer have moved on; the file still
    holds the state at the call (twice: the second save reuses the first snapshot's buffers)."""
    import utils.core.checkpoint as checkpoint

    model, optimizer, state = _parts()
    saver, run = _saver(tmp_path / "run", state)
    release, writing = threading.Event(), threading.Event()
    real_write = checkpoint._write

    def held_write(obj, path, prepare):
        writing.set()
        assert release.wait(30)
        real_write(obj, path, prepare)

    monkeypatch.setattr(checkpoint, "_write", held_write)
    for epoch in (1, 2):
        state.epoch = epoch
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        moment = optimizer.state[model[0].weight]["exp_avg"].clone()
        release.clear()
        writing.clear()
        saver.save_last(state, background=True)
        assert writing.wait(30)  # the writer has the snapshot and waits
        with torch.no_grad():  # what the next training steps do to the tensors, in place
            for p in model.parameters():
                p.add_(1.0)
            optimizer.state[model[0].weight]["exp_avg"].mul_(3.0)
        model[1].running_mean.add_(5.0)
        release.set()
        run.wait_saves()
        saved = load_checkpoint(run.last)
        assert saved.epoch == epoch
        for key, value in expected.items():
            assert torch.equal(saved.model[key], value), key
        assert torch.equal(saved.train_state["optimizer"]["state"][0]["exp_avg"], moment)


KILLED_WRITER = """
import os, sys, threading, time
import torch
sys.path.insert(0, sys.argv[2])
import utils.core.checkpoint as checkpoint
from utils.core.run import Run
from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
folder = sys.argv[1]
meta = ModelMeta("tiny", ("a", "b"), PreprocessSpec(resize=5, crop=5, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
ckpt = lambda value, epoch: Checkpoint(kind="last", meta=meta, model={"w": torch.full((256, 1024), value)}, epoch=epoch,
                                       args={}, train_state={"epoch": epoch})
run = Run(folder)
run.save("last.pt", ckpt(1.0, 1))  # the previous last.pt, written whole
real_save = torch.save
def slow_save(obj, path):  # half of the new file, then the writer stalls until it is killed
    real_save(obj, path)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    open(os.path.join(folder, "writing"), "w").close()
    time.sleep(600)
torch.save = slow_save
run.save("last.pt", ckpt(2.0, 2), background=True)
time.sleep(600)
"""


def test_a_writer_killed_mid_file_leaves_the_previous_last_pt_whole(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder), str(REPO)], env=dict(os.environ) | SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "writing").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    temps = [p.name for p in folder.iterdir() if TEMP_NAME.match(p.name)]
    assert temps and all(name.startswith(".last.pt.tmp-") for name in temps), temps  # the half file: hidden
    data = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert data["epoch"] == 1 and torch.equal(data["model"]["w"], torch.full((256, 1024), 1.0))  # the previous, whole
    Run(folder)  # the next run of this folder removes the dead writer's temporary
    assert not [p.name for p in folder.iterdir() if TEMP_NAME.match(p.name)]


def test_a_failed_background_write_is_one_line_and_last_pt_stays_as_it_was(trained_run: TrainedRun, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """The writer thread's torch.save of last.pt writes part of the file, then the device fails."""
    run = copy_run(trained_run.path, tmp_path / "exp")
    before = sha256(run / RunFolder.LAST)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if threading.current_thread().name.startswith("checkpoint-writer") and ".last.pt.tmp-" in str(path):
            Path(path).write_bytes(b"PK" * 1000)
            raise OSError(errno.EIO, "Input/output error")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    proc = run_inprocess("main.py", "--save_path", run, "--resume", "--epoch", trained_run.epochs + 1)
    assert_user_error(proc, f"writing {run / 'last.pt'} failed (Input/output error)", "the previous last.pt is intact",
                      "--resume")
    assert f"epoch {trained_run.epochs + 1}/{trained_run.epochs + 1}" in proc.stdout, describe(proc)  # it trained
    assert sha256(run / RunFolder.LAST) == before
    assert load_checkpoint(run / RunFolder.LAST).epoch == trained_run.epochs
    assert not [p.name for p in run.iterdir() if TEMP_NAME.match(p.name)]  # the partial temporary was removed


# main.py killed with SIGKILL right after optimizer step KILL_AFTER_STEP, once every checkpoint write given
# so far is on the disk (so what last.pt holds depends on what was saved, not on the writer's speed)
KILLED_AFTER_WRITES = """
import os, runpy, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from torch.optim.optimizer import register_optimizer_step_post_hook
from utils.core import checkpoint
writers, init = [], checkpoint.CheckpointWriter.__init__
def recorded_init(self):
    init(self)
    writers.append(self)
checkpoint.CheckpointWriter.__init__ = recorded_init
after, steps = int(os.environ["KILL_AFTER_STEP"]), [0]
def hook(optimizer, args, kwargs):
    steps[0] += 1
    if steps[0] == after:
        for writer in writers:
            writer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(hook)
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_save_period_resumes_from_the_last_saved_epoch(trained_run: TrainedRun, tmp_path: Path) -> None:
    """trained_run (2 epochs) resumed to 5 with --save_period 3 and killed (SIGKILL) in epoch 5: last.pt
    holds epoch 3 (not 4), and --resume says and does epoch 4 onwards."""
    run = copy_run(trained_run.path, tmp_path / "exp")
    steps = 3  # tiny_data: 24 training images, batch 8
    script = tmp_path / "killed_main.py"
    script.write_text(KILLED_AFTER_WRITES)
    proc = run_script(str(script), REPO / "main.py", "--save_path", run, "--resume", "--epoch", 5, "--save_period", 3,
                      env={"KILL_AFTER_STEP": str(2 * steps + 1)})
    assert proc.returncode == -signal.SIGKILL, describe(proc)
    assert "epoch 4/5" in proc.stdout, describe(proc)  # epochs 3 and 4 finished
    assert load_checkpoint(run / RunFolder.LAST).epoch == 3
    resumed = run_inprocess("main.py", "--save_path", run, "--resume")
    assert_ok(resumed)
    assert f"resuming {run} at epoch 4\n" in resumed.stdout, describe(resumed)
    assert [int(r.split(",")[0]) for r in (run / RunFolder.LOG).read_text().splitlines()[1:]] == [1, 2, 3, 4, 5]
    assert load_checkpoint(run / RunFolder.LAST).epoch == 5


def test_save_period_below_one_is_refused(tmp_path: Path) -> None:
    proc = run_inprocess("main.py", "--save_period", "0", "--save_path", tmp_path / "exp")
    assert_user_error(proc, "--save_period must be 1 or more")


def test_the_first_curves_wait_for_their_share_of_the_time(tmp_path: Path, monkeypatch) -> None:
    """A fresh log draws loss.png ... only once FIRST_DRAW_SECONDS / CURVE_SHARE have passed since it was
    made (short epochs do not pay a drawing each at the start), and at the end in any case."""
    from utils.train import epoch_log

    clock = {"now": 100.0}
    drawn: list[int] = []
    monkeypatch.setattr(epoch_log.time, "monotonic", lambda: clock["now"])

    def fake_plot(rows, metrics):
        clock["now"] += 1.0  # a drawing takes one (fake) second: the next is due 1 / CURVE_SHARE seconds later
        drawn.append(len(rows))
        return {}

    monkeypatch.setattr(epoch_log, "plot_curves", fake_plot)
    log = epoch_log.EpochLog(Run(tmp_path / "run"), epochs=10)
    due = epoch_log.FIRST_DRAW_SECONDS / epoch_log.CURVE_SHARE
    for epoch in (1, 2):
        clock["now"] += due / 2 - 1
        log.write(epoch_log.EpochRecord(epoch, 1e-3, 1.0, {"loss": 1.0, "acc": 0.5, "mean_acc": 0.5}, None, True))
    assert drawn == []  # under `due` seconds of training: no drawing yet
    clock["now"] += 2
    log.write(epoch_log.EpochRecord(3, 1e-3, 1.0, {"loss": 1.0, "acc": 0.5, "mean_acc": 0.5}, None, False))
    assert drawn == [3]
    log.write(epoch_log.EpochRecord(4, 1e-3, 1.0, {"loss": 1.0, "acc": 0.5, "mean_acc": 0.5}, None, False))
    assert drawn == [3]  # not due again yet
    log.close()
    assert drawn == [3, 4]  # the end draws the rows not drawn yet
