"""The command line of every script (issue 27): one help format with the flags in groups, a mistake
in one line, choices in any case, the spelled-out aliases, --data ROOT, paths and model names
checked before PyTorch loads, "not found" naming the flag and the runs nearby, and a run's own
args.yaml fed back with --config trains the same run.

Everything runs the scripts' command lines in this process (run_inprocess) or their parsers,
except two subprocesses that show what a fresh process imports before refusing, and one tiny
training run (the replay of the shared `trained_run`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SUBPROCESS_ENV, assert_ok, describe, run_inprocess, run_script

SCRIPTS = ("main", "metrice", "predict", "export", "serve", "processing", "audit")


def _parser(script: str) -> argparse.ArgumentParser:
    return importlib.import_module(script).get_args_parser()


def _only_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed (exit code 2, nothing else on stderr or stdout)."""
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and not proc.stdout, describe(proc)
    return lines[0]


# ------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_groups_every_flag_and_shows_choices_and_defaults_one_way(script: str) -> None:
    parser = _parser(script)
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert groups["options"] == ["help", "version"], groups["options"]  # every flag of the script is in a titled group
    assert groups.pop("positional arguments") == []
    assert len(groups) >= 3
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert not text.rstrip().endswith("]"), text  # no "[default]" of its own
        assert text.count("(default") <= 1, text
        if action.choices is not None:
            assert all(str(c) in text for c in action.choices), text  # the choices, in the help
    assert "{" not in parser.format_usage(), "choices listed in the usage line"  # a name there, the choices below


def test_main_help_sections_are_the_docs_table_sections() -> None:
    parser = _parser("main")
    titles = [g.title for g in parser._action_groups][2:]
    assert titles == ["data", "model", "training", "learning-rate finder", "recipes", "run and machine"]
    data = next(g for g in parser._action_groups if g.title == "data")
    assert [a.dest for a in data._group_actions][:5] == ["data", "train_path", "val_path", "test_path", "label_path"]
    augment = next(a for a in parser._actions if a.dest == "Augment")
    assert parser._get_formatter()._get_help_string(augment).endswith(
        "(choices: RandAugment, AutoAugment, TrivialAugmentWide, AugMix, none) (default: %(default)s)")


# ------------------------------------------------------------------------------ one line each
@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_flag_is_one_line_with_the_close_one(script: str) -> None:
    close = {"main": "--save_path", "metrice": "--save_path", "predict": "--save_path", "export": "--save_path",
             "serve": "--save_path", "processing": "--output_path", "audit": "--save_path"}[script]
    typo = close[:-2] + close[-1] + close[-2]  # --save_pahta: the last two letters swapped
    line = _only_line(run_inprocess(f"{script}.py", *(["--source", "img"] if script == "predict" else []), typo, "x"))
    assert line == f"error: unknown flag {typo}; did you mean {close}? (--help lists them all)"


def test_bad_values_are_one_line_naming_the_flag_value_and_choices() -> None:
    cases = {
        ("--lrr", "3"): "error: unknown flag --lrr; did you mean --lr? (--help lists them all)",
        ("--augment", "bogus"): "error: --augment bogus: not one of RandAugment, AutoAugment, TrivialAugmentWide, AugMix, "
                                "none (any case)",
        ("--lr", "fast"): "error: --lr: 'fast' is not a number (--help lists every flag)",
        ("--epochs",): "error: --epochs: expected one argument (--help lists every flag)",
        ("stray",): "error: unexpected argument stray: a value follows its flag (--help lists every flag)",
        # an unquoted {a..b} or glob: the shell gave the flag its first path and left the others over
        ("--train_path", *(f"s/train-{i:06d}.tar" for i in range(4))):
            "error: unexpected arguments s/train-000001.tar ... s/train-000003.tar (3 paths): the shell expanded a "
            "pattern into several paths: quote it, e.g. --train_path 'shards/train/train-{000000..000009}.tar'",
        ("--val_path", "v/a.jpg", "v/b.jpg", "v/c.jpg"):
            "error: unexpected arguments v/b.jpg v/c.jpg: the shell expanded a pattern into several paths: quote it, "
            "e.g. --train_path 'shards/train/train-{000000..000009}.tar'",
        ("--lrr", "1", "--epohcs", "2", "--zzz"): "error: unknown flags --lrr (--lr?), --epohcs (--epochs?), --zzz "
                                                  "(--help lists them all)",
    }
    for argv, expected in cases.items():
        assert _only_line(run_inprocess("main.py", *argv)) == expected
    line = _only_line(run_inprocess("predict.py", "--source", "x", "--cam_type", "gradcamx"))
    assert line.startswith("error: --cam_type gradcamx: not one of GradCAM, HiResCAM, ")


