"""One owner per concept (docs/architecture.md): each owner does what it exists for, by value.

utils.core.task (the task types), utils.core.options (the resolved options, and what a run records),
utils.core.run (a run folder's names, run folder -> best.pt), utils.deploy.formats (the format table,
and adding a format as one row plus one module), utils.infer.rows (a prediction row and its outputs),
utils.data.sources and utils.data.imageset (a split, whatever it is given as, encoded for a task).

Everything here runs in this process on tiny arrays and the generated images of conftest, except
two end-to-end checks of main.py (one tiny multilabel run, shared; one refusal in-process) and one
export of the committed v1 run (no training).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, TINY_CLASSES, assert_ok, assert_user_error, load_ckpt, run_inprocess, run_script, train_args
from utils.core.log import UserError
from utils.core.options import Options
from utils.core.run import Run, RunFolder, increment_path
from utils.core.task import ALL_LOSSES, ALL_METRICS, MULTICLASS, MULTILABEL, TASK_TYPES, TaskType, task_type
from utils.data.imageset import ImageSet
from utils.data.sources import SOURCES, SourceOptions, scan_split
from utils.deploy.formats import (EXPORT_FLAGS, FORMATS, MODEL_TYPES, PRECISIONS, ModelFormat, format_of, formats_table,
                                  get_format, info_path, is_hub_folder)
from utils.infer.rows import (PredictionRow, PredictionWriter, csv_fields, label_text, output_name,
                              prediction_rows)

V1_RUN = REPO / "tests" / "fixtures" / "v1_run"  # a committed run (test_efficientnet, cat/dog, 16 px)


def one_line_error(exc_info: pytest.ExceptionInfo, *needles: str) -> str:
    """The UserError's message: one line holding every needle."""
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# =============================================================================== utils.core.task
def test_task_types_are_named_and_looked_up() -> None:
    assert TASK_TYPES == {"multiclass": MULTICLASS, "multilabel": MULTILABEL}
    assert task_type("multiclass") is MULTICLASS and task_type("multilabel") is MULTILABEL
    assert (MULTICLASS.multilabel, MULTILABEL.multilabel) == (False, True)
    with pytest.raises(UserError) as err:
        task_type("regression")
    assert one_line_error(err) == "unknown task type 'regression'; choose one of multiclass, multilabel"


def test_encode_and_labels_round_trip() -> None:
    for labels in ([0], [2], [7]):
        target = MULTICLASS.encode(labels)
        assert target == labels[0] and type(target) is int
        assert MULTICLASS.labels(target) == tuple(labels)
        assert MULTICLASS.encode(MULTICLASS.labels(target)) == target
    assert MULTICLASS.encode([np.int64(4)]) == 4 and type(MULTICLASS.encode([np.int64(4)])) is int
    for labels, stored in (([3, 1, 3], (1, 3)), ([2], (2,)), ([], ()), ([5, 0, 2], (0, 2, 5))):
        target = MULTILABEL.encode(labels)
        assert target == stored and all(type(c) is int for c in target)  # sorted, unique
        assert MULTILABEL.labels(target) == stored and MULTILABEL.encode(MULTILABEL.labels(target)) == target
    assert MULTILABEL.encode(np.array([1, 0])) == (0, 1)


@pytest.mark.parametrize("labels", [[1, 2], [0, 0], []])
def test_multiclass_refuses_other_than_one_label(labels: list[int]) -> None:
    with pytest.raises(UserError) as err:
        MULTICLASS.encode(labels)
    message = one_line_error(err)
    assert message == f"a multiclass image has exactly one class, not {len(labels)}"


def test_target_array_indices_or_multi_hot() -> None:
    indices = MULTICLASS.target_array([2, 0, 1, 1], 3)
    assert indices.dtype == np.int64 and indices.tolist() == [2, 0, 1, 1]
    hot = MULTILABEL.target_array([(0, 2), (), (1,), (0, 1, 2)], 3)
    assert hot.dtype == bool and hot.shape == (4, 3)
    assert hot.tolist() == [[True, False, True], [False, False, False], [False, True, False], [True, True, True]]
    assert MULTILABEL.target_array([], 4).shape == (0, 4)


def test_class_counts() -> None:
    counts = MULTICLASS.class_counts([0, 2, 2, 1, 2], 4)
    assert counts.dtype == np.int64 and counts.tolist() == [1, 1, 3, 0]
    assert MULTILABEL.class_counts([(0, 2), (2,), (1, 2), ()], 3).tolist() == [1, 1, 3]
    assert MULTILABEL.class_counts([], 2).tolist() == [0, 0]


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (6, 5))
    x[0] = [800.0, 799.0, -5.0, 0.0, 1.0]  # exp() of these overflows without the max subtracted
    return x


