"""main.py end to end: every --loss and --optimizer, the run folder, checkpoints, --weight (a run's best.pt or
last.pt, a plain state_dict: the tensors the model starts from)."""
from __future__ import annotations

import argparse
import csv
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (TINY_CLASSES, TINY_MODEL, TRAIN_LOG_HEADER, TrainedRun, assert_ok, assert_user_error, built_trainer,
                      load_ckpt, make_split_dataset, run_many, train_args)

LOSS_OPTIMIZER = [("CrossEntropyLoss", "SGD"), ("FocalLoss", "AdamW"), ("PolyLoss", "RMSProp")]


def read_log(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("loss,optimizer", LOSS_OPTIMIZER)
def test_run_folder_artifacts(trained_runs: dict, loss: str, optimizer: str) -> None:
    run: TrainedRun = trained_runs[loss]
    assert_ok(run.proc)
    for name in ("args.yaml", "label.txt", "train.log", "best.pt", "last.pt", "train_batch0.png",
                 "loss.png", "acc.png", "lr.png"):
        path = run.path / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} missing in {run.path}"
    assert list(run.path.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run.path / "label.txt").read_text(encoding="utf-8").splitlines() == TINY_CLASSES

    options = yaml.safe_load((run.path / "args.yaml").read_text(encoding="utf-8"))
    assert options["loss"] == loss and options["optimizer"] == optimizer
    assert options["model_name"] == TINY_MODEL and options["epoch"] == run.epochs
    assert options["save_path"] == str(run.path)
    for key in ("lr_scheduler", "lr_scheduler_params", "random_seed", "plot_train_batch_count"):  # from the config
        assert key in options

    header, rows = read_log(run.path / "train.log")
    assert header == TRAIN_LOG_HEADER
    assert [int(r["epoch"]) for r in rows] == list(range(1, run.epochs + 1))
    for row in rows:
        values = {k: float(v) for k, v in row.items()}  # every column filled (a val set exists)
        assert 0.0 <= values["acc"] <= 1.0 and 0.0 <= values["test_acc"] <= 1.0
        assert values["loss"] > 0 and values["lr"] > 0


def test_run_prints_its_folder_and_evaluates_test_set(trained_run: TrainedRun) -> None:
    out = trained_run.proc.stdout
    assert f"run folder: {trained_run.path}" in out.splitlines()
    assert "test (9 images, best.pt)" in out


def test_tensorboard_has_the_curves(trained_run: TrainedRun) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = trained_run.path.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr", "train_loss", "train_acc", "test_loss", "test_acc"} <= tags
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]


def test_checkpoints_load_safely_with_documented_keys(trained_run: TrainedRun) -> None:
    best = load_ckpt(trained_run.path / "best.pt")
    last = load_ckpt(trained_run.path / "last.pt")

    assert best["format"] == "pytorch-classifier-ng" and best["version"] == 3 and best["kind"] == "best"
    for key in ("model", "model_name", "num_classes", "class_names", "image_size", "image_channel", "mean", "std",
                "preprocess", "args", "epoch", "metrics", "best", "weights"):
        assert key in best, f"best.pt lacks {key}"
    assert best["model_name"] == TINY_MODEL and best["num_classes"] == 3
    assert best["class_names"] == TINY_CLASSES
    assert best["image_size"] == 32 and best["image_channel"] == 3
    assert len(best["mean"]) == 3 and len(best["std"]) == 3
    assert best["preprocess"]["crop"] == 32 and best["preprocess"]["mean"] == best["mean"]
    assert isinstance(best["args"], dict) and best["args"]["loss"] == "CrossEntropyLoss"
    assert 1 <= best["epoch"] <= 2
    assert best["metrics"]["val"] is not None and "acc" in best["metrics"]["val"]
    floats = [v for v in best["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)

    assert last["kind"] == "last" and last["epoch"] == 2
    state = last["train_state"]
    for key in ("model", "optimizer", "scheduler", "best", "rng", "epoch", "step"):
        assert key in state, f"last.pt's train_state lacks {key}"
    assert state["epoch"] == 2 and state["step"] == 0
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())
    assert all(torch.equal(last["model"][k], v) for k, v in state["model"].items())
    assert state["optimizer"]["state"], "optimizer state is empty"
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["best"]["epoch"] == best["epoch"] == last["best"]["epoch"]
    # best.pt holds the weights of its epoch: when that is the last one, they match last.pt (to fp16)
    if best["epoch"] == last["epoch"]:
        for key, value in last["model"].items():
            if value.is_floating_point():
                torch.testing.assert_close(best["model"][key].float(), value, atol=1e-2, rtol=1e-2)


def test_best_checkpoint_rebuilds_the_model(trained_run: TrainedRun) -> None:
    from utils.core.checkpoint import load_checkpoint
    from utils.models.weights import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(trained_run.path / "best.pt"))
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_same_save_path_is_incremented_and_first_run_untouched(trained_runs: dict) -> None:
    second: TrainedRun = trained_runs["FocalLoss"]
    first: TrainedRun = trained_runs["CrossEntropyLoss"]
    assert first.path.name == "exp" and second.path.name == "exp2"
    assert f"run folder: {second.path}" in second.proc.stdout.splitlines()
    assert (second.path / "last.pt").is_file()
    assert trained_runs["first_after"] == trained_runs["first_before"], "the second run changed runs/exp"
    assert yaml.safe_load((first.path / "args.yaml").read_text())["loss"] == "CrossEntropyLoss"


