"""tune.py: the search space (parsed, sampled, refused), a study end to end (table, trials.csv, best.yaml
that main.py trains as it is, plots), pruning that stops a hopeless trial early, a failed trial that the
study survives, Ctrl-C and resume, and two processes sharing one study (SQLite, then a real Redis).

Tiny runs: timm's test_resnet at 32 px on conftest's tiny_data, 1-3 epochs; in this process where no
second process is the point.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from PIL import Image

from conftest import assert_ok, assert_user_error, run_inprocess, run_many, run_script, train_args
from serve_helpers import RedisServer, redis_server_binary

MODEL = "test_resnet"


def tune_args(data: Path, out: Path, space: Path, *extra: Any, epochs: int = 1) -> list[str]:
    return train_args(data, out, "--epoch", epochs, "--space", space, *extra, model=MODEL)


def write_space(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load_study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def run_args(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return yaml.safe_load((Path(trial.user_attrs["run"]) / "args.yaml").read_text())


# ------------------------------------------------------------------------------- the space
SPACE = """
lr: {low: 1.0e-4, high: 1.0e-2, log: true}
image_size: {low: 32, high: 64, step: 16}
label_smoothing: {low: 0.0, high: 0.2}
optimizer: {choices: [adamw, sgd]}
warmup: {choices: [true, false]}
"""


def test_space_is_parsed_and_sampled_with_types_and_log_scale(tiny_data: Path, tmp_path: Path) -> None:
    import main
    from utils.tune.space import SearchSpace

    base = main.parse_args(train_args(tiny_data, tmp_path / "run"))
    space = SearchSpace.load(write_space(tmp_path / "s.yaml", SPACE), main.get_args_parser(), base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = [space.sample(study.ask()) for _ in range(400)]
    lrs = [s["lr"] for s in samples]
    assert all(isinstance(v, float) and 1e-4 <= v <= 1e-2 for v in lrs)
    # log-uniform: half below the geometric mean 1e-3 (a uniform range would put 9% there)
    assert 0.42 < sum(v < 1e-3 for v in lrs) / len(lrs) < 0.58
    assert {s["image_size"] for s in samples} == {32, 48, 64} and all(type(s["image_size"]) is int for s in samples)
    assert all(isinstance(s["label_smoothing"], float) and 0 <= s["label_smoothing"] <= 0.2 for s in samples)
    assert {s["optimizer"] for s in samples} == {"AdamW", "SGD"}  # main.py's own names (--optimizer takes any case)
    assert {s["warmup"] for s in samples} == {True, False}


def test_a_space_names_a_flag_by_any_of_its_names(tiny_data: Path, tmp_path: Path) -> None:
    """`--help` shows --augment and --epochs first (--Augment, --epoch: pytorch-classifier's names): a space
    takes either, as a config file does, and samples the option itself."""
    import main
    from utils.tune.space import SearchSpace

    base = main.parse_args(train_args(tiny_data, tmp_path / "run"))
    text = "augment: {choices: [randaugment, AugMix]}\nepochs: {low: 2, high: 3}\nmetric: {choices: [f1]}\n"
    space = SearchSpace.load(write_space(tmp_path / "s.yaml", text), main.get_args_parser(), base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = [space.sample(study.ask()) for _ in range(20)]
    assert {s["Augment"] for s in samples} == {"RandAugment", "AugMix"} and {s["epoch"] for s in samples} == {2, 3}
    assert {s["metrice"] for s in samples} == {"f1"} and all(set(s) == {"Augment", "epoch", "metrice"} for s in samples)


@pytest.mark.parametrize("text, needle", [
    ("lrr: {low: 0.1, high: 0.2}", "'lrr' is not a main.py flag (did you mean 'lr'?)"),
    ("lr: {low: 0.1, high: 0.01}", "'lr': low 0.1 is above high 0.01"),
    ("lr: {low: 0, high: 0.01, log: true}", "a log scale needs low > 0"),
    ("lr: {low: 0.0, high: 0.01}", "'lr' value 0.0 is refused with the other options: --lr must be positive"),
    ("lr: {low: 0.001}", "'high' is missing"),
    ("lr: {low: 0.001, high: 0.01, scale: log}", "unknown entry 'scale'"),
    ("image_size: {low: 32.5, high: 64}", "'low' must be an integer"),
    ("optimizer: {low: 1, high: 2}", "--optimizer is not a number: give its values as choices"),
    ("mixup: {choices: [none, mixdown]}", "'mixup' must be a string (one of"),
    ("swa: {choices: [true]}", "'swa' value True is refused with the other options: --swa and --ema"),
    ("save_path: {choices: [a, b]}", "'save_path' cannot be searched"),
    ("lr: 0.01", "'lr' must be a mapping"),
    ("augment: {choices: [none]}\nAugment: {choices: [AugMix]}", "'Augment' and another name of the same flag (--Augment)"),
    ("lr_find: {choices: [true]}", "'lr_find' cannot be searched"),
])
def test_bad_spaces_are_refused_in_one_line_before_any_trial(tiny_data: Path, tmp_path: Path, text: str,
                                                            needle: str) -> None:
    space = write_space(tmp_path / "bad.yaml", text + "\n")
    proc = run_inprocess("tune.py", *tune_args(tiny_data, tmp_path / "out", space, "--ema"))
    assert_user_error(proc, str(space), needle)
    assert not list((tmp_path / "out").glob("trial_*"))


def test_bad_base_options_are_refused_before_any_trial(tiny_data: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", "lr: {low: 1.0e-3, high: 1.0e-2}\n")
    missing = run_inprocess("tune.py", *tune_args(tiny_data, tmp_path / "out", space, "--train_path", tmp_path / "nope"))
    assert_user_error(missing, "--train_path", "not found")
    assert_user_error(run_inprocess("tune.py", *tune_args(tiny_data, tmp_path / "out", space, "--kfold", 3)), "drop --kfold")
    assert_user_error(run_inprocess("tune.py", *tune_args(tiny_data, tmp_path / "out", space, "--lr_find")), "drop --lr_find")
    assert_user_error(run_inprocess("tune.py", *tune_args(tiny_data, tmp_path / "out", space, "--trials", 0)), "--trials")
    model = run_inprocess("tune.py", *tune_args(tiny_data, tmp_path / "out", space, "--model_name", "resnet_nope"))
    assert_user_error(model, "resnet_nope")  # as main.py refuses it, not five failed trials
    assert not (tmp_path / "out").exists()
    mine = tmp_path / "mine"  # a folder of the user's: tune.py's best.yaml would be written over theirs
    mine.mkdir()
    (mine / "best.yaml").write_text("lr: 0.1\n")
    assert_user_error(run_inprocess("tune.py", *tune_args(tiny_data, mine, space)), "not a tune.py study")
    assert (mine / "best.yaml").read_text() == "lr: 0.1\n" and sorted(p.name for p in mine.iterdir()) == ["best.yaml"]


# ------------------------------------------------------------------- end to end, best.yaml
@pytest.fixture(scope="module")
def tuned(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tune.py's command line in a subprocess: 3 trials of 2 epochs (lr, optimizer, label smoothing)."""
    folder = tmp_path_factory.mktemp("tuned")
    space = write_space(folder / "space.yaml", "lr: {low: 1.0e-3, high: 3.0e-2, log: true}\n"
                        "optimizer: {choices: [AdamW, SGD]}\nlabel_smoothing: {low: 0.0, high: 0.2}\n")
    out = folder / "study"
    proc = run_script("tune.py", *tune_args(tiny_data, out, space, "--trials", 3, "--seed", 1, "--weight_decay", 0.001,
                                            epochs=2))
    assert_ok(proc)
    return {"out": out, "proc": proc, "study": load_study(out)}


def test_cli_runs_the_trials_and_writes_table_csv_best_yaml_and_plots(tuned: dict[str, Any]) -> None:
    out, study, stdout = tuned["out"], tuned["study"], tuned["proc"].stdout
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert sorted(p.name for p in out.glob("trial_*")) == ["trial_0000", "trial_0001", "trial_0002"]
    for trial in trials:
        args = run_args(trial)  # each trial trained with its sampled values on top of the base flags
        assert args["lr"] == trial.params["lr"] and args["optimizer"] == trial.params["optimizer"]
        assert args["label_smoothing"] == trial.params["label_smoothing"] and args["weight_decay"] == 0.001
        best_pt = torch_load(Path(trial.user_attrs["run"]) / "best.pt")
        assert best_pt["best"]["value"] == pytest.approx(trial.value)  # the value optimised: the run's best val acc
        assert trial.user_attrs["epochs"] == 2
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    for row, trial in zip(rows, trials):
        assert float(row["value"]) == pytest.approx(trial.value) and float(row["lr"]) == pytest.approx(trial.params["lr"])
        assert row["state"] == "COMPLETE" and row["optimizer"] == trial.params["optimizer"] and float(row["seconds"]) > 0
    table = stdout[stdout.index("| trial |"):]
    assert all(f"| {t.number} |" in table.replace("|     ", "| ") for t in trials) and "COMPLETE" in table
    best = max(trials, key=lambda t: t.value)
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert study.best_trial.number == best.number
    assert {k: config[k] for k in best.params} == best.params and config["weight_decay"] == 0.001
    assert config["model_name"] == MODEL and config["epoch"] == 2 and config["save_path"] == str(out / "best")
    assert config["random_seed"] == 0 and config["seed"] == 1  # the config file's keys and the flags typed
    for name in ("history.png", "importances.png", "slice.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 200 and image.size[1] > 100


def torch_load(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_best_yaml_trains_with_main_py_as_it_is(tuned: dict[str, Any], tmp_path: Path) -> None:
    out = tuned["out"]
    best = tuned["study"].best_trial
    proc = run_inprocess("main.py", "--config", out / "best.yaml")
    assert_ok(proc)
    args = yaml.safe_load((out / "best" / "args.yaml").read_text())
    assert {k: args[k] for k in best.params} == best.params
    assert args["weight_decay"] == 0.001 and args["model_name"] == MODEL and args["epoch"] == 2
    assert run_args(best)["mean"] == args["mean"]  # the same data as the trial


# ------------------------------------------------------------------------- pruning, failures
def test_a_hopeless_trial_is_pruned_after_its_first_epoch(tiny_data: Path, tmp_path: Path) -> None:
    """Two good trials (lr 0.01) set the median at every epoch; a third with lr 1e-9 cannot learn and
    is pruned after epoch 1 of 3, its run folder consistent (best.pt, one train.log row)."""
    out = tmp_path / "prune"
    out.mkdir()
    study = optuna.create_study(study_name="prune", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    for lr in (0.01, 0.01, 1e-9):
        study.enqueue_trial({"lr": lr})
    space = write_space(tmp_path / "s.yaml", "lr: {low: 1.0e-9, high: 1.0e-1, log: true}\n")
    proc = run_inprocess("tune.py", *tune_args(tiny_data, out, space, "--trials", 3, "--prune_startup", 2,
                                               "--prune_warmup", 1, epochs=3))
    assert_ok(proc)
    trials = sorted(load_study(out).trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"], proc.stdout[-2000:]
    assert [t.user_attrs["epochs"] for t in trials] == [3, 3, 1]
    hopeless = Path(trials[2].user_attrs["run"])
    assert len((hopeless / "train.log").read_text().splitlines()) == 2 and (hopeless / "best.pt").is_file()
    assert trials[2].intermediate_values[1] < min(t.intermediate_values[1] for t in trials[:2])
    assert "trial 2 PRUNED after epoch 1" in proc.stdout


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "fail"
    out.mkdir()
    study = optuna.create_study(study_name="fail", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    study.enqueue_trial({"swa": True, "ema": True})  # refused together by main.py's checks
    study.enqueue_trial({"swa": False, "ema": False})
    space = write_space(tmp_path / "s.yaml", "swa: {choices: [true, false]}\nema: {choices: [true, false]}\n")
    proc = run_inprocess("tune.py", *tune_args(tiny_data, out, space, "--trials", 1))
    assert_ok(proc)
    trials = sorted(load_study(out).trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["error"] == "--swa and --ema both average the weights: choose one"
    assert "trial 0 FAILED" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert not (out / "trial_0000").exists() and (out / "trial_0001" / "best.pt").is_file()
    assert list(csv.DictReader((out / "trials.csv").open()))[0]["error"].startswith("--swa and --ema")


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tiny_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import main

    out = tmp_path / "resume"
    space = write_space(tmp_path / "s.yaml", "lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    args = tune_args(tiny_data, out, space, "--trials", 2)
    train = main.train
    calls: list[str] = []

    def interrupted_second(options: Any, resumed: Any, on_epoch: Any) -> dict[str, Any]:
        calls.append(options.save_path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as the trainer raises it after Ctrl-C, having saved last.pt
        return train(options, resumed, on_epoch)

    monkeypatch.setattr(main, "train", interrupted_second)
    proc = run_inprocess("tune.py", *args)
    assert proc.returncode == 130 and "run the same command" in proc.stderr
    trials = sorted(load_study(out).trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["error"] == "interrupted (Ctrl-C)"
    monkeypatch.setattr(main, "train", train)
    resumed = run_inprocess("tune.py", *args)
    assert_ok(resumed)
    assert "1 of 2 trials finished so far" in resumed.stdout  # the finished one is kept, not trained again
    trials = sorted(load_study(out).trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert sorted(p.name for p in out.glob("trial_*")) == ["trial_0000", "trial_0002"]


# ------------------------------------------------------------------ several processes, one study
def two_processes(tiny_data: Path, tmp_path: Path, storage: list[str], trials: int = 3) -> tuple[optuna.Study, Path]:
    out = tmp_path / "shared"
    space = write_space(tmp_path / "s.yaml", "lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    jobs = [{"script": "tune.py", "args": tune_args(tiny_data, out, space, "--trials", trials, *storage), "timeout": 300}
            for _ in range(2)]
    procs = run_many(jobs, workers=2)
    for proc in procs:
        assert_ok(proc)
    assert all("COMPLETE" in p.stdout for p in procs), "both processes ran trials"
    url = storage[storage.index("--storage") + 1] if storage else f"sqlite:///{out / 'study.db'}"
    name = storage[storage.index("--study_name") + 1] if storage else out.name
    return optuna.load_study(study_name=name, storage=storage_of(url)), out


def storage_of(url: str) -> Any:
    if url.startswith("redis://"):
        from optuna.storages.journal import JournalRedisBackend

        return optuna.storages.JournalStorage(JournalRedisBackend(url))
    return url


def check_shared(study: optuna.Study, out: Path, trials: int) -> None:
    done = finished(study)
    assert len(done) == trials, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    folders = [t.user_attrs["run"] for t in done]
    assert len(set(folders)) == trials and sorted(Path(f).name for f in folders) == sorted(p.name for p in out.glob("trial_*"))
    assert all(math.isfinite(t.value) for t in done)


def test_a_new_sqlite_file_that_another_process_is_creating_is_opened_again(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    """Processes started together on a new study.db race to create its tables (sqlite3.IntegrityError
    on alembic_version in one of them): the loser opens it again instead of stopping."""
    from utils.tune import study

    class IntegrityError(Exception):  # sqlalchemy.exc.IntegrityError, as the loser of the race gets it
        pass

    calls = []

    def rdb_storage(url: str, **kwargs: Any) -> str:
        calls.append(url)
        if len(calls) == 1:
            raise IntegrityError("UNIQUE constraint failed: alembic_version.version_num")
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", rdb_storage)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert study.make_storage(url) == "storage" and calls == [url, url]
    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **k: (_ for _ in ()).throw(IntegrityError("always")))
    with pytest.raises(study.UserError, match="cannot open it"):  # not forever
        study.make_storage(url)


def test_two_processes_on_one_sqlite_study_finish_exactly_n_trials(tiny_data: Path, tmp_path: Path) -> None:
    study, out = two_processes(tiny_data, tmp_path, [])
    check_shared(study, out, 3)


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed: apt-get install -y redis-server")
def test_two_processes_on_a_redis_journal_finish_exactly_n_trials(tiny_data: Path, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        study, out = two_processes(tiny_data, tmp_path, ["--storage", server.url, "--study_name", "shared-redis"])
        check_shared(study, out, 3)
        assert not (out / "study.db").exists()  # the study lives in Redis


@pytest.mark.parametrize("text, needle", [
    ("image_size: {low: 32, high: 64.5}", "'high' must be an integer"),
    ("lr: {low: 0.001, high: fast}", "'high' must be a number"),
    ("image_size: {low: 32, high: 64, step: 0.5}", "'step' must be an integer"),
    ("image_size: {low: 32, high: 64, step: 0}", "'step' must be positive, not 0"),
    ("lr: {low: 0.001, high: 0.1, log: yes please}", "'log' must be true or false"),
    ("lr: {low: 0.001, high: 0.1, log: true, step: 0.01}", "a log scale takes no step"),
    ("lr: {low: 0.5, high: 5, log: true, step: 1}", "a log scale takes no step"),
])
def test_range_specs_are_checked_for_their_flags_type(tiny_data: Path, tmp_path: Path, text: str, needle: str) -> None:
    import main
    from utils.core.log import UserError
    from utils.tune.space import SearchSpace

    base = main.parse_args(train_args(tiny_data, tmp_path / "run"))
    with pytest.raises(UserError, match=re.escape(needle)):
        SearchSpace.load(write_space(tmp_path / "s.yaml", text + "\n"), main.get_args_parser(), base)


def test_ranges_keep_their_flags_type(tiny_data: Path, tmp_path: Path) -> None:
    """Whole numbers for a float flag are floats; an integer log range may keep step 1; low == high
    is the one value."""
    import main
    from utils.tune.space import SearchSpace

    base = main.parse_args(train_args(tiny_data, tmp_path / "run"))
    text = ("label_smoothing: {low: 0, high: 1}\nimage_size: {low: 16, high: 64, log: true, step: 1}\n"
            "weight_decay: {low: 0.001, high: 0.001}\n")
    space = SearchSpace.load(write_space(tmp_path / "s.yaml", text), main.get_args_parser(), base)
    smoothing, size, decay = space.params
    assert (smoothing.kind, smoothing.low, smoothing.high) == ("float", 0.0, 1.0)
    assert type(smoothing.low) is float and type(smoothing.high) is float
    assert (size.kind, size.low, size.high, size.log, size.step) == ("int", 16, 64, True, 1)
    assert type(size.low) is int and type(size.high) is int
    samples = [space.sample(optuna.create_study().ask()) for _ in range(5)]
    assert all(s["weight_decay"] == 0.001 and type(s["label_smoothing"]) is float for s in samples)


def test_trial_options_put_the_samples_on_the_base_and_check_them_as_main_py_does(tiny_data: Path,
                                                                                   tmp_path: Path) -> None:
    import main
    from utils.core.log import UserError
    from utils.tune.space import trial_options

    base = main.parse_args(["--train_path", str(tiny_data / "train"), "--model_name", "resnet10t", "--lr", "0.002"])
    options = trial_options(base, {"label_smoothing": 0.05, "seed": 7, "Augment": "AugMix"}, tmp_path / "trial_0003")
    assert (options.label_smoothing, options.Augment, options.save_path) == (0.05, "AugMix", str(tmp_path / "trial_0003"))
    assert (options.seed, options.random_seed, options.lr, options.model_name) == (7, 7, 0.002, base.model_name)
    assert {"label_smoothing", "seed", "Augment", "save_path", "lr"} <= options.explicit  # typed by the user or sampled
    assert base.label_smoothing != 0.05 and base.save_path == "runs/exp" and "save_path" not in base.explicit  # as it was
    unseeded = trial_options(base, {"lr": 0.01}, tmp_path / "t")
    assert (unseeded.random_seed, unseeded.lr) == (base.random_seed, 0.01) and "seed" not in unseeded.explicit
    with pytest.raises(UserError, match="--swa and --ema"):
        trial_options(base, {"swa": True, "ema": True}, tmp_path / "t")