def test_probabilities_equal_torch_for_numpy_and_torch_inputs(logits: np.ndarray) -> None:
    t = torch.from_numpy(logits)  # float64: the task works in float32
    expected = {MULTICLASS: torch.softmax(t.float(), dim=1), MULTILABEL: torch.sigmoid(t.float())}
    for task, want in expected.items():
        from_numpy = task.probabilities(logits)
        assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32 and from_numpy.shape == (6, 5)
        np.testing.assert_allclose(from_numpy, want.numpy(), rtol=1e-5, atol=1e-7)
        from_list = task.probabilities(logits.tolist())
        np.testing.assert_allclose(from_list, want.numpy(), rtol=1e-5, atol=1e-7)
        from_torch = task.probabilities(t)
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
        torch.testing.assert_close(from_torch, want)
    assert np.allclose(MULTICLASS.probabilities(logits).sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(MULTICLASS.probabilities(logits)[0, :2], [1 / (1 + math.e ** -1), 1 / (1 + math.e)], rtol=1e-6)
    assert not np.allclose(MULTILABEL.probabilities(logits).sum(axis=1), 1.0)  # a sigmoid per class, not a softmax


def test_as_logits_inverts_probabilities(logits: np.ndarray) -> None:
    t = torch.from_numpy(logits[1:]).float()
    p = torch.softmax(t, dim=1)
    torch.testing.assert_close(torch.softmax(MULTICLASS.as_logits(p), dim=1), p)
    q = torch.sigmoid(t / 4)  # inside the clamp
    torch.testing.assert_close(torch.sigmoid(MULTILABEL.as_logits(q)), q)
    torch.testing.assert_close(MULTILABEL.as_logits(q), t / 4, rtol=1e-4, atol=1e-4)
    # 0 and 1 stay finite: clamped to 1e-12 (softmax) and to [1e-6, 1 - 1e-6] (sigmoid)
    edge = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(MULTICLASS.as_logits(edge), torch.tensor([[math.log(1e-12), 0.0]]))
    torch.testing.assert_close(MULTILABEL.as_logits(edge), torch.tensor([[1e-6, 1 - 1e-6]]).logit())


def test_thresholds() -> None:
    assert MULTICLASS.thresholds(3) is None and MULTICLASS.thresholds(3, [0.1, 0.2, 0.3]) is None
    default = MULTILABEL.thresholds(3)
    assert default.dtype == np.float32 and default.tolist() == [0.5, 0.5, 0.5]
    tuned = MULTILABEL.thresholds(3, [0.2, 0.7, 0.5])
    assert tuned.dtype == np.float32 and tuned.tolist() == pytest.approx([0.2, 0.7, 0.5])
    assert MULTILABEL.thresholds(2, []).tolist() == []  # tuned, even if empty: not the default


def test_decide_argmax_or_thresholds_inclusive() -> None:
    probs = np.array([[0.5, 0.69, 0.7], [0.1, 0.2, 0.7], [0.4, 0.4, 0.2], [0.2, 0.3, 0.5]], dtype=np.float32)
    one_hot = MULTICLASS.decide(probs, [0.0, 0.0, 0.0])  # thresholds do not apply to multiclass
    assert one_hot.dtype == bool
    assert one_hot.tolist() == [[False, False, True], [False, False, True], [True, False, False], [False, False, True]]
    given = MULTILABEL.decide(probs, [0.5, 0.7, 0.7])  # exactly at a threshold: given
    assert given.tolist() == [[True, False, True], [False, False, True], [False, False, False], [False, False, False]]
    assert MULTILABEL.decide(probs).tolist() == [[True, True, True], [False, False, True], [False, False, False],
                                                  [False, False, True]]  # 0.5 each by default
    assert MULTILABEL.decide(probs.tolist(), [0.4, 0.4, 0.4])[2].tolist() == [True, True, False]
    # Python floats exactly at their thresholds (0.1 and 0.3 are not float32 numbers): given all the same
    assert MULTILABEL.decide([[0.1, 0.3, 0.7]], [0.1, 0.3, 0.7]).tolist() == [[True, True, True]]


def test_uncertainty_is_the_entropy() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]])
    h = MULTICLASS.uncertainty(probs)
    expected = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0, math.log(3),
                -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))]
    assert h.dtype == np.float32 and h.shape == (4,)
    assert h.tolist() == pytest.approx(expected, abs=1e-6)
    assert MULTICLASS.uncertainty([[-1e-9, 1.0]]).tolist() == pytest.approx([0.0], abs=1e-6)  # tiny negatives count as 0

    def binary(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    multi = np.array([[0.5, 0.9], [0.1, 0.3], [0.0, 1.0], [0.5, 0.5]])
    m = MULTILABEL.uncertainty(multi)
    assert m.dtype == np.float32
    assert m.tolist() == pytest.approx([(binary(0.5) + binary(0.9)) / 2, (binary(0.1) + binary(0.3)) / 2, 0.0,
                                        math.log(2)], abs=1e-6)
    # float32 probabilities (what the backends give) of 0 and 1: certain, not nan
    assert MULTILABEL.uncertainty(np.array([[0.0, 1.0]], dtype=np.float32)).tolist() == pytest.approx([0.0], abs=1e-9)


def test_loss_and_metric_defaults_and_the_other_tasks_refused() -> None:
    assert (MULTICLASS.loss(None), MULTICLASS.metric(None)) == ("CrossEntropyLoss", "acc")
    assert (MULTILABEL.loss(None), MULTILABEL.metric(None)) == ("BCEWithLogitsLoss", "map")
    for task in TASK_TYPES.values():
        assert [task.loss(n) for n in task.losses] == list(task.losses)
        assert [task.metric(n) for n in task.metrics] == list(task.metrics)
    assert MULTILABEL.metric("f1") == "f1" and MULTICLASS.metric("f1") == "f1"  # shared metrics fit both
    cases = [(MULTICLASS.loss, "BCEWithLogitsLoss", "--loss", "multiclass", "multilabel"),
             (MULTICLASS.loss, "AsymmetricLoss", "--loss", "multiclass", "multilabel"),
             (MULTILABEL.loss, "FocalLoss", "--loss", "multilabel", "multiclass"),
             (MULTILABEL.metric, "acc", "--metrice", "multilabel", "multiclass"),
             (MULTICLASS.metric, "map", "--metrice", "multiclass", "multilabel")]
    for choose, name, flag, task, owner in cases:
        with pytest.raises(UserError) as err:
            choose(name)
        message = one_line_error(err, f"(it is for {owner} runs: --task_type {owner})")
        assert message.startswith(f"{flag} {name} does not fit a {task} task ({TASK_TYPES[task].summary})"), message
        allowed = TASK_TYPES[task].losses if flag == "--loss" else TASK_TYPES[task].metrics
        assert message.endswith(f"; choose one of {', '.join(allowed)}"), message
    with pytest.raises(UserError) as err:
        MULTICLASS.loss("NoSuchLoss")  # no task's loss: no task to point to
    assert one_line_error(err) == (f"--loss NoSuchLoss does not fit a multiclass task ({MULTICLASS.summary}); choose one "
                                   "of CrossEntropyLoss, FocalLoss, PolyLoss")


def test_all_losses_and_metrics_are_every_tasks_once() -> None:
    assert ALL_LOSSES == ("CrossEntropyLoss", "FocalLoss", "PolyLoss", "BCEWithLogitsLoss", "AsymmetricLoss")
    assert ALL_METRICS == ("acc", "mean_acc", "balanced_acc", "f1", "loss", "map")
    from utils.train.losses import LOSSES  # every loss name of a task has its class (the import checks it too)

    assert set(ALL_LOSSES) <= set(LOSSES)


# ============================================================================ utils.core.options
@pytest.fixture()
def options() -> Options:
    return Options({"lr": 0.1, "tracker": None, "layers": [1, 2]})


def test_options_read_like_a_namespace(options: Options) -> None:
    assert options.lr == 0.1 and options.get("lr") == 0.1
    assert options.get("tracker", "none") is None  # present, even when None: not the default
    assert options.get("missing", "d") == "d" and options.get("missing") is None
    with pytest.raises(AttributeError, match="^no option 'missing'$"):
        options.missing  # noqa: B018
    assert not hasattr(options, "missing") and getattr(options, "missing", 7) == 7
    assert "lr" in options and "missing" not in options
    assert list(options) == ["lr", "tracker", "layers"]
    assert options.to_dict() == {"lr": 0.1, "tracker": None, "layers": [1, 2]}
    assert repr(options) == "Options(lr=0.1, tracker=None, layers=[1, 2])"
    assert options == Options({"lr": 0.1, "tracker": None, "layers": [1, 2]})
    assert options != Options({"lr": 0.2, "tracker": None, "layers": [1, 2]})
    assert options != {"lr": 0.1, "tracker": None, "layers": [1, 2]}  # a dict is not Options


def test_options_are_read_only(options: Options) -> None:
    with pytest.raises(AttributeError) as err:
        options.lr = 0.5
    assert str(err.value) == ("the options are resolved once: 'lr' cannot be changed here (resolve it where the options "
                              "are made, with .replace(lr=...))")
    with pytest.raises(AttributeError) as err:
        options.new = 1
    assert "'new' cannot be changed" in str(err.value)
    with pytest.raises(AttributeError) as err:
        del options.lr
    assert str(err.value) == "the options are resolved once: 'lr' cannot be removed"
    assert options.lr == 0.1 and "new" not in options
    values = {"a": 1}
    made = Options(values)
    values["a"] = 2  # the constructor copies
    made.to_dict()["a"] = 3  # so does to_dict
    assert made.a == 1


def test_options_replace_makes_a_new_object(options: Options) -> None:
    changed = options.replace(lr=0.2, batch_size=48)
    assert isinstance(changed, Options) and changed is not options
    assert (changed.lr, changed.batch_size, changed.tracker) == (0.2, 48, None)
    assert options.lr == 0.1 and "batch_size" not in options
    assert options.replace() == options and options.replace() is not options


def test_options_pickle_and_deepcopy(options: Options) -> None:
    for copied in (pickle.loads(pickle.dumps(options)), copy.deepcopy(options)):
        assert type(copied) is Options and copied == options and copied is not options
        assert copied.layers == [1, 2] and copied.layers is not options.layers
        with pytest.raises(AttributeError):
            copied.lr = 1


def test_options_of_namespace_mapping_or_options() -> None:
    from_ns = Options.of(argparse.Namespace(lr=0.3, epoch=2))
    assert isinstance(from_ns, Options) and from_ns.to_dict() == {"lr": 0.3, "epoch": 2}
    mapping = {"lr": 0.4}
    from_map = Options.of(mapping)
    assert isinstance(from_map, Options) and from_map.lr == 0.4
    assert Options.of(from_map) is from_map


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny multilabel run (a CSV with several labels per image), started without --loss or --metrice."""
    from conftest import write_multilabel_split

    root = tmp_path_factory.mktemp("owners_multilabel")
    lists = {name: write_multilabel_split(root, name, n, seed) for name, n, seed in (("train", 12, 0), ("val", 6, 1))}
    run = root / "run"
    proc = run_script("main.py", *train_args(None, run, "--train_path", lists["train"], "--val_path", lists["val"],
                                             "--test_path", root / "none"))
    return {"root": root, "run": run, "proc": proc}


def test_e2e_a_run_records_its_resolved_options(multilabel_run: dict) -> None:
    assert_ok(multilabel_run["proc"])
    run = RunFolder(multilabel_run["run"])
    recorded = yaml.safe_load(run.args_file.read_text())
    resolved = {"task_type": "multilabel", "loss": "BCEWithLogitsLoss", "metrice": "map"}
    assert {k: recorded[k] for k in resolved} == resolved
    for ckpt in (load_ckpt(run.best), load_ckpt(run.last)):
        assert {k: ckpt["args"][k] for k in resolved} == resolved
        assert ckpt["task"] == "multilabel"
    used = load_ckpt(run.best)["args"]
    assert {k: recorded[k] for k in used} == used  # what the run used is what args.yaml records (+ mean, std)
    assert set(recorded) - set(used) == {"mean", "std"}
    assert "loss: BCEWithLogitsLoss" in run.args_file.read_text()


def test_e2e_a_loss_of_the_other_task_is_refused_before_a_run_folder(tiny_data: Path, tmp_path: Path) -> None:
    save = tmp_path / "runs" / "exp"
    proc = run_inprocess("main.py", *train_args(tiny_data, save, "--loss", "BCEWithLogitsLoss"))
    line = assert_user_error(proc, "--loss BCEWithLogitsLoss", "multiclass", "multilabel", "--task_type multilabel")
    assert line.startswith("error: --loss BCEWithLogitsLoss does not fit a multiclass task")
    assert not save.exists() and not (tmp_path / "runs").exists(), list(tmp_path.rglob("*"))


# ============================================================================== utils.core.run
def test_run_folder_names_its_files(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path / "exp"))
    assert folder.path == tmp_path / "exp"
    assert (folder.best, folder.last, folder.args_file, folder.labels_file, folder.log_file, folder.export_dir) == tuple(
        tmp_path / "exp" / n for n in ("best.pt", "last.pt", "args.yaml", "label.txt", "train.log", "export"))
    assert folder / RunFolder.SWA == tmp_path / "exp" / "swa.pt"
    assert (RunFolder.PREDICT_DIR, RunFolder.FEATURES_DIR) == ("predict", "features")


def test_checkpoint_of_a_run_folder_or_a_file(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    run.mkdir()
    (run / "best.pt").write_bytes(b"x")
    assert RunFolder.checkpoint(run) == run / "best.pt"
    assert RunFolder.checkpoint(str(run), "--teacher_path") == run / "best.pt"
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    assert RunFolder.checkpoint(other, "--weight") == other  # a file is itself, whatever its suffix
    assert RunFolder.checkpoint(run / "best.pt") == run / "best.pt"


def test_checkpoint_refusals_name_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the message lists the runs in ./runs: none here
    with pytest.raises(UserError) as err:
        RunFolder.checkpoint(tmp_path / "nothing", "--teacher_path")
    assert one_line_error(err) == (f"--teacher_path {tmp_path / 'nothing'}: not found; pass a run folder of main.py "
                                   "(e.g. runs/exp) or a model file; no run beside it or in runs/ (main.py --save_path "
                                   "makes one)")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        RunFolder.checkpoint(empty)
    assert one_line_error(err) == (f"--save_path {empty}: no best.pt in it: pass the run folder main.py wrote "
                                   "(its --save_path)")
    runs = tmp_path / "runs"
    for name in ("exp2", "exp", "b_exp", "nobest"):
        (runs / name).mkdir(parents=True)
        if name != "nobest":
            (runs / name / "best.pt").write_bytes(b"x")
    (runs / "deep" / "exp").mkdir(parents=True)
    (runs / "deep" / "exp" / "best.pt").write_bytes(b"x")  # two levels down: not listed
    (runs / "best.ptx").write_bytes(b"x")
    with pytest.raises(UserError) as err:
        RunFolder.checkpoint(runs, "--resume")
    message = one_line_error(err, f"--resume {runs}: no best.pt in it")
    assert message.endswith(f"; runs here: {runs / 'b_exp'}, {runs / 'exp'}, {runs / 'exp2'}"), message
    for k in range(3, 12):
        (runs / f"exp{k}").mkdir()
        (runs / f"exp{k}" / "best.pt").write_bytes(b"x")
    with pytest.raises(UserError) as err:
        RunFolder.checkpoint(runs, "--resume")
    listed = str(err.value).split("; runs here: ")[1].split(", ")
    assert listed == sorted(str(p.parent) for p in runs.glob("*/best.pt"))[:10] and len(listed) == 10
    # a folder that holds best.pt as a folder is no run either
    odd = tmp_path / "odd"
    (odd / "best.pt").mkdir(parents=True)
    with pytest.raises(UserError, match="no best.pt in it"):
        RunFolder.checkpoint(odd)


def test_increment_path_claims_a_fresh_folder(tmp_path: Path) -> None:
    first = increment_path(tmp_path / "runs" / "exp")
    assert first == tmp_path / "runs" / "exp" and first.is_dir()
    assert [increment_path(tmp_path / "runs" / "exp") for _ in range(2)] == [tmp_path / "runs" / "exp2",
                                                                              tmp_path / "runs" / "exp3"]
    assert increment_path(tmp_path / "runs" / "exp2") == tmp_path / "runs" / "exp4"  # the number is the stem's counter
    (tmp_path / "7").mkdir()
    assert increment_path(tmp_path / "7") == tmp_path / "72"  # a name of digits keeps them


def test_run_writes_its_files(tmp_path: Path) -> None:
    nested = Run(tmp_path / "a" / "b")
    assert nested.path.is_dir()
    nested.close()  # no TensorBoard writer opened: nothing to close
    assert Run(tmp_path / "a" / "b").path == tmp_path / "a" / "b"  # an existing folder (a resumed run)
    run = Run(tmp_path / "exp")
    assert run.main and run.path.is_dir()
    run.write_yaml(RunFolder.ARGS, {"b": 1, "a": "é"})
    assert run.args_file.read_text(encoding="utf-8") == "b: 1\na: é\n"  # in order, unicode kept
    run.write_lines(RunFolder.LABELS, ["x", "y"])
    assert run.labels_file.read_text() == "x\ny\n"
    run.write_csv("t.csv", ["h1", "h2"], [[1, 2], [3, 4]])
    assert (run.path / "t.csv").read_bytes() == b"h1,h2\r\n1,2\r\n3,4\r\n"
    run.append_csv(RunFolder.LOG, {"epoch": 1, "loss": None, "extra": 9}, ["epoch", "loss"])
    run.append_csv(RunFolder.LOG, {"epoch": 2, "loss": 0.5}, ["epoch", "loss"])
    run.append_csv(RunFolder.LOG, {"epoch": 3}, ["epoch", "loss"])  # a missing value: empty
    assert run.log_file.read_bytes() == b"epoch,loss\r\n1,\r\n2,0.5\r\n3,\r\n"

    from PIL import Image

    run.savefig(Image.new("RGB", (3, 2), (255, 0, 0)), "img.png")
    with Image.open(run.path / "img.png") as img:
        assert img.format == "PNG" and img.size == (3, 2) and img.getpixel((0, 0)) == (255, 0, 0)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4, 2))
    fig.text(0.5, 0.5, "x")
    run.savefig(fig, "fig.png")
    plt.close(fig)
    with Image.open(run.path / "fig.png") as img:  # 120 dpi, cropped to what is drawn (bbox_inches="tight")
        assert img.format == "PNG" and img.info["dpi"] == pytest.approx((120, 120), abs=0.1)
        assert img.size[0] < 120 and img.size[1] < 120  # the whole figure would be 480 x 240
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_run_saves_checkpoints_and_opens_tensorboard(tmp_path: Path) -> None:
    from utils.core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(V1_RUN / "best.pt")
    run = Run(tmp_path / "exp")
    run.save(RunFolder.BEST, ckpt)
    saved = load_ckpt(run.best)
    assert saved.keys() == ckpt.to_dict().keys() and saved["class_names"] == ["cat", "dog"]
    assert all(torch.equal(saved["model"][k], v) for k, v in ckpt.to_dict()["model"].items())
    writer = run.tensorboard()
    assert writer is run.tensorboard() and Path(writer.log_dir) == run.path
    writer.add_scalar("x", 1.0, 0)
    run.close()
    assert run._tb is None and list(run.path.glob("events.out.tfevents.*"))


# =========================================================================== utils.deploy.formats
def test_every_format_row_has_its_module() -> None:
    import importlib

    assert MODEL_TYPES == tuple(FORMATS) == ("torch", "torchscript", "onnx", "openvino", "tensorrt", "safetensors", "ncnn",
                                             "tflite", "coreml")
    assert EXPORT_FLAGS == ("torchscript", "onnx", "openvino", "tensorrt", "safetensors", "ncnn", "tflite", "coreml")
    for flag, fmt in FORMATS.items():
        assert fmt.flag == flag and get_format(flag) is fmt
        module = importlib.import_module(fmt.module)
        assert isinstance(getattr(module, "Backend"), type), flag
        assert module.Backend.model_type == flag
        if fmt.exportable:
            assert callable(module.export) and fmt.exporter() is module.export, flag
        else:
            assert not hasattr(module, "export")
        assert all(s.startswith(".") and s == s.lower() for s in fmt.read_suffixes), flag


def test_format_file_names() -> None:
    onnx, xml, hub = FORMATS["onnx"], FORMATS["openvino"], FORMATS["safetensors"]
    assert [onnx.file_name("best", p) for p in PRECISIONS] == ["best.onnx", "best_fp16.onnx", "best_int8.onnx"]
    assert onnx.file_name("last") == "last.onnx" and hub.file_name("best") == "best_hub"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        onnx.file_name("best", "fp8")
    assert {f: FORMATS[f].precisions() for f in FORMATS} == {
        "torch": ["fp32", "fp16"], "torchscript": ["fp32", "fp16"], "onnx": ["fp32", "fp16", "int8"],
        "openvino": ["fp32", "fp16"], "tensorrt": ["fp32", "fp16"], "safetensors": ["fp32"], "ncnn": ["fp32"],
        "tflite": ["fp32", "fp16", "int8"], "coreml": ["fp32", "fp16"]}
    assert onnx.run_files() == ["best.onnx", "best_fp16.onnx", "best_int8.onnx"]
    assert xml.run_files("m") == ["m.xml", "m_fp16.xml"] and hub.run_files() == ["best_hub"]
    folder = Path("runs/exp/export")
    assert xml.files_of(folder / "best.xml") == [folder / "best.xml", folder / "best.bin", folder / "best.xml.json"]
    assert onnx.files_of(folder / "best_int8.onnx") == [folder / "best_int8.onnx", folder / "best_int8.onnx.json"]
    assert hub.files_of(folder / "best_hub") == [folder / "best_hub", folder / "best_hub.json"]
    ncnn = FORMATS["ncnn"]
    assert ncnn.file_name("best") == "best.ncnn.param"
    assert ncnn.files_of(folder / "best.ncnn.param") == [folder / "best.ncnn.param", folder / "best.ncnn.bin",
                                                         folder / "best.ncnn.param.json"]
    assert FORMATS["coreml"].run_files() == ["best.mlpackage", "best_fp16.mlpackage"]
    assert info_path("a/best.onnx") == Path("a/best.onnx.json")


def test_format_of_by_suffix_and_hub_folder(tmp_path: Path) -> None:
    cases = {"m.pt": "torch", "m.pth": "torch", "m.torchscript": "torchscript", "M.ONNX": "onnx", "m.xml": "openvino",
             "m.engine": "tensorrt", "m.plan": "tensorrt", "m.trt": "tensorrt", "m.ncnn.param": "ncnn", "m.tflite": "tflite",
             "m.mlpackage": "coreml"}
    assert {name: format_of(name).flag for name in cases} == cases
    assert format_of(Path("m.bin")) is None and format_of("model") is None and format_of("m.json") is None
    hub = tmp_path / "best_hub"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    assert not is_hub_folder(hub) and format_of(hub) is None  # config.json alone is not the layout
    (hub / "model.safetensors").write_bytes(b"")
    assert is_hub_folder(hub) and format_of(hub) is FORMATS["safetensors"] and format_of(str(hub)).flag == "safetensors"
    named = tmp_path / "odd.onnx"  # a folder is a Hub folder by its files, whatever its name
    shutil.copytree(hub, named)
    assert format_of(named) is FORMATS["safetensors"]
    (tmp_path / "f.pt").write_bytes(b"")
    assert not is_hub_folder(tmp_path / "f.pt") and not is_hub_folder(tmp_path / "absent")
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "model.safetensors").mkdir()
    (swapped / "config.json").write_text("{}")
    assert not is_hub_folder(swapped)
    (hub / "config.json").unlink()
    (hub / "config.json").mkdir()
    assert not is_hub_folder(hub)


def test_get_format_refuses_unknown_names() -> None:
    with pytest.raises(UserError) as err:
        get_format("mnn")
    assert one_line_error(err) == ("unknown model format 'mnn'; choose one of torch, torchscript, onnx, openvino, "
                                   "tensorrt, safetensors, ncnn, tflite, coreml")


def test_half_only_for_formats_that_run_half_and_refusals(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        FORMATS["onnx"].load(tmp_path / "m.onnx", "cpu", half=True)
    assert one_line_error(err) == ("--half applies to torch, torchscript models; a onnx model keeps the precision it "
                                   "was exported with (python export.py --half makes a float16 one)")
    from utils.core.schema import ModelMeta, PreprocessSpec

    spec = PreprocessSpec.create(32, 3, [0.5] * 3, [0.25] * 3)
    assert FORMATS["onnx"].refusal(ModelMeta("mobilenet_v2", ("a", "b"), spec)) is None  # no refusal(): None
    assert FORMATS["safetensors"].refusal(ModelMeta("resnet10t", ("a", "b"), spec)) is None
    why = FORMATS["safetensors"].refusal(ModelMeta("mobilenet_v2", ("a", "b"), spec))
    assert why and "mobilenet_v2 is a torchvision model" in why


def test_formats_table_has_one_line_per_format() -> None:
    lines = formats_table(markdown=True).splitlines()
    assert lines[0] == "| format | --export / --model_type | file | CPU | GPU | export needs | runs with |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    rows = lines[2:]
    assert len(rows) == len(FORMATS)
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0] == ["PyTorch checkpoint", "`torch (--model_type only)`", "`best.pt`", "yes", "yes", "-", "torch"]
    assert cells[2] == ["ONNX", "`onnx`", "`best.onnx`", "yes", "yes", "torch onnx onnxruntime", "onnxruntime"]
    assert cells[3][3:5] == ["yes", "-"] and cells[4][3:5] == ["-", "yes"]  # OpenVINO: CPU only; TensorRT: GPU only
    assert [c[1].strip("`") for c in cells[1:]] == list(EXPORT_FLAGS)
    assert [c[2] for c in cells] == [f"`{f.file_name('best')}`" for f in FORMATS.values()]
    plain = formats_table()
    assert plain.count("\n") == len(FORMATS) + 3  # rules above and below the header and below the rows
    assert plain.splitlines()[1].startswith("| format ") and "| --export / --model_type " in plain.splitlines()[1]
    assert plain.splitlines()[5].startswith("| ONNX ")  # left-aligned
    for fmt in FORMATS.values():
        assert fmt.name in plain and fmt.file_name("best") in plain


# The extension point: a format is one row of FORMATS and one module (tests/ts2_format.py).
TS2 = ModelFormat("ts2", "TorchScript, again", ".ts2", "ts2_format", (".ts2",), torch_runtime=True, half=True,
                  parity_on_export_device=True)


def test_a_new_format_is_one_row_and_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.deploy.export import ExportOptions, export_checkpoint
    from utils.infer.backends import load_backend, predict_probs

    monkeypatch.setitem(FORMATS, "ts2", TS2)
    run = tmp_path / "v1"
    shutil.copytree(V1_RUN, run)
    (result,) = export_checkpoint(run / "best.pt", ExportOptions(formats=["ts2"], device="cpu", parity_images=8))
    file = run / "export" / "best.ts2"
    assert result["path"] == str(file) and result["model_type"] == "ts2" and result["verdict"] == "ok"
    assert result["parity"]["ok"] is True and result["parity"]["images"] == 8
    assert result["parity"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in (run / "export").iterdir()) == ["best.ts2", "best.ts2.json"]  # renamed in, no staging left
    recorded = json.loads(info_path(file).read_text())
    assert recorded["model_type"] == "ts2" and recorded["file"] == "best.ts2" and recorded["parity"]["ok"] is True

    assert format_of(file) is TS2
    backend = load_backend(file, None, "cpu")  # the format from the suffix
    assert backend.model_type == "ts2" and type(backend).__module__ == "ts2_format"
    reference = load_backend(run, "torch", "cpu")  # the run's best.pt
    assert backend.meta == reference.meta
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    got, want = predict_probs(backend, images), predict_probs(reference, images)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.argmax(axis=1).tolist() == want.argmax(axis=1).tolist()
    assert load_backend(run, "ts2", "cpu").file == file  # a run folder finds export/best.ts2
    with pytest.raises(UserError, match="^--half needs a CUDA device"):  # --half reaches the format's runtime
        TS2.load(file, torch.device("cpu"), half=True)
    no_half = dataclasses.replace(TS2, half=False)  # a row without `half` refuses --half, and loads without it
    with pytest.raises(UserError, match="^--half applies to "):
        no_half.load(file, torch.device("cpu"), half=True)
    assert no_half.load(file, torch.device("cpu")).half is False


# ============================================================================== utils.infer.rows
NAMES7 = ["a", "b", "c", "d", "e", "f", "g"]


def test_rows_top_k_against_argsort() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(7), 5).astype(np.float32)
    probs[4] = [0.1, 0.3, 0.1, 0.3, 0.1, 0.05, 0.05]  # ties: the lower index first
    rows = prediction_rows([f"img{i}.png" for i in range(5)], probs, NAMES7)
    assert [r.path for r in rows] == [f"img{i}.png" for i in range(5)]
    for row, p in zip(rows, probs):
        order = np.argsort(-p, kind="stable")[:5]
        assert [c for c, _ in row.top] == [NAMES7[i] for i in order]
        assert [v for _, v in row.top] == [float(p[i]) for i in order]
        assert (row.index, row.class_name, row.prob) == (int(order[0]), NAMES7[order[0]], float(p[order[0]]))
        assert row.labels is None and row.given() == [row.class_name]
        assert row.entropy == pytest.approx(float(MULTICLASS.uncertainty(p[None])[0]))
    assert [c for c, _ in rows[4].top] == ["b", "d", "a", "c", "e"]
    many = np.random.default_rng(0).choice([0.1, 0.2, 0.3], 20).astype(np.float32)[None]  # ties among 20 classes
    (tied,) = prediction_rows(["t"], many, [f"c{i}" for i in range(20)])
    assert [c for c, _ in tied.top] == [f"c{i}" for i in np.argsort(-many[0], kind="stable")[:5]] == \
        ["c0", "c9", "c11", "c14", "c15"]  # equal probabilities: the lower index first, every time
    three = prediction_rows(["x"], [[0.2, 0.5, 0.3]], ["p", "q", "r"])[0]
    assert three.top == [("q", 0.5), ("r", pytest.approx(0.3)), ("p", pytest.approx(0.2))]  # fewer classes: all


def test_rows_uncertain_for_both_tasks() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.49, 0.31, 0.2], [0.9, 0.05, 0.05]], dtype=np.float32)
    assert [r.uncertain for r in prediction_rows("xyz", probs, ["p", "q", "r"])] == [False, True, False]  # below 0.5
    assert [r.uncertain for r in prediction_rows("xyz", probs, ["p", "q", "r"], conf_threshold=0.95)] == [True] * 3
    multi = np.array([[0.3, 0.59, 0.9], [0.29, 0.1, 0.49], [0.8, 0.7, 0.6]], dtype=np.float32)
    rows = prediction_rows("xyz", multi, ["p", "q", "r"], MULTILABEL, conf_threshold=0.99, thresholds=[0.3, 0.6, 0.5])
    assert [r.labels for r in rows] == [[("r", pytest.approx(0.9)), ("p", pytest.approx(0.3))], [],
                                        [("p", pytest.approx(0.8)), ("q", pytest.approx(0.7)), ("r", pytest.approx(0.6))]]
    assert [r.uncertain for r in rows] == [False, True, False]  # multilabel: uncertain when no class is given
    assert [r.given() for r in rows] == [["r", "p"], [], ["p", "q", "r"]]
    assert [r.class_name for r in rows] == ["r", "r", "p"]  # the top class, given or not
    tied = np.random.default_rng(0).choice([0.6, 0.7, 0.8], 20).astype(np.float32)[None]
    (row,) = prediction_rows(["t"], tied, [f"c{i}" for i in range(20)], MULTILABEL)
    assert [c for c, _ in row.labels] == [f"c{i}" for i in np.argsort(-tied[0], kind="stable")]  # ties: lower index first
    default = prediction_rows("x", multi[:1], ["p", "q", "r"], MULTILABEL)[0]  # 0.5 each
    assert [c for c, _ in default.labels] == ["r", "q"]
    assert [r.entropy for r in rows] == pytest.approx(MULTILABEL.uncertainty(multi).tolist())


def test_csv_row_and_json_carry_the_same_values(tmp_path: Path) -> None:
    probs = np.array([[0.123456789, 0.612345678, 0.264197533], [0.05, 0.02, 0.93]], dtype=np.float32)
    for task, thresholds in ((MULTICLASS, None), (MULTILABEL, [0.1, 0.5, 0.95])):
        rows = prediction_rows(["a.png", "b.png"], probs, ["x", "y", "z"], task, thresholds=thresholds)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=csv_fields(3, task))
        writer.writeheader()
        writer.writerows(r.csv_row() for r in rows)
        parsed = list(csv.DictReader(io.StringIO(text.getvalue())))
        for row, from_csv in zip(rows, parsed):
            js = json.loads(json.dumps(row.to_json()))
            assert from_csv["path"] == js["file"] == row.path
            assert from_csv["class"] == js["class"] == row.class_name and js["index"] == row.index
            assert float(from_csv["prob"]) == pytest.approx(js["prob"], abs=5e-7)
            assert [(from_csv[f"top{j}_class"], float(from_csv[f"top{j}_prob"])) for j in (1, 2, 3)] == \
                [(t["class"], pytest.approx(t["prob"], abs=5e-7)) for t in js["top"]]
            assert float(from_csv["entropy"]) == pytest.approx(js["entropy"], abs=5e-7)
            assert from_csv["uncertain"] == str(int(js["uncertain"]))
            assert from_csv["prob"] == f"{row.prob:.6f}"
            if task.multilabel:
                names = [t["class"] for t in js["labels"]]
                assert from_csv["labels"] == "|".join(names)
                assert from_csv["label_probs"] == "|".join(f"{t['prob']:.6f}" for t in js["labels"])
            else:
                assert "labels" not in js and "labels" not in from_csv
    assert parsed[0]["labels"] == "y|x" and parsed[1]["labels"] == ""  # x 0.12 >= 0.1; z 0.26 and 0.93 < 0.95
    assert rows[0].to_json() == {"file": "a.png", "class": "y", "index": 1, "prob": pytest.approx(0.612345678),
                                 "top": [{"class": "y", "prob": pytest.approx(0.612345678)},
                                         {"class": "z", "prob": pytest.approx(0.264197533)},
                                         {"class": "x", "prob": pytest.approx(0.123456789)}],
                                 "entropy": pytest.approx(rows[0].entropy), "uncertain": False,
                                 "labels": [{"class": "y", "prob": pytest.approx(0.612345678)},
                                            {"class": "x", "prob": pytest.approx(0.123456789)}]}


def test_csv_fields() -> None:
    assert csv_fields(2) == ["path", "class", "prob", "top1_class", "top1_prob", "top2_class", "top2_prob", "entropy",
                             "uncertain"]
    assert csv_fields(9, MULTILABEL) == ["path", "labels", "label_probs", "class", "prob",
                                         *[f"top{i}_{w}" for i in range(1, 6) for w in ("class", "prob")],
                                         "entropy", "uncertain"]


def test_prediction_writer_header_rows_and_counts(tmp_path: Path) -> None:
    names = ["x", "y", "z"]
    probs = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.2, 0.2, 0.6]], dtype=np.float32)
    rows = prediction_rows([f"{i}.png" for i in range(4)], probs, names)
    writer = PredictionWriter(tmp_path, names, keep_rows=3, total=6)
    assert (tmp_path / "incomplete.txt").is_file()  # until finish() says every image was predicted
    writer.write(rows[:1])
    writer.write(rows[1:])
    writer.skip([("bad.png", "not an image"), ("c.png", "cut")])
    assert (writer.rows, writer.skipped) == (4, 2)
    assert writer.first_rows == rows[:3]
    assert writer.counts == {"y": 1, "x": 2, "z": 1} and writer.uncertain == {"x": 1, "y": 0, "z": 0}
    writer.finish(6)
    assert not (tmp_path / "incomplete.txt").exists() and writer.incomplete == ""
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == csv_fields(3) == writer.fields
        assert list(reader) == [{k: str(v) for k, v in r.csv_row().items()} for r in rows]
    assert (tmp_path / "skipped.csv").read_text().splitlines() == ["path,reason", "bad.png,not an image", "c.png,cut"]

    again = PredictionWriter(tmp_path, names)
    assert again.class_names == names and again.keep_rows == 10
    uncertain_first = np.array([[0.4, 0.3, 0.3], [0.45, 0.3, 0.25], [0.9, 0.05, 0.05]] * 4, dtype=np.float32)
    again.write(prediction_rows([f"{i}" for i in range(12)], uncertain_first, names))
    again.skip([("a", "x")])
    again.skip([("b", "y")])
    assert again.counts == {"x": 12} and again.uncertain == {"x": 8}  # summed over rows, whatever their order
    assert (again.rows, again.skipped, len(again.first_rows)) == (12, 2, 10)

    multi = PredictionWriter(tmp_path, names, task=MULTILABEL)
    multi.write(prediction_rows(["m0", "m1"], [[0.9, 0.6, 0.1], [0.1, 0.2, 0.3]], names, MULTILABEL))
    assert multi.counts == {"x": 1, "y": 1} and multi.uncertain == {"x": 0, "y": 0}  # each label given counts
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        assert csv.DictReader(fh).fieldnames == csv_fields(3, MULTILABEL)
    before = (tmp_path / "predictions.csv").read_bytes()
    with pytest.raises(ValueError, match="columns of predictions.csv"):  # a multiclass row under multilabel columns
        multi.write(rows[:1])
    assert (tmp_path / "predictions.csv").read_bytes() == before  # nothing shifted into the wrong columns


def test_rows_name_unknown_images_in_every_output(tmp_path: Path) -> None:
    """--reject (utils.infer.ood.Rejector): each row's unknown flag and score, in every output."""
    from utils.infer.rows import UNKNOWN

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32)
    rows = prediction_rows(["a.png", "b.png"], probs, ["cat", "dog", "owl"], ood=(np.array([0.5, 7.25]), np.array([False, True])))
    known, unknown = rows
    assert (known.unknown, known.ood_score, unknown.unknown, unknown.ood_score) == (False, 0.5, True, 7.25)
    assert known.csv_row()["class"] == "cat" and known.csv_row()["unknown"] == 0 and known.csv_row()["ood_score"] == "0.500000"
    assert unknown.csv_row()["class"] == UNKNOWN == "unknown" and unknown.csv_row()["top1_class"] == "dog"
    assert unknown.csv_row()["unknown"] == 1 and unknown.csv_row()["ood_score"] == "7.250000"
    assert unknown.to_json()["class"] == UNKNOWN and unknown.to_json()["unknown"] is True
    assert unknown.to_json()["ood_score"] == 7.25 and unknown.to_json()["top"][0]["class"] == "dog"
    assert unknown.to_json()["index"] == 1 and unknown.to_json()["prob"] == pytest.approx(0.8)  # the nearest class's
    assert known.to_json()["unknown"] is False and known.to_json()["class"] == "cat"
    assert label_text(unknown) == "unknown (nearest: dog 0.80)" and label_text(known) == "cat (0.70)"
    assert (unknown.given(), unknown.shown_class, known.given(), known.shown_class) == ([UNKNOWN], UNKNOWN, ["cat"], "cat")
    assert csv_fields(3, reject=True) == [*csv_fields(3), "unknown", "ood_score"]
    plain = prediction_rows(["a.png"], probs[:1], ["cat", "dog", "owl"])[0]
    assert plain.unknown is None and "unknown" not in plain.csv_row() and "unknown" not in plain.to_json()
    writer = PredictionWriter(tmp_path, ["cat", "dog", "owl"], reject=True)
    assert writer.class_names == ["cat", "dog", "owl", UNKNOWN] and writer.fields == csv_fields(3, reject=True)
    writer.write(rows)
    assert writer.counts == {"cat": 1, UNKNOWN: 1}
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        assert list(csv.DictReader(fh)) == [{k: str(v) for k, v in r.csv_row().items()} for r in rows]


