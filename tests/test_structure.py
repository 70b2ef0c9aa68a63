"""The parts every script is built from: the checkpoint schema (and checkpoints written before it),
TrainState, the one ensemble path of metrice.py and predict.py, and the shape rules of the code."""
from __future__ import annotations

import argparse
import ast
import csv
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SUBPROCESS_ENV, assert_ok, describe, load_ckpt, run_script
from utils.core.checkpoint import load_checkpoint
from utils.core.log import UserError
from utils.core.schema import VERSION, Checkpoint, ModelMeta, PreprocessSpec
from utils.infer.ensemble import Member, resolve_weights_of
from utils.models.weights import model_from_checkpoint
from utils.train.state import ModuleState, TrainState

V1_RUN = REPO / "tests" / "fixtures" / "v1_run"  # written by the toolkit before the schema existed (format /1)


# ------------------------------------------------------------------------------------ schema
def test_preprocess_and_meta_round_trip() -> None:
    spec = PreprocessSpec.create(48, 1, [0.25], [0.5], "letterbox", "bicubic")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.geometry() == (48, 48, "letterbox", "bicubic", 1) and spec.with_size(64).crop == 64
    meta = ModelMeta("resnet10t", ("b", "a", "c"), spec)
    flat = meta.to_dict()
    assert ModelMeta.from_dict(flat) == meta
    assert (flat["num_classes"], flat["image_size"], flat["image_channel"], flat["mean"]) == (3, 48, 1, [0.25])


@pytest.mark.parametrize("change, needle", [
    ({"channels": 2}, "'channels' must be 1 or 3"),
    ({"mean": [0.5, 0.5]}, "'mean' must be 3"),
    ({"std": [0.5, 0.0, 0.5]}, "'std' must be 3 finite positive"),
    ({"resize_mode": "stretch"}, "'resize_mode' is 'stretch'"),
    ({"interpolation": "lanczos9"}, "'interpolation'"),
    ({"crop": 0}, "'crop' must be an integer from 1 to 4096"),
    ({"crop": 60000}, "'crop' must be an integer from 1 to 4096, not 60000"),  # MAX_IMAGE_SIZE: no 10 GB images
    ({"resize": 4097}, "'resize' must be an integer from 1 to 4096"),
    ({"resize": None}, "'resize' must be an integer"),
])
def test_preprocess_spec_refuses_bad_values(change: dict, needle: str) -> None:
    data = PreprocessSpec.create(32, 3, [0.5] * 3, [0.25] * 3).to_dict() | change
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        PreprocessSpec.from_dict(data, "x.pt")


def test_incomplete_or_foreign_checkpoints_get_one_clear_error(tmp_path: Path) -> None:
    cases = {
        "tag_only.pt": ({"format": "pytorch-classifier-ng/1"}, "lacks 'model_name'"),
        "no_tag.pt": ({"model": {}}, "not written by this toolkit"),
        "future.pt": ({"format": "pytorch-classifier-ng", "version": VERSION + 1}, "newer version"),
        "one_class.pt": (load_ckpt(V1_RUN / "best.pt") | {"class_names": ["cat"], "num_classes": 1}, "at least two"),
        "bad_kind.pt": (load_ckpt(V1_RUN / "best.pt") | {"kind": "weird"}, "'kind'"),
    }
    for name, (data, needle) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(UserError, match=needle):
            load_checkpoint(tmp_path / name)
    # weights that do not fit the named architecture: one line too, not a state_dict traceback
    data = load_ckpt(V1_RUN / "best.pt")
    data["model"] = {k: v for k, v in list(data["model"].items())[:-2]}
    torch.save(data, tmp_path / "cut.pt")
    with pytest.raises(UserError, match="do not fit test_efficientnet"):
        model_from_checkpoint(load_checkpoint(tmp_path / "cut.pt"))


def test_version_1_checkpoints_still_load() -> None:
    best = load_checkpoint(V1_RUN / "best.pt")
    assert best.version == 1 and best.kind == "best" and best.weights == "raw" and best.train_state is None
    assert best.meta.model_name == "test_efficientnet" and best.meta.class_names == ("cat", "dog")
    assert best.meta.image_size == 16 and best.meta.preprocess.resize_mode == "crop" and len(best.meta.preprocess.mean) == 3
    assert best.epoch == 1 and Member("best", None, best.meta.preprocess, metrics=best.metrics).stored_accuracy() == (
        best.metrics["val"]["acc"], "val")
    model = model_from_checkpoint(best)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)

    last = load_checkpoint(V1_RUN / "last.pt")
    assert last.kind == "last" and last.version == 1
    state = last.train_state
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "step", "best"} <= set(state)
    assert state["epoch"] == 1 and state["step"] == 0 and state["best"]["epoch"] == 1
    # written again, the same checkpoint is version 2 and reads back to the same object
    again = Checkpoint.from_dict(best.to_dict())
    assert again.version == VERSION and again.meta == best.meta and again.epoch == best.epoch


