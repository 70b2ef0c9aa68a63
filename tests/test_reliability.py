"""Reliability: no user file deleted or overwritten, one clear line for bad input, nothing lost on a kill.

Each test below reproduces one failure found by trying the toolkit as a new user would (bad
inputs, kills, concurrent runs); the data-loss cases checksum the user's files before and after.
"""
from __future__ import annotations

import importlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, TINY_CLASSES, assert_ok, describe, make_split_dataset, run_many, run_script, snapshot, train_args
from utils.core.log import UserError, run_cli


def cli(script: str, *args: Any, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run a script's main in this process as its command line would; (exit code, its error line or '')."""
    module = importlib.import_module(script)
    capsys.readouterr()
    try:
        code = run_cli(module.main, module.parse_args, [str(a) for a in args])
    except SystemExit as err:  # argparse's own errors
        code = int(err.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code in (0, 130) or len(lines) == 1, err  # 130: interrupted
    return code, lines[0] if lines else ""


def tiny_png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """A small raw dataset: 3 classes x 5 images."""
    for c in range(3):
        for k in range(5):
            tiny_png(tmp_path / "raw" / f"class{c}" / f"{k}.png", 40 * c + k)
    return tmp_path / "raw"


# ------------------------------------------------------------------------------- data loss
def test_label_path_that_is_a_folder_is_refused_untouched(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    user = tmp_path / "p"
    (user / "sub").mkdir(parents=True)
    (user / "t.txt").write_text("mine")
    before = snapshot(user)
    code, line = cli("processing", "--data_path", raw, "--output_path", tmp_path / "o", "--label_path", user, "--force",
                     capsys=capsys)
    assert code == 2 and "is a folder" in line
    assert snapshot(user) == before


def test_label_path_equal_to_output_path_deletes_nothing(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o4"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, line = cli("processing", "--data_path", raw, "--output_path", out, "--label_path", out, "--force", capsys=capsys)
    assert code == 2 and "is a folder" in line
    assert snapshot(out) == before


def test_sample_never_replaces_a_users_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    user = tmp_path / "u"
    for name in ("0", "1"):
        tiny_png(user / name / "mine.png")
    (user / "notes.txt").write_text("mine")
    before = snapshot(user)
    code, line = cli("processing", "--sample", "digits", "--data_path", user, "--output_path", tmp_path / "o", "--force",
                     capsys=capsys)
    assert code == 2 and "did not write" in line and "--force" not in line  # no advice that would not help
    assert snapshot(user) == before


def test_force_replaces_only_what_processing_wrote(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    assert cli("processing", "--data_path", raw, "--output_path", out, capsys=capsys)[0] == 0
    assert cli("processing", "--data_path", raw, "--output_path", out, "--force", "--seed", "1", capsys=capsys)[0] == 0
    (out / "train" / "class0" / "mine.txt").write_text("mine")   # the user adds a file to the split
    before = snapshot(out)
    code, line = cli("processing", "--data_path", raw, "--output_path", out, "--force", capsys=capsys)
    assert code == 2 and "did not write" in line and "mine.txt" in line
    assert snapshot(out) == before
    other = tmp_path / "other"  # a folder of the user's own, never written by processing.py
    tiny_png(other / "train" / "x" / "a.png")
    (other / "label.txt").write_text("x\n")
    before = snapshot(other)
    code, line = cli("processing", "--data_path", raw, "--output_path", other, "--force", capsys=capsys)
    assert code == 2 and "did not write" in line
    assert snapshot(other) == before


def test_export_never_overwrites_a_users_file(tmp_path: Path, small_run: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "e"
    out.mkdir()
    (out / "best.onnx").write_bytes(b"my own model")
    before = snapshot(out)
    code, line = cli("export", "--save_path", small_run, "--export", "onnx", "--output_path", out, "--device", "cpu",
                     capsys=capsys)
    assert code == 2 and "not written by export.py" in line and "best.onnx" in line
    assert snapshot(out) == before
    # its own earlier export is replaced, atomically
    out2 = tmp_path / "e2"
    assert cli("export", "--save_path", small_run, "--export", "onnx", "--output_path", out2, "--device", "cpu",
               capsys=capsys)[0] == 0
    assert cli("export", "--save_path", small_run, "--export", "onnx", "--output_path", out2, "--device", "cpu",
               capsys=capsys)[0] == 0
    assert sorted(p.name for p in out2.iterdir()) == ["best.onnx", "best.onnx.json"]


def test_kill_after_last_pt_keeps_the_epochs_row(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from utils.train.saver import CheckpointSaver

    run = tmp_path / "run"
    original = CheckpointSaver.save_last

    def killed_after_save(self: CheckpointSaver, state: Any, **kwargs: Any) -> None:
        original(self, state, **kwargs)  # last.pt is in place (or being written: the way out waits for it) ...
        if state.epoch == 1:
            raise KeyboardInterrupt  # ... and the process dies before anything else happens

    monkeypatch.setattr(CheckpointSaver, "save_last", killed_after_save)
    code, _ = cli("main", *train_args(tiny_data, run, "--epoch", "2"), capsys=capsys)
    assert code == 130
    monkeypatch.setattr(CheckpointSaver, "save_last", original)
    assert cli("main", "--save_path", run, "--resume", capsys=capsys)[0] == 0
    epochs = [line.split(",")[0] for line in (run / "train.log").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]


# ------------------------------------------------------------------- one line, exit 2
@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch resnet10t run on 3 tiny classes."""
    root = tmp_path_factory.mktemp("small")
    data = make_split_dataset(root / "data", TINY_CLASSES, train=4, val=2, test=0)
    proc = run_script("main.py", *train_args(data, root / "run", "--test_path", root / "none", "--batch_size", "4"))
    assert_ok(proc)
    return root / "run"


def test_checkpoint_that_lacks_keys_is_one_line_everywhere(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "pytorch-classifier-ng/1"}, run / "best.pt")
    torch.save({"format": "pytorch-classifier-ng/1"}, run / "last.pt")
    calls = [("metrice", "--save_path", run, "--test_path", tiny_data / "test"),
             ("predict", "--source", tiny_data / "test", "--save_path", run),
             ("export", "--save_path", run, "--export", "onnx"),
             ("main", "--save_path", run, "--resume")]
    for script, *args in calls:
        code, line = cli(script, *args, "--device", "cpu", capsys=capsys)
        assert code == 2 and "lacks 'model_name'" in line, (script, line)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt"]


WRONG_VALUES = {"list": [0.1, 0.2], "mapping": {"a": 1}, "word": "abc", "fraction": 16.5, "bool": True, "number": 123}


def _expected_kind(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, list):
        return "list"
    if isinstance(default, dict):
        return "mapping"
    return "str"


def _fits(kind: str, value: Any) -> bool:
    """Whether a value is of the kind a key takes (the test's own table, not the code's): a whole
    number is fine where a name is taken (device: 0, a class named 10)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list)
    if kind == "mapping":
        return isinstance(value, dict)
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def test_config_fuzz_every_key_every_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import main
    from utils.core.config import CONFIG_ONLY_KEYS

    parser = main.get_args_parser()
    keys = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "config")}
    bare_flags = {a.dest: a.const for a in parser._actions if a.nargs == "?" and a.const is not None}
    keys |= CONFIG_ONLY_KEYS | {"custom_augment": [], "lr_scheduler": "StepLR"}
    checked = 0
    for key, default in keys.items():
        kind = _expected_kind(default)
        for label, value in WRONG_VALUES.items():
            if _fits(kind, value) or (kind == "str" and default is None and isinstance(value, str)):
                continue
            if key in bare_flags and isinstance(value, bool):
                continue  # `compile: true` is the bare flag; pytorch-classifier's configs say `class_balance: true`
            config = tmp_path / f"{key}_{label}.yaml"
            config.write_text(yaml.safe_dump({key: value}))
            code = None
            capsys.readouterr()
            try:
                main.parse_args(["--config", str(config)])
            except UserError as err:
                code, line = 2, str(err)
            except SystemExit as err:  # argparse's own error for a value out of the choices
                code, line = int(err.code), capsys.readouterr().err
            assert code == 2, f"config {key}: {value!r} was accepted"
            assert key in line, line
            checked += 1
    assert checked > 200  # every key met several wrong types
    assert {"class_balance", "compile"} <= set(bare_flags)
    for key, const in bare_flags.items():  # true is the bare flag, false the flag left out
        config = tmp_path / f"{key}_bool.yaml"
        config.write_text(f"{key}: true\n")
        assert getattr(main.parse_args(["--config", str(config)]), key) == const
        config.write_text(f"{key}: false\n")
        assert getattr(main.parse_args(["--config", str(config)]), key) == parser.get_default(key)
    config = tmp_path / "fraction.yaml"
    config.write_text("image_size: 32.5\n")
    with pytest.raises(UserError, match="'image_size' must be an integer"):
        main.parse_args(["--config", str(config)])
    config.write_text("lr: '0.01'\nepoch: '3'\ndevice: 0\n")  # read as the command line reads them
    args = main.parse_args(["--config", str(config)])
    assert args.lr == 0.01 and args.epoch == 3 and args.device == "0"


@pytest.mark.parametrize("flag", ["--lr", "--weight_decay", "--momentum", "--label_smoothing", "--kd_ratio"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_refused(flag: str, value: str, capsys: pytest.CaptureFixture) -> None:
    code, line = cli("main", flag, value, "--device", "cpu", capsys=capsys)
    assert code == 2 and flag in line and "finite" in line, line


# -------------------------------------------------------------------------- wrong results
def test_symlink_loop_counts_each_image_once(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from utils.data.sources import scan_split

    (raw / "class0" / "loop").symlink_to(".")           # a loop inside a class folder
    (raw / "class1" / "up").symlink_to("..")            # a link back to the split folder
    (raw / "class2" / "again.png").symlink_to(raw / "class2" / "0.png")  # the same image twice
    image_set = scan_split(raw)
    assert len(image_set.samples) == 15 and image_set.class_counts() == [5, 5, 5]
    reasons = dict(image_set.skipped)
    assert "scanned already" in reasons[str(raw / "class0" / "loop")]
    assert "scanned already" in reasons[str(raw / "class1" / "up")]
    assert "same file" in reasons[str(raw / "class2" / "again.png")]

    out = tmp_path / "out"
    assert cli("processing", "--data_path", raw, "--output_path", out, capsys=capsys)[0] == 0
    splits = {s: sorted(p.relative_to(out / s).as_posix() for p in (out / s).rglob("*.png")) for s in ("train", "val", "test")}
    every = splits["train"] + splits["val"] + splits["test"]
    assert len(every) == len(set(every)) == 15  # disjoint, each image once

    from utils.infer.sources import find_images

    assert len(find_images(raw).files) == 15  # what predict.py predicts


def test_device_cuda_without_a_gpu_is_an_error() -> None:
    from utils.core.device import select_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    for spec in ("cuda", "cuda:0", "0"):
        with pytest.raises(UserError, match="no CUDA GPU"):
            select_device(spec)
    assert select_device("").type == "cpu" and select_device("cpu").type == "cpu"


def test_hidden_class_folder_is_listed_among_the_skipped(raw: Path) -> None:
    from utils.data.sources import scan_split

    tiny_png(raw / ".hidden" / "x.png")
    (raw / ".DS_Store").write_bytes(b"\0")
    image_set = scan_split(raw)
    assert image_set.class_names == ["class0", "class1", "class2"]
    reasons = dict(image_set.skipped)
    assert reasons[str(raw / ".hidden")] == "hidden folder" and reasons[str(raw / ".DS_Store")] == "hidden file"


# ------------------------------------------------------------------------------- leftovers
def test_resume_removes_temporaries_of_a_killed_write(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli("main", *train_args(tiny_data, run), capsys=capsys)[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    stale = run / f".last.pt.tmp-{dead.pid}-x1"
    stale.write_bytes(b"half a checkpoint")
    live = run / f".best.pt.tmp-{os.getpid()}-x2"  # a writer that still runs: left alone
    live.write_bytes(b"being written")
    assert cli("main", "--save_path", run, "--resume", "--epoch", "2", capsys=capsys)[0] == 0
    assert not stale.exists() and live.exists()


def test_a_run_that_fails_early_leaves_no_folder(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    code, line = cli("main", *train_args(tiny_data, tmp_path / "runs" / "exp", "--batch_size", "1"), capsys=capsys)
    assert code == 2 and "batch norm" in line
    code, line = cli("main", *train_args(tiny_data, tmp_path / "runs" / "exp", "--kd", "--teacher_path", tmp_path / "none"),
                     capsys=capsys)
    assert code == 2 and "--teacher_path" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_exports_are_written_whole(tmp_path: Path, small_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from utils.deploy import export

    out = tmp_path / "e"
    written: dict[str, tuple[Path, int]] = {}  # each model file as saved: where, and its inode

    def recording(original):
        def save(obj, f, *args, **kwargs):
            result = original(obj, f, *args, **kwargs)
            written[Path(f).suffix] = (Path(f), os.stat(f).st_ino)
            return result
        return save

    for owner, name in ((torch.jit, "save"), (onnx, "save")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    export.export_checkpoint(small_run / "best.pt", export.ExportOptions(formats=["torchscript", "onnx"], device="cpu",
                                                                         output_dir=str(out), parity_images=4))
    assert sorted(p.name for p in out.iterdir()) == ["best.onnx", "best.onnx.json", "best.torchscript", "best.torchscript.json"]
    for final in (out / "best.torchscript", out / "best.onnx"):
        made, inode = written[final.suffix]
        assert made.parent != out, made  # made elsewhere ...
        assert final.stat().st_ino == inode, final  # ... then renamed into place, never copied or written in place


def test_two_exports_at_once_into_one_folder(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    args = ["--save_path", small_run, "--export", "torchscript", "onnx", "--output_path", out, "--device", "cpu"]
    for proc in run_many([{"script": "export.py", "args": args}, {"script": "export.py", "args": args}]):
        assert_ok(proc)
    assert sorted(p.name for p in out.iterdir()) == ["best.onnx", "best.onnx.json", "best.torchscript", "best.torchscript.json"]


def test_checkpoints_follow_the_umask(tmp_path: Path, tiny_data: Path) -> None:
    proc = subprocess.run(["bash", "-c", "umask 022 && exec \"$0\" \"$@\"", sys.executable, str(REPO / "main.py"),
                           *train_args(tiny_data, tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ) | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, describe(proc)
    for name in ("best.pt", "last.pt", "args.yaml", "train.log"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