def test_bounded_writer_runs_every_job_with_a_bounded_queue() -> None:
    import threading

    from utils.infer.rows import BoundedWriter

    writer = BoundedWriter(limit=2)
    assert writer.limit == 2 and writer.pool._max_workers == 1
    gate, done = threading.Event(), []
    writer.submit(gate.wait)
    writer.submit(done.append, 1)
    assert len(writer.pending) == 2
    opener = threading.Timer(0.2, gate.set)
    opener.start()
    writer.submit(done.append, 2)  # waits for the oldest job: never more than `limit` pending
    assert gate.is_set() and len(writer.pending) <= 2
    for k in range(3, 8):
        writer.submit(done.append, k)
        assert len(writer.pending) <= 2
    writer.close()
    assert done == [1, 2, 3, 4, 5, 6, 7] and not writer.pending  # one thread: in order, all of them
    failing = BoundedWriter(limit=4, threads=2)
    assert failing.pool._max_workers == 2
    failing.submit(done.append, 8)
    failing.submit(int, "not a number")
    with pytest.raises(ValueError):
        failing.close()  # a failed save is not lost
    assert done[-1] == 8 and failing.pool._shutdown


def test_label_text_and_output_name() -> None:
    row = PredictionRow("a.png", 0, "cat", 0.4567, [("cat", 0.4567)], 0.7, True)
    assert label_text(row) == "cat (0.46) uncertain"
    assert label_text(PredictionRow("a.png", 0, "cat", 0.9, [("cat", 0.9)], 0.1, False)) == "cat (0.90)"
    assert output_name(Path("d/a.JPG")) == Path("d/a.JPG") and output_name(Path("a.png")) == Path("a.png")
    assert output_name(Path("d/a.bmp")) == Path("d/a.bmp.png")
    assert output_name(Path("a.webp"), (".webp",)) == Path("a.webp")