# ---------------------------------------------------------------------------- choices, aliases
def test_every_choice_of_every_script_is_taken_in_any_case() -> None:
    checked = 0
    for script in SCRIPTS:
        parser = _parser(script)
        required = [a for a in parser._actions if a.required]
        base = [x for a in required for x in (a.option_strings[0], "x")]
        for action in parser._actions:
            if action.choices is None or not action.option_strings:
                continue
            for choice in action.choices:
                if not isinstance(choice, str):
                    continue
                for typed in (choice.upper(), choice.lower(), choice.swapcase()):
                    args = parser.parse_args([*base, action.option_strings[0], typed])
                    value = getattr(args, action.dest)
                    assert (value[0] if isinstance(value, list) else value) == choice, (script, action.dest, typed)
                    checked += 1
    assert checked > 200


def test_a_config_value_of_a_choice_is_taken_in_any_case(tiny_data: Path, tmp_path: Path) -> None:
    import main

    config = tmp_path / "c.yaml"
    config.write_text("augment: randaugment\nmixup: CUTMIX\n")
    args = main.parse_args(["--config", str(config), "--train_path", str(tiny_data / "train")])
    assert (args.Augment, args.mixup) == ("RandAugment", "cutmix")


def test_spelled_out_aliases_set_the_inherited_options(tiny_data: Path, tmp_path: Path) -> None:
    import main

    from utils.core.log import UserError

    train = ["--train_path", str(tiny_data / "train")]
    new = main.parse_args([*train, "--epochs", "7", "--metric", "f1", "--augment", "augmix"])
    old = main.parse_args([*train, "--epoch", "7", "--metrice", "f1", "--Augment", "AugMix"])
    assert (new.epoch, new.metrice, new.Augment) == (old.epoch, old.metrice, old.Augment) == (7, "f1", "AugMix")
    assert {"epoch", "metrice", "Augment"} <= new.explicit  # --resume's overrides see the alias as the flag
    config = tmp_path / "aliases.yaml"
    config.write_text("epochs: 4\nmetric: loss\nAugment: none\n")
    args = main.parse_args(["--config", str(config), *train])
    assert (args.epoch, args.metrice, args.Augment) == (4, "loss", "none")
    config.write_text("epochs: 4\nepoch: 5\n")
    with pytest.raises(UserError, match=r"'epoch' and another name of the same flag \(--epoch\) are both given"):
        main.parse_args(["--config", str(config), *train])


