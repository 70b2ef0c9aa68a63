"""Training on several processes: torchrun with 2 CPU processes (gloo) on tiny data.

One run folder, identical weights in every process, checkpoints that load in one process, each
process training on its own shard of every epoch (the images each one read, recorded), train.log's
losses and accuracies the sums over all processes (recomputed from what each process summed), the
validation accuracy of train.log equal to metrice.py's, exact resume (stopped mid-epoch by a signal
to one process, resumed with 2 processes, equal to the run that was never stopped), a resume with
1 process that reads exactly the images the 2 had not, and a NaN loss that stops every process in
one line. Processes that end badly: rank 0 killed (SIGKILL), torchrun stopped (SIGTERM), a signal
to one process only at the end of an epoch; the survivors end in one line that says how to resume,
with the torchrun command.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_CLASSES, assert_ok, describe, load_ckpt, make_split_dataset, reads, records,
                      recording_main, run_inprocess, run_script, train_args)

PROCESSES = 2
STEPS_PER_EPOCH = 3   # 24 images / 2 processes / batch 4
STOP_AFTER = STEPS_PER_EPOCH + 2  # rank 0 is signalled after step 2 of epoch 2
TRAIN_IMAGES = 24


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


def recorded(wrapper: Path, record_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """torchrun's `script` and `env` arguments that run main.py through RECORDING_MAIN, recording into record_dir."""
    record_dir.mkdir(parents=True, exist_ok=True)
    return {"script": wrapper, "env": {"RECORD_DIR": str(record_dir)} | (env or {})}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = make_split_dataset(root / "data", TINY_CLASSES, train=8, val=3, test=0)
    runs, reads_of = root / "runs", root / "records"
    wrapper = recording_main(root)
    main = str(REPO / "main.py")

    def args(name: str, epochs: int, under: Path = runs) -> list[str]:
        return train_args(data, under / name, "--batch_size", "4", "--epoch", epochs, "--test_path", root / "none",
                          "--patience", "0")

    straight = torchrun(main, *args("straight", 4), **recorded(wrapper, reads_of / "straight"))
    stopped = torchrun(main, *args("stopped", 4),
                       **recorded(wrapper, reads_of / "stopped", {"STOP_AFTER_STEP": str(STOP_AFTER)}))
    if (runs / "stopped").is_dir():
        shutil.copytree(runs / "stopped", runs / "stopped_one")  # to resume with one process too
    resumed = torchrun(main, "--save_path", runs / "stopped", "--resume", **recorded(wrapper, reads_of / "resumed"))
    return {"root": root, "data": data, "runs": runs, "straight": straight, "stopped": stopped, "resumed": resumed,
            "wrapper": wrapper, "records": reads_of, "args": args}


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


def test_rejection_fitted_by_two_processes_is_what_one_process_fits(ddp: dict) -> None:
    """Trainer.fit_ood under torchrun: each process ran its share of the training and val images,
    the sums and the scores were combined; one process refitting best.pt on the whole splits gets
    the same statistics and thresholds (utils.infer.ood.fit_model_ood)."""
    from utils.core.checkpoint import load_checkpoint
    from utils.data.sources import scan_split
    from utils.infer.ood import OodStats, fit_model_ood
    from utils.models.weights import model_from_checkpoint

    line = "unknown images (--reject): thresholds keeping 95% of 9 images known"
    assert ddp["straight"].stdout.count(line) == 1  # rank 0 prints
    ckpt = load_checkpoint(ddp["runs"] / "straight" / "best.pt")
    splits = {s: scan_split(ddp["data"] / s, class_names=list(ckpt.meta.class_names)).samples for s in ("train", "val")}
    spec, stats, _ = fit_model_ood(model_from_checkpoint(ckpt), ckpt.meta, splits["train"], splits["val"], 0.95, 4, 0,
                                   torch.device("cpu"))
    assert [k for k, _ in spec.thresholds] == [k for k, _ in ckpt.meta.ood.thresholds]
    for (name, one), (_, two) in zip(spec.thresholds, ckpt.meta.ood.thresholds):
        assert one == pytest.approx(two, rel=1e-5, abs=1e-6), name
    stored = OodStats.of_checkpoint(ckpt, "best.pt")
    assert np.allclose(stats.means, stored.means, atol=1e-5)
    assert np.allclose(stats.precision, stored.precision, rtol=1e-4, atol=1e-4)