# ============================================================ utils.data.sources, utils.data.imageset
def write_list(path: Path, samples: list[tuple[str, object]], names: list[str], sep: str = "\t") -> Path:
    """A text list of `absolute path<sep>class name` rows for single-label samples."""
    path.write_text("".join(f"{p}{sep}{names[t]}\n" for p, t in samples))
    return path


def test_sources_choose_shards_then_list_files_then_hf_then_folders(tiny_data: Path) -> None:
    assert [s.name for s in SOURCES] == ["tar shards", "list file", "Hugging Face dataset or Parquet files",
                                         "folder of class folders"]
    image = next((tiny_data / "train" / "blue").iterdir())
    assert not SOURCES[0].matches(image) and not SOURCES[0].matches(tiny_data / "train")
    assert SOURCES[0].matches(Path("d/train-{000000..000003}.tar")) and SOURCES[0].matches(Path("d/*.tar"))
    assert SOURCES[1].matches(image) and not SOURCES[1].matches(tiny_data / "train")
    assert SOURCES[2].matches(Path("hf:data/train")) and not SOURCES[2].matches(tiny_data / "train")
    assert SOURCES[3].matches(tiny_data / "train") and SOURCES[3].matches(tiny_data / "absent")


def test_a_list_file_and_a_folder_give_the_same_samples(tiny_data: Path, tmp_path: Path) -> None:
    folder = scan_split(tiny_data / "train", what="train set")
    assert folder.class_names == TINY_CLASSES and folder.task is MULTICLASS
    assert len(folder.samples) == 8 * 3 and folder.class_counts() == [8, 8, 8]
    listed = scan_split(write_list(tmp_path / "train.txt", folder.samples, folder.class_names))
    assert listed.task is MULTICLASS and listed.class_names == folder.class_names
    assert sorted(listed.samples) == sorted(folder.samples) and listed.samples == folder.samples
    semicolon = tmp_path / "train_semicolon.txt"
    write_list(semicolon, folder.samples, folder.class_names, sep=";")
    assert scan_split(semicolon, reading=SourceOptions(list_sep=";")).samples == folder.samples  # list_sep reaches the list reader
    # val: the model's classes given (its own order), so indices follow them
    order = ["red", "blue", "green"]
    val = scan_split(tiny_data / "val", class_names=order)
    assert val.class_names == order
    assert all(order[t] == Path(p).parent.name for p, t in val.samples)
    val_list = scan_split(write_list(tmp_path / "val.txt", val.samples, order), class_names=order)
    assert val_list.samples == val.samples