# ------------------------------------------------------------------------------------- --data
def test_data_root_sets_the_split_paths_and_given_ones_win(tiny_data: Path, tmp_path: Path) -> None:
    import main
    import metrice

    root = str(tiny_data)
    args = main.parse_args(["--data", root])
    assert (args.train_path, args.val_path, args.test_path, args.label_path) == (
        f"{root}/train", f"{root}/val", f"{root}/test", f"{root}/label.txt")
    args = main.parse_args(["--data", root, "--val_path", str(tmp_path / "v")])
    assert (args.train_path, args.val_path) == (f"{root}/train", str(tmp_path / "v"))
    config = tmp_path / "c.yaml"
    config.write_text(f"test_path: {tmp_path / 't'}\n")
    args = main.parse_args(["--data", root, "--config", str(config)])
    assert (args.test_path, args.val_path) == (f"{root}/test", f"{root}/val")  # typed, --data beats the config's paths
    config.write_text(f"test_path: {tmp_path / 't'}\ndata: {root}\n")
    args = main.parse_args(["--config", str(config)])
    assert (args.test_path, args.val_path) == (str(tmp_path / "t"), f"{root}/val")  # both in the config: its path wins
    run = tmp_path / "run"
    run.mkdir()
    args = metrice.parse_args(["--save_path", str(run), "--data", root, "--test_path", "elsewhere"])
    assert (args.train_path, args.val_path, args.test_path, args.label_path) == (
        f"{root}/train", f"{root}/val", "elsewhere", None)  # tiny_data has no label.txt: the run's class names
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "label.txt").write_text("a\nb\n")
    assert metrice.parse_args(["--save_path", str(run), "--data", str(tmp_path / "root")]).label_path == \
        str(tmp_path / "root" / "label.txt")
    line = _only_line(run_inprocess("main.py", "--data", str(tmp_path / "nothing")))
    assert line.startswith(f"error: --train_path {tmp_path / 'nothing' / 'train'}: not found; ")


