"""--resume continues as if never stopped: after whole epochs and after a SIGTERM mid-epoch.

The config uses StepLR, so the learning rate of an epoch does not depend on --epoch: a run
resumed with a larger --epoch must end bit-identical to a run that had that --epoch from the start.
The interrupted run is started for 3 epochs, stopped by SIGTERM right after step 3 of epoch 2 (an
optimizer-step hook sends it, so the stop is mid-epoch on any machine), and resumed with --epoch 4
(resume to completion of a longer run), so one uninterrupted 4-epoch run is the reference of both.
"""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import (run_main_stopped_after, assert_ok, describe, load_ckpt, make_split_dataset, run_many, run_script,
                      train_args)

CONFIG = """\
lr_scheduler: StepLR
lr_scheduler_params: {step_size: 1, gamma: 0.8}
random_seed: 0
plot_train_batch_count: 1
"""


STOP_AT_STEP = 3  # of epoch 2
STEPS_PER_EPOCH = 12  # 24 images, batch 2

def interrupt_in_epoch_2(args: list[str]) -> subprocess.CompletedProcess:
    """Run main.py and SIGTERM it right after step STOP_AT_STEP of epoch 2 (a hook, not a timer)."""
    return run_main_stopped_after(STEPS_PER_EPOCH + STOP_AT_STEP, args)


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    config = root / "steplr.yaml"
    config.write_text(CONFIG)
    data = make_split_dataset(root / "data", ["blue", "green", "red"], train=8, val=1, test=0)
    runs = root / "runs"

    def args(name: str, epochs: int) -> list[str]:  # batch 2: 12 steps per epoch
        return train_args(data, runs / name, "--config", config, "--batch_size", "2", "--epoch", epochs)

    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = pool.submit(run_script, "main.py", *args("ref4", 4))
        two = pool.submit(run_script, "main.py", *args("two", 2))
        stopped = interrupt_in_epoch_2(args("stopped", 3))
        reference, two = reference.result(), two.result()
    stopped_ckpt = load_ckpt(runs / "stopped" / "last.pt") if (runs / "stopped" / "last.pt").is_file() else None
    stopped_log = (runs / "stopped" / "train.log").read_text() if (runs / "stopped" / "train.log").is_file() else ""
    resumed_two, resumed_stopped = run_many([
        {"script": "main.py", "args": ["--save_path", runs / "two", "--resume", "--epoch", "4"]},
        {"script": "main.py", "args": ["--save_path", runs / "stopped", "--resume", "--epoch", "4"]},
    ])
    return {"runs": runs, "reference": reference, "two": two, "stopped": stopped, "stopped_ckpt": stopped_ckpt,
            "stopped_log": stopped_log, "resumed_two": resumed_two, "resumed_stopped": resumed_stopped}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_ckpt(a)["model"], load_ckpt(b)["model"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_reference_runs_finish(resume_runs: dict) -> None:
    assert_ok(resume_runs["reference"])
    assert_ok(resume_runs["two"])
    ref = load_ckpt(resume_runs["runs"] / "ref4" / "last.pt")
    assert ref["epoch"] == 4 and ref["train_state"]["step"] == 0
    lrs = [float(line.split(",")[1]) for line in (resume_runs["runs"] / "ref4" / "train.log").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([1e-3, 8e-4, 6.4e-4, 5.12e-4])  # the config's StepLR, not the default cosine


def test_resume_after_whole_epochs_equals_uninterrupted(resume_runs: dict) -> None:
    proc = resume_runs["resumed_two"]
    assert_ok(proc)
    assert "resuming" in proc.stdout and "epoch 3" in proc.stdout
    runs = resume_runs["runs"]
    assert load_ckpt(runs / "two" / "last.pt")["epoch"] == 4
    assert_same_weights(runs / "two" / "last.pt", runs / "ref4" / "last.pt")
    assert (runs / "two" / "train.log").read_text() == (runs / "ref4" / "train.log").read_text()


def test_sigterm_saves_last_checkpoint_mid_epoch(resume_runs: dict) -> None:
    proc = resume_runs["stopped"]
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert "--resume" in proc.stdout  # it says how to continue
    assert f"stopped at epoch 2, step {STOP_AT_STEP}" in proc.stdout
    ckpt = resume_runs["stopped_ckpt"]
    assert ckpt is not None, "no last.pt after SIGTERM"
    state = ckpt["train_state"]
    assert state["epoch"] == 1 and state["step"] == STOP_AT_STEP, (state["epoch"], state["step"])  # mid-epoch 2
    # the epoch's running sums are saved with it
    assert state["train_sums"] is not None and state["train_sums"]["count"] == 2 * STOP_AT_STEP
    assert len(resume_runs["stopped_log"].splitlines()) == 2  # header + epoch 1


def test_resume_after_sigterm_equals_uninterrupted(resume_runs: dict) -> None:
    proc = resume_runs["resumed_stopped"]
    assert_ok(proc)
    assert f"at epoch 2, step {STOP_AT_STEP}" in proc.stdout
    runs = resume_runs["runs"]
    assert_same_weights(runs / "stopped" / "last.pt", runs / "ref4" / "last.pt")
    assert (runs / "stopped" / "train.log").read_text() == (runs / "ref4" / "train.log").read_text()
    assert load_ckpt(runs / "stopped" / "best.pt")["epoch"] == load_ckpt(runs / "ref4" / "best.pt")["epoch"]