def test_resume_mid_epoch_with_two_processes_equals_the_straight_run(ddp: dict) -> None:
    stopped, resumed = ddp["stopped"], ddp["resumed"]
    assert stopped.returncode != 0 and not our_traceback(stopped), describe(stopped)
    assert f"stopped at epoch 2, step {STOP_AFTER - STEPS_PER_EPOCH}" in stopped.stdout, describe(stopped)
    assert f"continue with: {TORCHRUN_HINT} --save_path {ddp['runs'] / 'stopped'} --resume" in stopped.stdout
    state = load_ckpt(ddp["runs"] / "stopped_one" / "last.pt")["train_state"]
    assert state["samples"] == (STOP_AFTER - STEPS_PER_EPOCH) * 4 * PROCESSES  # the global position
    assert_ok(resumed)
    assert "resuming" in resumed.stdout and "epoch 2, step 2" in resumed.stdout
    a = load_ckpt(ddp["runs"] / "stopped" / "last.pt")["model"]
    b = load_ckpt(ddp["runs"] / "straight" / "last.pt")["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    logs = [(ddp["runs"] / n / "train.log").read_text() for n in ("stopped", "straight")]
    assert logs[0] == logs[1]
    before, after = records(ddp["records"] / "stopped"), records(ddp["records"] / "resumed")
    assert_read_once([reads(before[r], 1) for r in before] + [reads(after[r], 1) for r in after])


def test_resume_a_two_process_run_with_one(ddp: dict) -> None:
    """One process continues at the global position the two reached: in the epoch that was cut
    short it reads exactly the images the two had not read."""
    run = ddp["runs"] / "stopped_one"
    proc = run_script(str(ddp["wrapper"]), REPO / "main.py", "--save_path", run, "--resume",
                      env=recorded(ddp["wrapper"], ddp["records"] / "one")["env"])
    assert_ok(proc)
    assert "resuming" in proc.stdout and "epoch 2, step 4" in proc.stdout and "distributed" not in proc.stdout
    assert load_ckpt(run / "last.pt")["epoch"] == 4
    assert len((run / "train.log").read_text().splitlines()) == 5
    two, one = records(ddp["records"] / "stopped"), records(ddp["records"] / "one")
    assert sorted(one) == [0] and [len(reads(two[r], 1)) for r in two] == [8, 8]
    assert_read_once([reads(two[0], 1), reads(two[1], 1), reads(one[0], 1)])
    assert_read_once([reads(one[0], 2)])  # and the next epoch whole, in the one process


def test_each_process_trains_on_its_own_shard(ddp: dict) -> None:
    """In every epoch the two processes read disjoint halves of the training set, together all of
    it, in a new order each epoch."""
    seen = records(ddp["records"] / "straight")
    assert sorted(seen) == [0, 1]
    for epoch in range(4):
        assert_read_once([reads(seen[rank], epoch) for rank in (0, 1)])
        assert len(reads(seen[0], epoch)) == len(reads(seen[1], epoch)) == TRAIN_IMAGES // PROCESSES
    assert reads(seen[0], 0) != reads(seen[0], 1)


def test_logged_metrics_are_the_sums_over_the_processes(ddp: dict) -> None:
    """train.log's loss and accuracy, training and validation, are those of every image of all
    processes: the losses and correct counts each process summed, added up (and not rank 0's own)."""
    seen = records(ddp["records"] / "straight")
    summed = [[r for r in seen[rank] if "metrics" in r] for rank in (0, 1)]
    assert len(summed[0]) == len(summed[1]) == 8  # per epoch: training, then validation
    rows = list(csv.DictReader((ddp["runs"] / "straight" / "train.log").open()))
    differs = False
    for k, (mine, other) in enumerate(zip(*summed)):
        count = mine["count"] + other["count"]
        assert count == (TRAIN_IMAGES if k % 2 == 0 else 9)
        loss, acc = (mine["loss_sum"] + other["loss_sum"]) / count, (mine["correct"] + other["correct"]) / count
        prefix = "" if k % 2 == 0 else "test_"
        row = rows[k // 2]
        assert float(row[f"{prefix}loss"]) == pytest.approx(loss, rel=1e-12), (k, row)
        assert float(row[f"{prefix}acc"]) == pytest.approx(acc, rel=1e-12), (k, row)
        differs |= mine["loss_sum"] / mine["count"] != pytest.approx(loss, rel=1e-9)
    assert differs, "rank 0's own loss equals the sum over the processes in every epoch: the test proves nothing"


def assert_read_once(shards: list[list[int]]) -> None:
    """These shards (images read in one epoch) hold every training image exactly once."""
    together = [i for shard in shards for i in shard]
    assert sorted(together) == list(range(TRAIN_IMAGES)), [sorted(s) for s in shards]


# ------------------------------------------------------------------ processes that end badly
TORCHRUN_HINT = f"torchrun --standalone --nproc_per_node {PROCESSES} main.py"


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines of a run, and no traceback from the toolkit's code or a process of it."""
    assert not our_traceback(proc) and not re.search(r"^\[rank\d+\]:", proc.stderr, re.M), describe(proc)
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_killed_process_leaves_the_other_one_line_and_the_torchrun_command_resumes(ddp: dict) -> None:
    """Rank 0 killed (SIGKILL) in epoch 2: rank 1 ends in one line that says so and how to resume;
    the command it names resumes the run."""
    run = ddp["root"] / "ended" / "killed"
    proc = torchrun(REPO / "main.py", *ddp["args"]("killed", 2, run.parent), script=ddp["wrapper"],
                    env={"STOP_AFTER_STEP": str(STOP_AFTER), "STOP_SIGNAL": "SIGKILL"})
    assert proc.returncode != 0 and "Signal 9 (SIGKILL) received" in proc.stderr, describe(proc)  # torchrun's report
    (line,) = error_lines(proc)
    hint = f"{TORCHRUN_HINT} --save_path {run} --resume"
    assert line.startswith("error: process 1 of 2 stops: another process of the run ended (") and \
        line.endswith(f"continue from last.pt with: {hint}"), line
    assert re.search(r"rank +: 1 \(local_rank: 1\)\n +exitcode +: 2 ", proc.stderr), describe(proc)  # a UserError's exit
    assert load_ckpt(run / "last.pt")["epoch"] == 1
    words = shlex.split(line.split(" with: ", 1)[1])
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", *words[1:]], cwd=REPO, capture_output=True,
                             text=True, env=dict(os.environ) | SUBPROCESS_ENV, timeout=600)
    assert_ok(resumed)
    assert f"resuming {run} at epoch 2" in resumed.stdout and "distributed: 2 processes" in resumed.stdout
    assert load_ckpt(run / "last.pt")["epoch"] == 2


def test_sigterm_to_torchrun_stops_every_process_with_the_torchrun_resume_hint(ddp: dict) -> None:
    """SIGTERM to torchrun in epoch 2: it passes it on, the processes stop together after the same
    step, rank 0 saves last.pt and names the torchrun command; no process fails or says more."""
    run = ddp["root"] / "ended" / "terminated"
    proc = torchrun(REPO / "main.py", *ddp["args"]("terminated", 2, run.parent), script=ddp["wrapper"],
                    env={"STOP_AFTER_STEP": str(STOP_AFTER), "STOP_TARGET": "torchrun"})
    assert proc.returncode != 0 and "got signal: 15" in proc.stderr, describe(proc)  # torchrun's own exception
    assert error_lines(proc) == []
    step = STOP_AFTER - STEPS_PER_EPOCH
    assert (f"stopped at epoch 2, step {step}: saved {run / 'last.pt'}; continue with: {TORCHRUN_HINT} --save_path {run} "
            "--resume") in proc.stdout, describe(proc)
    assert [line for line in proc.stderr.splitlines() if line == "interrupted"] == ["interrupted"]  # rank 0's alone
    assert load_ckpt(run / "last.pt")["train_state"]["samples"] == step * 4 * PROCESSES


def test_signal_to_one_process_at_the_end_of_an_epoch_stops_them_all(ddp: dict) -> None:
    """SIGTERM to rank 0 alone after the last step of epoch 1: both processes stop after that
    epoch (not rank 0 alone, leaving rank 1 to wait for it in epoch 2)."""
    run = ddp["root"] / "ended" / "epoch_end"
    proc = torchrun(REPO / "main.py", *ddp["args"]("epoch_end", 2, run.parent), script=ddp["wrapper"],
                    env={"STOP_AFTER_STEP": str(STEPS_PER_EPOCH)})
    assert proc.returncode != 0 and error_lines(proc) == [], describe(proc)
    assert (f"stopped after epoch 1: saved {run / 'last.pt'}; continue with: {TORCHRUN_HINT} --save_path {run} "
            "--resume") in proc.stdout, describe(proc)
    assert load_ckpt(run / "last.pt")["epoch"] == 1


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


def test_resume_command_is_the_launch_the_process_had(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume hint names how the run was started: python, torchrun on one machine with its
    process count, or torchrun on several machines."""
    from utils.core.distributed import lost_process_reason, resume_command

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert resume_command("runs/my exp") == "python main.py --save_path 'runs/my exp' --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("runs/exp") == "torchrun --standalone --nproc_per_node 4 main.py --save_path runs/exp --resume"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert resume_command("runs/exp").startswith("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d")
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:61570: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    assert lost_process_reason(gloo) == "Connection reset by peer"
    assert lost_process_reason(RuntimeError("DataLoader timed out after 5 seconds")) is None  # not a lost process
