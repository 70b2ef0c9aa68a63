"""Training on several processes: torchrun with 2 CPU processes (gloo) on tiny data.

One run folder, identical weights in every process, checkpoints that load in one process, the
validation accuracy of train.log equal to metrice.py's, exact resume (stopped mid-epoch by a signal
to one process, resumed with 2 processes, equal to the run that was never stopped), a resume with
1 process, and a NaN loss that stops every process in one line.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_CLASSES, assert_ok, describe, load_ckpt, make_split_dataset, run_inprocess,
                      run_script, train_args)

PROCESSES = 2
STEPS_PER_EPOCH = 3   # 24 images / 2 processes / batch 4
STOP_AFTER = STEPS_PER_EPOCH + 2  # rank 0 is signalled after step 2 of epoch 2

# main.py under torchrun, with one addition on rank 0: SIGTERM to itself right after a known
# optimizer step. The other process is not signalled: the processes must agree to stop together.
SIGNAL_RANK0 = """
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
after = int(os.environ["STOP_AFTER_STEP"])
steps = 0
def hook(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == after and os.environ.get("RANK") == "0":
        os.kill(os.getpid(), signal.SIGTERM)
register_optimizer_step_post_hook(hook)
script = sys.argv.pop(1)
sys.argv[0] = script
sys.path.insert(0, os.path.dirname(script))  # as `python main.py` would
runpy.run_path(script, run_name="__main__")
"""


def our_traceback(proc: subprocess.CompletedProcess) -> bool:
    """Whether a traceback ran through the toolkit's code (torchrun prints its own when a process
    exits non-zero: that one is expected)."""
    return re.search(rf'File "{re.escape(str(REPO))}/(?!\.venv)', proc.stderr) is not None


def torchrun(*args: object, script: Path = REPO / "main.py", env: dict[str, str] | None = None,
             nproc: int = PROCESSES) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script),
           *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV | (env or {}), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = make_split_dataset(root / "data", TINY_CLASSES, train=8, val=3, test=0)
    runs = root / "runs"
    wrapper = root / "signal_rank0.py"
    wrapper.write_text(SIGNAL_RANK0)

    def args(name: str, epochs: int) -> list[str]:
        return train_args(data, runs / name, "--batch_size", "4", "--epoch", epochs, "--test_path", root / "none",
                          "--patience", "0")

    straight = torchrun(*args("straight", 4))
    stopped = torchrun(str(REPO / "main.py"), *args("stopped", 4), script=wrapper, env={"STOP_AFTER_STEP": str(STOP_AFTER)})
    if (runs / "stopped").is_dir():
        shutil.copytree(runs / "stopped", runs / "stopped_one")  # to resume with one process too
    resumed = torchrun("--save_path", runs / "stopped", "--resume")
    return {"root": root, "data": data, "runs": runs, "straight": straight, "stopped": stopped, "resumed": resumed}


def test_two_processes_train_one_run(ddp: dict) -> None:
    proc = ddp["straight"]
    assert_ok(proc)
    assert sorted(p.name for p in ddp["runs"].iterdir()) == ["stopped", "stopped_one", "straight"]  # no exp2 of a 2nd rank
    assert "distributed: 2 processes (gloo), batch 4 per process = 8 per step" in proc.stdout
    assert proc.stdout.count("weights identical on all 2 processes") == 1  # rank 0 prints, the other rank does not
    assert proc.stdout.count("epoch 4/4") == 1
    run = ddp["runs"] / "straight"
    assert len((run / "train.log").read_text().splitlines()) == 5


def test_checkpoints_load_in_one_process(ddp: dict) -> None:
    from utils.core.checkpoint import load_checkpoint
    from utils.models.weights import model_from_checkpoint

    for name in ("best.pt", "last.pt"):
        raw = torch.load(ddp["runs"] / "straight" / name, map_location="cpu", weights_only=True)
        assert not any(k.startswith("module.") for k in raw["model"]), "DistributedDataParallel's prefix was saved"
        model = model_from_checkpoint(load_checkpoint(ddp["runs"] / "straight" / name))
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_validation_accuracy_is_the_whole_split(ddp: dict) -> None:
    run = ddp["runs"] / "straight"
    rows = list(csv.DictReader((run / "train.log").open()))
    best = load_ckpt(run / "best.pt")
    logged = float(rows[best["epoch"] - 1]["test_acc"])
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "val", "--device", "cpu", "--workers", "0")
    assert proc.returncode == 0, describe(proc)
    measured = {r["metric"]: r["value"] for r in csv.DictReader((run / "val" / "metrics.csv").open())}
    assert float(measured["acc"]) == pytest.approx(logged, abs=1e-9)
    assert int(float(measured["images"])) == 9  # every val image once: no padded duplicate counted


def test_resume_mid_epoch_with_two_processes_equals_the_straight_run(ddp: dict) -> None:
    stopped, resumed = ddp["stopped"], ddp["resumed"]
    assert stopped.returncode != 0 and not our_traceback(stopped), describe(stopped)
    assert f"stopped at epoch 2, step {STOP_AFTER - STEPS_PER_EPOCH}" in stopped.stdout, describe(stopped)
    state = load_ckpt(ddp["runs"] / "stopped_one" / "last.pt")["train_state"]
    assert state["samples"] == (STOP_AFTER - STEPS_PER_EPOCH) * 4 * PROCESSES  # the global position
    assert_ok(resumed)
    assert "resuming" in resumed.stdout and "epoch 2, step 2" in resumed.stdout
    a = load_ckpt(ddp["runs"] / "stopped" / "last.pt")["model"]
    b = load_ckpt(ddp["runs"] / "straight" / "last.pt")["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    logs = [(ddp["runs"] / n / "train.log").read_text() for n in ("stopped", "straight")]
    assert logs[0] == logs[1]


def test_resume_a_two_process_run_with_one(ddp: dict) -> None:
    run = ddp["runs"] / "stopped_one"
    proc = run_script("main.py", "--save_path", run, "--resume")
    assert_ok(proc)
    assert "resuming" in proc.stdout and "distributed" not in proc.stdout
    assert load_ckpt(run / "last.pt")["epoch"] == 4
    assert len((run / "train.log").read_text().splitlines()) == 5


def test_nan_loss_on_the_processes_stops_them_all(ddp: dict) -> None:
    proc = torchrun(*train_args(ddp["data"], ddp["root"] / "nan", "--batch_size", "4", "--lr", "1e30", "--warmup",
                                "--warmup_ratios", "0.5", "--epoch", "2"))
    assert proc.returncode != 0, describe(proc)
    assert "error: training stopped: loss is" in proc.stderr, describe(proc)
    assert not our_traceback(proc), describe(proc)


def test_device_list_without_torchrun_says_how() -> None:
    proc = run_inprocess("main.py", "--device", "0,1")
    assert proc.returncode == 2
    assert "torchrun --standalone --nproc_per_node 2 main.py" in proc.stderr, proc.stderr


def test_each_process_evaluates_its_share_once() -> None:
    """Validation and test shards cover every image exactly once (no padded duplicate is scored);
    training shards are padded so the processes step together, and skip a global position."""
    from types import SimpleNamespace

    from utils.data.loaders import EpochSampler
    from utils.train.trainer import Trainer

    for world in (2, 3, 4):
        shards = [[i for _, i in Trainer.eval_sampler(SimpleNamespace(rank=r, world=world), 9)] for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(9)), (world, shards)
        train = [EpochSampler(9, True, seed=1, rank=r, world_size=world) for r in range(world)]
        for s in train:
            s.set_epoch(3, skip=4)
        keys = [[i for _, i in s] for s in train]
        whole = EpochSampler(9, True, seed=1)
        whole.set_epoch(3)
        rest = [i for _, i in whole][4:]  # the epoch's order after the first 4, whatever the process count
        assert len({len(k) for k in keys}) == 1 and set().union(*map(set, keys)) == set(rest)