def write_v1_data(root: Path) -> None:
    """The images the version-1 fixture run was trained on (same seed, colours and sizes)."""
    rng = np.random.default_rng(1)
    colours = [(220, 30, 30), (40, 60, 220)]
    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate(["cat", "dog"]):
            folder = root / "data" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = np.clip(np.tile(np.array(colours[c], float), (16, 16, 1)) + rng.normal(0, 20, (16, 16, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{k}.png")


def test_version_1_run_resumes_predicts_and_exports(tmp_path: Path) -> None:
    write_v1_data(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(V1_RUN, run)
    resumed = run_script("main.py", "--save_path", "run", "--resume", "--epoch", "2", cwd=tmp_path)
    assert_ok(resumed)
    assert "resuming run at epoch 2" in resumed.stdout
    rows = list(csv.DictReader((run / "train.log").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == next(csv.DictReader((V1_RUN / "train.log").open()))  # epoch 1 kept as it was
    last = load_ckpt(run / "last.pt")
    assert last["version"] == VERSION and last["train_state"]["epoch"] == 2

    source = tmp_path / "data" / "val"
    as_written = tmp_path / "v1"  # the committed run untouched by the resume; predict.py writes into a copy, never
    shutil.copytree(V1_RUN, as_written)  # into the repository, which another test (or xdist worker) may be reading
    predicted = run_script("predict.py", "--source", source, "--save_path", as_written, "--device", "cpu", "--workers", 0,
                           cwd=tmp_path)
    assert_ok(predicted)
    rows = list(csv.DictReader(next((as_written / "predict").glob("exp*/predictions.csv")).open()))
    best = load_checkpoint(V1_RUN / "best.pt")
    model = model_from_checkpoint(best)
    from utils.data.decode import load_image
    from utils.data.transforms import Normalize, eval_transform

    spec = best.meta.preprocess
    x = torch.stack([eval_transform(spec)(load_image(r["path"], 3)) for r in rows])
    with torch.no_grad():
        probs = model(Normalize(spec.mean, spec.std)(x)).softmax(1)
    assert len(rows) == 4
    for row, p in zip(rows, probs):
        assert row["class"] == best.meta.class_names[int(p.argmax())]
        assert float(row["prob"]) == pytest.approx(float(p.max()), abs=1e-5)

    exported = run_script("export.py", "--save_path", run / "best.pt", "--export", "onnx", "--output_path", tmp_path / "exp",
                          "--device", "cpu", cwd=tmp_path)
    assert_ok(exported)
    assert "parity vs PyTorch" in exported.stdout and ": ok" in exported.stdout


# -------------------------------------------------------------------------------- TrainState
def _parts(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object, TrainState]:
    from utils.train.ema import EMA
    from utils.train.schedule import LRSchedule

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = LRSchedule(optimizer, 1e-2, 10, scheduler="ReduceLROnPlateau", scheduler_params={"patience": 0})
    ema = EMA(model, 0.9)
    state = TrainState()
    state.add("model", ModuleState(model))
    state.add("optimizer", optimizer)
    state.add("scheduler", schedule)
    state.add("ema", ema)
    return model, optimizer, (schedule, ema), state


def test_train_state_round_trip(tmp_path: Path) -> None:
    model, optimizer, (schedule, ema), state = _parts(seed=0)
    for epoch in range(3):  # a few real steps: optimizer moments, EMA updates, plateau counters
        schedule.start_epoch(epoch)
        loss = model(torch.randn(4, 3, 5, 5)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        schedule.end_epoch(1.0 + epoch)  # a worsening loss: the plateau scheduler acts on it
    state.epoch, state.step, state.sums, state.extra = 3, 5, {"count": 20}, {"kd_loss": 1.5}
    torch.save(state.state_dict(), tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())  # what the RNGs give next

    model2, optimizer2, (schedule2, ema2), fresh = _parts(seed=1)  # other initial weights
    assert not torch.equal(model2[0].weight, model[0].weight)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values()):
        assert torch.equal(a, b)
    assert ema2.updates == ema.updates == 3
    s1, s2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert schedule2.state_dict() == schedule.state_dict() and schedule2.last_val_loss == 3.0
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert (fresh.epoch, fresh.step, fresh.sums, fresh.extra) == (3, 5, {"count": 20}, {"kd_loss": 1.5})
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_train_state_refuses_a_state_without_a_required_part() -> None:
    *_, state = _parts(seed=0)
    saved = state.state_dict()
    del saved["ema"]
    *_, fresh = _parts(seed=0)
    with pytest.raises(UserError, match="has no ema"):
        fresh.load_state_dict(saved)
    with pytest.raises(ValueError, match="taken"):
        fresh.add("epoch", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))


# ------------------------------------------------------------------------- one ensemble path
def test_metrice_and_predict_give_the_same_ensemble_probabilities(trained_runs: dict, tiny_data: Path) -> None:
    import metrice
    import predict

    runs = [trained_runs["CrossEntropyLoss"].path, trained_runs["PolyLoss"].path]  # two different models
    common = ["--save_path", *map(str, runs), "--ensemble", "weighted", "--ensemble_weights", "2", "1", "--device", "cpu",
              "--workers", "0"]
    evaluated = metrice.main(metrice.parse_args([*common, "--task", "test", "--test_path", str(tiny_data / "test"),
                                                 "--visual"]))
    folder = predict.main(predict.parse_args([*common, "--source", str(tiny_data / "test")]))
    try:
        by_metrice = {}
        for name in ("correct.csv", "incorrect.csv"):
            for row in csv.DictReader((evaluated["output"] / name).open()):
                by_metrice[row["path"]] = {row[f"top{j}_class"]: float(row[f"top{j}_probability"]) for j in (1, 2, 3)}
        by_predict = {row["path"]: {row[f"top{j}_class"]: float(row[f"top{j}_prob"]) for j in (1, 2, 3)}
                      for row in csv.DictReader((folder / "predictions.csv").open())}
        assert by_metrice.keys() == by_predict.keys() and len(by_predict) == 9
        for path, probs in by_predict.items():
            assert probs == pytest.approx(by_metrice[path], abs=2e-6), path
        # and it is the weighted mean of the two models' own probabilities
        singles = [metrice.main(metrice.parse_args(["--save_path", str(r), "--task", "test", "--test_path",
                                                    str(tiny_data / "test"), "--visual", "--device", "cpu", "--workers", "0"]))
                   for r in runs]
        spread = 0.0
        for path, probs in by_predict.items():
            own = []
            for single in singles:
                rows = [r for n in ("correct.csv", "incorrect.csv") for r in csv.DictReader((single["output"] / n).open())]
                row = next(r for r in rows if r["path"] == path)
                own.append({row[f"top{j}_class"]: float(row[f"top{j}_probability"]) for j in (1, 2, 3)})
            for cls, p in probs.items():
                assert p == pytest.approx((2 * own[0][cls] + own[1][cls]) / 3, abs=2e-6)
            spread = max(spread, max(abs(own[0][c] - own[1][c]) for c in probs))
        assert spread > 1e-3, "the two models must disagree for the check to mean anything"
    finally:
        shutil.rmtree(folder.parent)
        for out in [evaluated["output"], *[s["output"] for s in singles]]:
            shutil.rmtree(out, ignore_errors=True)


def test_weights_default_to_the_stored_accuracy_val_before_train(caplog: pytest.LogCaptureFixture) -> None:
    spec = PreprocessSpec.create(16, 3, [0.5] * 3, [0.25] * 3)
    val = Member("a", None, spec, metrics={"train": {"acc": 0.99}, "val": {"acc": 0.75}})
    train_only = Member("b", None, spec, metrics={"train": {"acc": 0.5}, "val": {}})
    assert val.stored_accuracy() == (0.75, "val") and train_only.stored_accuracy() == (0.5, "train")
    with caplog.at_level("WARNING"):
        assert resolve_weights_of([val, train_only], "weighted", None) == [0.75, 0.5]
    assert "b has no validation metrics" in caplog.text
    assert resolve_weights_of([val, train_only], "weighted", [2, 1]) == [2.0, 1.0]
    assert resolve_weights_of([val, train_only], "mean", None) is None
    with pytest.raises(UserError, match="c stores no accuracy"):
        resolve_weights_of([val, Member("c", None, spec)], "weighted", None)


ENSEMBLE_CASES = [  # flags after --save_path a b -> (--ensemble, --ensemble_weights) or the refusal
    ([], ("mean", None)),
    (["--ensemble", "vote"], ("vote", None)),
    (["--ensemble", "weighted"], ("weighted", None)),
    (["--ensemble_weights", "2", "1"], ("weighted", [2.0, 1.0])),  # weights alone mean weighted
    (["--ensemble", "weighted", "--ensemble_weights", "2", "1"], ("weighted", [2.0, 1.0])),
    (["--ensemble", "vote", "--ensemble_weights", "2", "1"], "--ensemble_weights go with --ensemble weighted, not --ensemble vote"),
    (["--ensemble", "mean", "--ensemble_weights", "2", "1"], "--ensemble_weights go with --ensemble weighted, not --ensemble mean"),
    (["--ensemble_weights", "1"], "--ensemble_weights: 1 weight(s) for 2 model(s); give one per --save_path"),
    (["--ensemble", "weighted", "--ensemble_weights", "1", "2", "3"], "--ensemble_weights: 3 weight(s) for 2 model(s)"),
]


@pytest.mark.parametrize("flags, expected", ENSEMBLE_CASES)
def test_metrice_and_predict_read_the_ensemble_flags_alike(flags: list[str], expected: tuple | str) -> None:
    import metrice
    import predict

    scripts = {"metrice": (metrice, []), "predict": (predict, ["--source", "img"])}
    results = {}
    for name, (script, extra) in scripts.items():  # --save_path is not opened while parsing
        try:
            args = script.parse_args(["--save_path", "a", "b", *extra, *flags])
            results[name] = (args.ensemble, args.ensemble_weights)
        except UserError as err:
            results[name] = str(err)
    assert results["metrice"] == results["predict"]
    if isinstance(expected, str):
        assert isinstance(results["predict"], str) and results["predict"].startswith(expected) and "\n" not in results["predict"]
    else:
        assert results["predict"] == expected


def test_metrice_and_predict_define_the_ensemble_flags_alike() -> None:
    import metrice
    import predict

    def flags(parser: argparse.ArgumentParser) -> dict[str, tuple]:
        return {a.dest: (a.default, a.choices, a.nargs, a.type, a.help) for a in parser._actions
                if a.dest.startswith("ensemble")}

    assert flags(metrice.get_args_parser()) == flags(predict.get_args_parser())
    assert set(flags(predict.get_args_parser())) == {"ensemble", "ensemble_weights"}


# ------------------------------------------------------------------------------ code shape
# utils/'s packages, from the bottom up: a package imports only the packages before it.
LAYERS = ("core", "draw", "data", "models", "deploy", "infer", "evaluate", "explain", "train", "tune", "serve")


def _product_files() -> list[Path]:
    files = sorted(REPO.glob("*.py")) + sorted((REPO / "utils").rglob("*.py")) + sorted((REPO / "model").glob("*.py"))
    assert len(files) > 60
    return files


def _library_imports() -> dict[str, set[str]]:
    """Every module of utils/ (dotted, e.g. core.log) -> the utils modules it imports, at its top or inside functions."""
    graph: dict[str, set[str]] = {}
    for file in sorted((REPO / "utils").rglob("*.py")):
        name = ".".join(file.relative_to(REPO / "utils").with_suffix("").parts)
        deps = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils."):
                module = node.module.removeprefix("utils.")
                for alias in node.names:  # `from utils.core import log` imports the module utils.core.log
                    sub = f"{module}.{alias.name}"
                    deps.add(sub if (REPO / "utils" / (sub.replace(".", "/") + ".py")).is_file() else module)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("utils.") for a in node.names if a.name.startswith("utils.")}
        graph[name] = deps - {name}
    return graph


def test_utils_is_packages_by_concern_each_with_a_docstring() -> None:
    assert [p.name for p in sorted((REPO / "utils").glob("*.py"))] == ["__init__.py"]  # no module outside a package
    packages = sorted(p.name for p in (REPO / "utils").iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS)
    for file in sorted((REPO / "utils").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(file.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 8, f"{file.relative_to(REPO)} says in no docstring what lives there"


def test_no_function_over_80_lines_and_thin_scripts() -> None:
    long = []
    for file in _product_files():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{file.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
    for script in ("main.py", "metrice.py", "predict.py", "audit.py", "processing.py", "export.py", "tune.py"):
        lines = len((REPO / script).read_text(encoding="utf-8").splitlines())
        assert lines < 300, f"{script} has {lines} lines"


# Names the product never calls: hooks frameworks call (nn.Module.forward), and the library API
# the docs show (utils.infer.ensemble.predict_pil, PredictionRow.csv_row in docs/predict.md).
CALLED_FROM_OUTSIDE = {"forward", "predict_pil", "csv_row"}


def test_every_public_name_of_utils_is_used_by_the_product() -> None:
    """A function, class, method or constant of utils/ that only tests use is dead code (tests/ are
    not the product); private names (_x) and CALLED_FROM_OUTSIDE aside."""
    used: set[str] = set()
    defined: list[tuple[Path, str]] = []
    for file in _product_files() + sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.alias):
                used.add(node.name.rsplit(".", 1)[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # getattr(x, "name")
                used.add(node.value)
        if file.parts[len(REPO.parts)] == "utils":
            defined += [(file, n.name) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            defined += [(file, t.id) for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                        if isinstance(t, ast.Name)]
    unused = [f"{file.relative_to(REPO)}: {name}" for file, name in defined
              if name not in used and not name.startswith("_") and name not in CALLED_FROM_OUTSIDE]
    assert not unused, f"defined in utils/ but used by no script or module: {unused}"


def test_the_explanations_probe_models_in_one_place() -> None:
    """utils.explain's modules find their layers with utils.explain.probe: none hooks modules itself."""
    hooking = [file.name for file in sorted((REPO / "utils" / "explain").glob("*.py"))
               if "register_forward_hook" in file.read_text(encoding="utf-8")]
    assert hooking == ["probe.py"]


def test_one_cpu_policy() -> None:
    defined = [f"{file.relative_to(REPO)}" for file in _product_files() + sorted((REPO / "benchmarks").glob("*.py"))
               for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
               if isinstance(node, ast.FunctionDef) and node.name in ("default_workers", "share_cpu")]
    assert sorted(defined) == ["utils/core/device.py", "utils/core/device.py"], defined
    for script in ("main.py", "metrice.py", "predict.py"):
        assert "share_cpu(" in (REPO / script).read_text(encoding="utf-8"), script


def test_schema_and_images_import_without_torch() -> None:
    code = ("import sys\nfor name in ('torch', 'torchvision', 'timm'):\n    sys.modules[name] = None\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from utils.core.schema import ModelMeta\nfrom utils.data.decode import load_image\n"
            "from utils.data.sources import scan_split\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=None)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", describe(proc)


def test_scripts_import_without_torch_and_threads_carry_over() -> None:
    """Every script's --help is fast because importing it loads no torch; the threads serve.py
    chooses before a model is loaded are the ones torch runs with once it is."""
    code = (f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "import main, metrice, predict, export, audit, processing, serve, tune\n"
            "assert 'optuna' not in sys.modules, 'tune.py imported optuna'\n"
            "assert 'torch' not in sys.modules, 'a script imported torch'\n"
            "from utils.core.device import compute_threads, import_torch, set_threads\n"
            "set_threads(os.cpu_count() + 1)\nassert compute_threads() == os.cpu_count() + 1\n"
            "torch = import_torch('the test')\nprint(torch.get_num_threads() - os.cpu_count(), compute_threads() - os.cpu_count())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in SUBPROCESS_ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "1"], describe(proc)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        if state.get(node) == 1:
            return path[path.index(node):] + [node]
        if state.get(node) == 2:
            return None
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            found = visit(dep, path + [node])
            if found:
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_library_modules_import_no_cycle_and_no_package_above_their_own() -> None:
    graph = _library_imports()
    assert len(graph) > 50 and "core.log" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    upward = [f"utils.{module} imports utils.{dep}" for module, deps in graph.items() for dep in deps
              if module.split(".")[0] in LAYERS and dep.split(".")[0] in LAYERS
              and LAYERS.index(dep.split(".")[0]) > LAYERS.index(module.split(".")[0])]
    assert not upward, f"a package imports one that stands above it ({' < '.join(LAYERS)}): {upward}"
    packages = {p: {d.split(".")[0] for m, deps in graph.items() if m.split(".")[0] == p for d in deps} - {p}
                for p in LAYERS}
    assert find_cycle(packages) is None
    assert "models.registry" not in graph["train.distill"] and "models.features" in graph["train.distill"]


def test_layers_with_state_dict_versions_load_from_checkpoints(tmp_path: Path) -> None:
    """torchvision's MNASNet refuses weights without its state-dict version: checkpoints are plain
    dicts, so the loader must supply the model's own (best.pt, last.pt, EMA and --weight alike)."""
    from utils.models.registry import create_model
    from utils.models.weights import load_weights

    torch.manual_seed(0)
    model = create_model("mnasnet0_5", 3, 3).eval()
    meta = ModelMeta("mnasnet0_5", ("a", "b", "c"), PreprocessSpec.create(32, 3, [0.5] * 3, [0.25] * 3))
    torch.save(Checkpoint("best", meta, {k: v.clone() for k, v in model.state_dict().items()}).to_dict(), tmp_path / "best.pt")
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
    other = create_model("mnasnet0_5", 3, 3)
    loaded, _ = load_weights(other, tmp_path / "best.pt")
    assert len(loaded) == len(model.state_dict())