def test_data_root_without_val_and_test_trains_as_without_them(tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import TINY_MODEL, built_trainer

    root = tmp_path / "only_train"
    root.mkdir()
    shutil.copytree(tiny_data / "train", root / "train")
    trainer = built_trainer(monkeypatch, "--data", root, "--model_name", TINY_MODEL, "--image_size", "32", "--workers",
                            "0", "--epochs", "1", "--device", "cpu", "--save_path", tmp_path / "run")
    assert trainer.data.val_set is None and trainer.data.train_set.class_names == ["blue", "green", "red"]
    assert len(trainer.data.train_set.samples) == 24
    assert trainer.options["test_path"] == str(root / "test") and trainer.options["data"] == str(root)


# -------------------------------------------------------------------------- before PyTorch loads
_PARSE_ONLY = """
import sys, time
sys.path.insert(0, {repo!r})
start = time.perf_counter()
import main
from utils.core.log import UserError
try:
    main.main(main.parse_args(sys.argv[1:]))
except UserError as err:
    print(err)
print("torch" in sys.modules, "timm" in sys.modules, round(time.perf_counter() - start, 2))
"""


@pytest.mark.parametrize("argv, needle", [
    (["--train_path", "nope"], "--train_path nope: not found; pass the training images"),
    (["--model_name", "resnet181"], "unknown --model_name 'resnet181'; did you mean resnet18, resnet18d, "),
    (["--weight", "no.pt"], "--weight no.pt: not found"),
])
def test_paths_and_model_names_are_refused_before_torch_loads(tiny_data: Path, argv: list[str], needle: str) -> None:
    train = [] if argv[0] == "--train_path" else ["--train_path", str(tiny_data / "train")]
    proc = subprocess.run([sys.executable, "-c", _PARSE_ONLY.format(repo=str(REPO)), *train, *argv], cwd=REPO,
                          env=dict(os.environ) | SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    message, imported = proc.stdout.splitlines()
    assert message.startswith(needle), message
    assert imported.split()[:2] == ["False", "False"], imported  # neither torch nor timm was imported


def test_the_model_name_list_is_the_installed_timm_and_torchvision() -> None:
    """utils/core/model_names.txt is what the registry takes today. After upgrading timm or torchvision, write it again:
    python -c "from importlib.metadata import version as v; from utils.models.registry import all_model_names as a; from
    utils.core.names import MODEL_NAMES_FILE as f; f.write_text(f'# timm {v(\"timm\")} torchvision {v(\"torchvision\")}\\n'
    + '\\n'.join(a()) + '\\n')" """
    from importlib import metadata

    from utils.core.names import MODEL_NAMES_FILE, unknown_model_name
    from utils.models.registry import all_model_names

    header, *names = MODEL_NAMES_FILE.read_text(encoding="utf-8").splitlines()
    assert header == f"# timm {metadata.version('timm')} torchvision {metadata.version('torchvision')}"
    assert names == all_model_names()
    assert {"resnet18", "RepVGG-A0", "efficientnet_b0", "convnext_tiny", "resnet10t"} <= set(names)  # zoo, torchvision, timm
    for known in ("resnet18", "resnet18.a1_in1k", "RepVGG-A0", "mobilenet_v3_small", "hf-hub:timm/x", "local-dir:x"):
        assert unknown_model_name(known) is None, known
    assert unknown_model_name("resnet181").startswith("unknown --model_name 'resnet181'; did you mean resnet18")


def test_another_timm_defers_the_model_name_to_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.core import names
    from utils.core.log import UserError
    from utils.train.setup import load_data

    stale = tmp_path / "model_names.txt"
    stale.write_text("# timm 0.0.1 torchvision 0.0.1\nresnet18\n")
    monkeypatch.setattr(names, "MODEL_NAMES_FILE", stale)
    assert names.unknown_model_name("resnet181") is None  # not this file's to decide
    from utils.core.options import Options

    with pytest.raises(UserError, match="unknown --model_name 'resnet181'"):  # before the scan: the path is not read
        load_data(Options({"model_name": "resnet181", "train_path": str(tmp_path / "never_read")}))


# ---------------------------------------------------------------------------------- not found
def _runs(root: Path) -> list[Path]:
    """root/runs with three runs (best.pt) of known age and a folder that is no run."""
    runs = root / "runs"
    made = []
    for age, name in ((300, "exp"), (100, "exp3"), (200, "exp2")):
        (runs / name).mkdir(parents=True)
        (runs / name / "best.pt").write_bytes(b"x")
        os.utime(runs / name, (1_700_000_000 - age, 1_700_000_000 - age))
        made.append(runs / name)
    (runs / "notes").mkdir()
    return [runs / "exp3", runs / "exp2", runs / "exp"]  # newest first


@pytest.mark.parametrize("script, extra", [("predict", ["--source", "img"]), ("metrice", []), ("export", []), ("serve", [])])
def test_model_not_found_names_the_flag_and_the_runs_nearby(script: str, extra: list[str], tmp_path: Path) -> None:
    newest_first = _runs(tmp_path)
    missing = tmp_path / "runs" / "x"
    line = _only_line(run_inprocess(f"{script}.py", "--save_path", missing, *extra))
    assert line == (f"error: --save_path {missing}: not found; pass a run folder of main.py (e.g. runs/exp) or a model "
                    f"file; runs in {tmp_path / 'runs'}, newest first: {', '.join(map(str, newest_first))}")


def test_a_missing_weight_file_names_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    newest_first = _runs(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the message also lists ./runs: none here (the repository may have some)
    line = _only_line(run_inprocess("predict.py", "--source", "img", "--weight", tmp_path / "runs" / "best.onnx"))
    assert line.startswith(f"error: --weight {tmp_path / 'runs' / 'best.onnx'}: not found; ")
    assert line.endswith(f"newest first: {', '.join(map(str, newest_first))}")
    lonely = tmp_path / "lonely" / "x"
    line = _only_line(run_inprocess("export.py", "--save_path", lonely))
    assert line.endswith("; no run beside it or in runs/ (main.py --save_path makes one)")


# ------------------------------------------------------------------------- args.yaml round trip
def test_a_runs_args_yaml_trains_the_same_run_again(trained_run, tmp_path: Path) -> None:
    first = trained_run.path
    again = tmp_path / "again"
    proc = run_script("main.py", "--config", first / "args.yaml", "--save_path", again)
    assert_ok(proc)
    notes = [ln for ln in proc.stderr.splitlines() if "ignoring what a run wrote" in ln]
    assert notes == [f"config {first / 'args.yaml'}: ignoring what a run wrote beside its options (recomputed): mean, std"]
    before = yaml.safe_load((first / "args.yaml").read_text())
    after = yaml.safe_load((again / "args.yaml").read_text())
    assert after.pop("save_path") == str(again) and before.pop("save_path") == str(first)
    assert after.pop("config") == str(first / "args.yaml")  # where the options came from this time
    before.pop("config")
    assert after == before
    assert (again / "train.log").read_text() == (first / "train.log").read_text()  # the same seed: the same metrics