def test_scan_split_passes_its_options_on(tiny_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "split"
    shutil.copytree(tiny_data / "val", root)
    (root / "blue" / "notes.png").write_text("not an image")
    checked = scan_split(root)
    assert [Path(p).name for p, _ in checked.skipped] == ["notes.png"] and len(checked.samples) == 9
    unchecked = scan_split(root, check_headers=False)
    assert len(unchecked.samples) == 10 and unchecked.skipped == []
    numbered = tmp_path / "numbered"
    for i, name in enumerate(TINY_CLASSES):
        shutil.copytree(tiny_data / "val" / name, numbered / str(i))
    label_file = tmp_path / "label.txt"
    label_file.write_text("\n".join(TINY_CLASSES) + "\n")
    labelled = scan_split(numbered, label_path=label_file)
    assert labelled.class_names == TINY_CLASSES
    with pytest.raises(UserError, match="^val set folder not found: "):
        scan_split(tmp_path / "absent", what="val set")
    with pytest.raises(UserError, match="^dataset folder not found: "):
        scan_split(tmp_path / "absent")
    assert checked.cache is not None and scan_split(root, use_cache=False).cache is None  # the scan cache, or none
    listed = write_list(tmp_path / "with_junk.txt", unchecked.samples, unchecked.class_names)
    assert len(scan_split(listed).samples) == 9 and len(scan_split(listed, check_headers=False).samples) == 10
    assert scan_split(listed).cache is not None and scan_split(listed, use_cache=False).cache is None
    (tmp_path / "unusable.txt").write_text("missing.png blue\n")
    with pytest.raises(UserError, match="^val set list .* has no usable row"):
        scan_split(tmp_path / "unusable.txt", what="val set")
    numeric = tmp_path / "numeric.txt"
    numeric.write_text("".join(f"{Path(p).relative_to(tmp_path).as_posix()} {t}\n" for p, t in labelled.samples))
    from_numbers = scan_split(numeric, label_path=label_file)
    assert from_numbers.class_names == TINY_CLASSES and from_numbers.samples == labelled.samples


def test_as_task_round_trip_and_refusal(tiny_data: Path, tmp_path: Path) -> None:
    one_label = scan_split(write_list(tmp_path / "val1.txt", scan_split(tiny_data / "val").samples, TINY_CLASSES))
    assert one_label.task is MULTICLASS and one_label.as_task(MULTICLASS) is one_label
    multi = one_label.as_task(MULTILABEL)
    assert multi.task is MULTILABEL and multi is not one_label
    assert multi.samples == [(p, (t,)) for p, t in one_label.samples]
    assert multi.class_names == one_label.class_names and multi.signature == one_label.signature
    assert multi.class_counts() == one_label.class_counts() == [3, 3, 3]
    back = multi.as_task(MULTICLASS)
    assert back.task is MULTICLASS and back.samples == one_label.samples
    assert one_label.task is MULTICLASS and all(type(t) is int for _, t in one_label.samples)  # the original is kept

    rows = [["path", "labels"]] + [[p, "blue|red" if i == 4 else TINY_CLASSES[t]]
                                   for i, (p, t) in enumerate(one_label.samples)]
    several = tmp_path / "several.csv"
    with several.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    multi_list = scan_split(several)
    assert multi_list.task is MULTILABEL and multi_list.samples[4][1] == (0, 2)
    assert multi_list.class_counts() == [4, 2, 4]  # green's second image became blue and red
    with pytest.raises(UserError) as err:
        multi_list.as_task(MULTICLASS)
    message = one_line_error(err, str(several), multi_list.samples[4][0], "--task_type multilabel")
    assert message == (f"{multi_list.samples[4][0]} (split {several}): a multiclass image has exactly one class, not 2; "
                       "train it with --task_type multilabel")
    with pytest.raises(UserError, match="not 2; evaluate it with a model of that task"):  # metrice.py's hint
        multi_list.as_task(MULTICLASS, "evaluate it with a model of that task")
    # a multilabel list whose images all carry one label encodes to multiclass
    single = ImageSet(tmp_path, [("a", (1,)), ("b", (0,))], ["x", "y"], task=MULTILABEL)
    assert single.as_task(MULTICLASS).samples == [("a", 1), ("b", 0)]
    empty = ImageSet(tmp_path, [("a", ())], ["x", "y"], task=MULTILABEL)
    with pytest.raises(UserError, match=r"^a \(split .*\): a multiclass image has exactly one class, not 0;"):
        empty.as_task(MULTICLASS)  # no label is not one label either


def test_task_type_is_a_frozen_value() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MULTICLASS.name = "x"  # type: ignore[misc]
    assert isinstance(MULTICLASS, TaskType) and MULTICLASS.log_metrics == ("acc", "mean_acc")
    assert MULTILABEL.log_metrics == ("map", "f1")
