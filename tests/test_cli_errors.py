"""Bad input gets one clear line on stderr and exit code 2, never a traceback.

Every case fails at start-up, so they run main.py's command line in this process (run_cli with
stdout/stderr captured: what a subprocess would print and return, without seconds of imports per
case), in one module fixture; each test checks one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import (TINY_CLASSES, assert_user_error, describe, make_class_folders, make_split_dataset, run_inprocess,
                      train_args)
from utils.core.log import UserError


@pytest.fixture(scope="module")
def error_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("errors")
    save = root / "runs" / "exp"

    no_classes = root / "no_classes" / "train"
    no_classes.mkdir(parents=True)
    (no_classes / "loose.png").write_bytes((tiny_data / "train" / "red" / "img0.png").read_bytes())

    with_empty = make_class_folders(root / "with_empty" / "train", {"apple": 3, "pear": 3})
    (with_empty / "plum").mkdir()

    unknown_val = make_split_dataset(root / "unknown_val", TINY_CLASSES, train=3, val=1, test=0)
    make_class_folders(unknown_val / "val", {"zebra": 1})

    no_last = root / "no_last"
    no_last.mkdir()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())

    config = root / "bad_config.yaml"
    config.write_text("lr: 0.01\nlearning_rate: 0.1\n")

    def train(data: Path | None, *extra: object, **paths: Path) -> list[str]:
        args = train_args(data, save, *extra)
        for flag, value in paths.items():
            args += [f"--{flag}", str(value)]
        return args

    cases = {
        "missing_train": train(tiny_data, train_path=root / "nowhere"),
        "no_class_folders": train(tiny_data, train_path=no_classes),
        "empty_class_folder": train(tiny_data, train_path=with_empty),
        "val_unknown_class": train(unknown_val),
        "batch_size_0": train(tiny_data, "--batch_size", "0"),
        "image_size_0": train(tiny_data, "--image_size", "0"),
        "mistyped_flag": train(tiny_data, "--epohcs", "3"),
        "resume_no_last": ["--save_path", str(no_last), "--resume"],
        "resume_corrupt_last": ["--save_path", str(corrupt), "--resume"],
        "config_unknown_key": train(tiny_data, "--config", config),
    }
    procs = [run_inprocess("main.py", *args) for args in cases.values()]
    return {"root": root, "save": save, **dict(zip(cases, procs))}


EXPECTED = {
    # case: words the one error line must hold
    "missing_train": ["nowhere", "not found"],
    "no_class_folders": ["no class folders", "no_classes"],
    "empty_class_folder": ["plum", "no readable images"],
    "val_unknown_class": ["zebra", "val"],
    "batch_size_0": ["--batch_size"],
    "image_size_0": ["--image_size"],
    "resume_no_last": ["last.pt", "not found"],
    "resume_corrupt_last": ["last.pt", "cannot be loaded"],
    "config_unknown_key": ["learning_rate", "bad_config.yaml"],
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_is_one_error_line(error_runs: dict, case: str) -> None:
    assert_user_error(error_runs[case], *EXPECTED[case])


def test_mistyped_flag_is_refused_with_a_hint(error_runs: dict) -> None:
    proc = error_runs["mistyped_flag"]
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr == "error: unknown flag --epohcs; did you mean --epochs? (--help lists them all)\n", describe(proc)


def test_refused_runs_leave_no_run_folder(error_runs: dict) -> None:
    # every case failed before the run folder was made (or in a folder that already existed)
    assert not error_runs["save"].exists()
    assert sorted(p.name for p in (error_runs["root"] / "corrupt").iterdir()) == ["last.pt"]


def test_resume_of_a_finished_run_asks_for_more_epochs(trained_run) -> None:
    import main

    with pytest.raises(UserError, match=r"already trained all 2 epochs.*--epoch"):
        main.resume_options(main.parse_args(["--save_path", str(trained_run.path), "--resume"]))
    args, ckpt = main.resume_options(main.parse_args(["--save_path", str(trained_run.path), "--resume", "--epoch", "5"]))
    assert args.epoch == 5 and ckpt.epoch == 2
    assert args.loss == "CrossEntropyLoss" and args.optimizer == "SGD"  # the run's own options come back