# ------------------------------------------------------------------------------------ --weight
@pytest.fixture(scope="module")
def weight_cases(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """--weight from the 3-class run into a 4-class run (lr 1e-30, so the loaded weights stay), and
    --weight of a pickled Python object (refused by the safe loader)."""
    root = tmp_path_factory.mktemp("weight")
    data4 = make_split_dataset(root / "data4", ["a", "b", "c", "d"], train=4, val=2, test=0)
    pickled = root / "object.pt"
    pickled.write_bytes(pickle.dumps(argparse.Namespace(lr=0.1)))  # a pickled object: refused by weights_only
    best = trained_run.path / "best.pt"
    jobs = [
        {"script": "main.py", "args": train_args(data4, root / "runs" / "four", "--weight", best, "--lr", "1e-30",
                                                 "--batch_size", "4")},
        {"script": "main.py", "args": train_args(data4, root / "runs" / "pickle", "--weight", pickled)},
    ]
    four, pickle_proc = run_many(jobs)
    return {"four": four, "four_path": root / "runs" / "four", "source": best, "pickle": pickle_proc}


def test_weight_from_run_with_other_classes(weight_cases: dict) -> None:
    proc = weight_cases["four"]
    assert_ok(proc)
    assert "skipped fc.weight" in proc.stderr and "skipped fc.bias" in proc.stderr, proc.stderr
    source = load_ckpt(weight_cases["source"])["model"]
    new = load_ckpt(weight_cases["four_path"] / "best.pt")
    assert new["num_classes"] == 4 and new["model"]["fc.weight"].shape[0] == 4
    convs = [k for k, v in source.items() if v.ndim == 4]
    assert convs
    for key in convs:  # lr 1e-30 moves no float32 weight: the convolutions still hold the loaded values exactly
        assert torch.equal(new["model"][key], source[key]), key


def test_weight_loads_every_tensor_of_a_last_pt_or_a_plain_state_dict(monkeypatch: pytest.MonkeyPatch,
                                                                      trained_run: TrainedRun, tiny_data: Path,
                                                                      tmp_path: Path) -> None:
    """--weight last.pt (float32 weights beside the training state), a plain state_dict file, and one
    under 'state_dict' with DistributedDataParallel's 'module.' prefix: the model main.py builds
    holds exactly their tensors before any step."""
    from utils.models.registry import create_model

    last = load_ckpt(trained_run.path / "last.pt")["model"]
    torch.manual_seed(5)  # not the run's seed: other weights than the model main.py would start from
    other = {k: v.clone() for k, v in create_model(TINY_MODEL, num_classes=3).state_dict().items()}
    torch.save(other, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in other.items()}, "epoch": 9}, tmp_path / "wrapped.pth")
    for source, expected in ((trained_run.path / "last.pt", last), (tmp_path / "plain.pt", other),
                             (tmp_path / "wrapped.pth", other)):
        trainer = built_trainer(monkeypatch, *train_args(tiny_data, tmp_path / f"from_{source.stem}", "--weight", source))
        start = trainer.model.state_dict()
        assert start.keys() == expected.keys()
        assert [k for k in expected if not torch.equal(start[k], expected[k])] == [], source.name


def test_weight_that_is_a_pickled_object_is_refused(weight_cases: dict) -> None:
    assert_user_error(weight_cases["pickle"], "--weight", "object.pt")


def test_load_weights_refuses_files_that_are_not_weights(tmp_path: Path) -> None:
    from utils.core.log import UserError
    from utils.models.registry import create_model
    from utils.models.weights import load_weights

    model = create_model(TINY_MODEL, num_classes=3)
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    with pytest.raises(UserError, match="--weight"):
        load_weights(model, text)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "note": "no tensors"}, other)
    with pytest.raises(UserError, match="no state_dict"):
        load_weights(model, other)
    foreign = tmp_path / "foreign.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(UserError, match="none of its 1 tensors fit"):
        load_weights(model, foreign)
