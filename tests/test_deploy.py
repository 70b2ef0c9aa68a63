"""Deployment without the training stack: the numpy preprocessing against the torch transforms,
predict.py and metrice.py with onnx / openvino in processes where torch, torchvision and timm
cannot be imported, --weight, and the C++ program deploy/cpp (built here when cmake, a compiler,
stb_image and nlohmann-json are present; `make test` installs them).

One tiny run (test_resnet, 1 epoch at 32 px, letterbox) is trained with main.py and exported with
export.py in subprocesses; the C++ build runs in the background meanwhile. Every predictor is
compared with predict.py --model_type torch on the same images: odd sizes, grey, palette, RGBA,
16-bit and an EXIF-rotated PNG.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (REPO, SUBPROCESS_ENV, TINY_CLASSES, assert_ok, assert_user_error, class_image, describe,
                      make_split_dataset, run_many, run_script, train_args)
from utils.core import schema
from utils.core.schema import INTERPOLATIONS, RESIZE_MODES, PreprocessSpec
from utils.data import transforms as torch_side
from utils.data import transforms_np as preprocess_np
from utils.data.decode import load_image

FP32_TOLERANCE = 1e-4
BLOCKED = ("torch", "torchvision", "timm")
# A deployment machine: importing torch, torchvision or timm fails in every process that gets this
# folder on PYTHONPATH (worker processes included), as if they were not installed.
BLOCKER = f'''import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a deployment machine without it)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
'''
CPP_SOURCE = REPO / "deploy" / "cpp"


# ----------------------------------------------------------------------------- images
def odd_images(folder: Path, seed: int = 0) -> list[Path]:
    """Class images of odd sizes in every mode load_image converts, and an EXIF-rotated one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(37, 23), (23, 41), (50, 50), (61, 19)]
    files = []
    for c, name in enumerate(TINY_CLASSES):
        for k, (w, h) in enumerate(sizes):
            path = folder / f"{name}{k}.png"
            class_image(c, rng, 64).resize((w, h), Image.BILINEAR).save(path)
            files.append(path)
    modes = {"gray.png": lambda im: im.convert("L"), "palette.png": lambda im: im.convert("P"),
             "rgba.png": lambda im: Image.merge("RGBA", (*im.split(), Image.new("L", im.size, 180)))}
    for name, convert in modes.items():
        convert(class_image(len(files) % 3, rng, 45)).save(folder / name)
        files.append(folder / name)
    Image.fromarray((rng.random((29, 47)) * 65535).astype(np.uint16)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    class_image(2, rng, 40).resize((44, 26)).save(folder / "rotated.png", exif=exif.tobytes())
    return files + [folder / "deep16.png", folder / "rotated.png"]


def read_predictions(folder: Path) -> dict[str, dict[str, float]]:
    """predictions.csv -> {file name: {class: probability}} (all classes: 3 <= top 5)."""
    with (folder / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: {r[f"top{j}_class"]: float(r[f"top{j}_prob"]) for j in (1, 2, 3)}
                for r in csv.DictReader(fh)}


def predict_folder(proc: subprocess.CompletedProcess) -> Path:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("predict folder: "))
    return Path(line.split(": ", 1)[1])


def assert_same_predictions(got: dict[str, dict[str, float]], want: dict[str, dict[str, float]], what: str) -> None:
    """Top-1 equal and every probability within the float32 tolerance."""
    assert got.keys() == want.keys(), what
    for name, probs in want.items():
        assert max(got[name], key=got[name].get) == max(probs, key=probs.get), f"{what}: top-1 of {name}"
        for cls, p in probs.items():
            assert abs(got[name][cls] - p) <= FP32_TOLERANCE, f"{what}: {name} {cls} {got[name][cls]} vs {p}"


# --------------------------------------------------------------------------- fixtures
def _build_cpp(build: Path) -> Path | str:
    """Configure and build deploy/cpp into `build`: the classify binary, or why it cannot be built."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    missing += [h for h in ("stb/stb_image.h", "nlohmann/json.hpp") if not (Path("/usr/include") / h).is_file()]
    if missing:
        return f"the C++ build needs {', '.join(missing)} (make test installs cmake g++ libstb-dev nlohmann-json3-dev)"
    configure = ["cmake", "-S", str(CPP_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "1"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, describe(proc)
    return build / "classify"


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The C++ build, started in the background (it overlaps the training run)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future: Future = pool.submit(_build_cpp, tmp_path_factory.mktemp("cpp") / "build")
    yield future
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory, cpp_build: Any) -> dict[str, Any]:
    """A trained letterbox run exported to TorchScript, ONNX (+ int8) and OpenVINO, a fixed-batch
    TorchScript export, the prediction images, and the reference predictions of the torch model."""
    root = tmp_path_factory.mktemp("deploy")
    data = make_split_dataset(root / "data", TINY_CLASSES, train=6, val=2, test=2)
    run = root / "runs" / "exp"
    assert_ok(run_script("main.py", *train_args(data, run, "--resize_mode", "letterbox", model="test_resnet")))
    images = odd_images(root / "images")
    blocker = root / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    exports = run_many([
        {"script": "export.py", "args": ["--save_path", str(run), "--export", "torchscript", "onnx", "openvino", "--int8",
                                         "--device", "cpu"]},
        {"script": "export.py", "args": ["--save_path", str(run), "--export", "torchscript", "--batch_size", "2",
                                         "--device", "cpu", "--output_path", str(root / "fixed")]},
    ])
    for proc in exports:
        assert_ok(proc)
    reference = run_script("predict.py", "--source", root / "images", "--save_path", run, "--device", "cpu", "--workers", 0)
    assert_ok(reference)
    return {"root": root, "data": data, "run": run, "images": images, "blocker": blocker,
            "reference": read_predictions(predict_folder(reference))}


def without_torch(deploy: dict[str, Any]) -> dict[str, str]:
    """The environment of a process where torch, torchvision and timm cannot be imported."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(deploy["blocker"]), os.environ.get("PYTHONPATH")]))}


def classify_binary(cpp_build: Future) -> Path:
    result = cpp_build.result()
    if isinstance(result, str):
        pytest.skip(result)
    return result


# ----------------------------------------------------------------- numpy preprocessing
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_numpy_preprocessing_is_bit_identical_to_the_torch_transforms(mode: str) -> None:
    rng = np.random.default_rng(0)
    sizes = [(37, 23), (23, 37), (32, 32), (9, 100), (101, 99), (5, 3)]
    geometries = [(32, 32), (17, 17), (36, 32), (28, 32)]  # (resize, crop): equal, odd, larger, smaller (padding)
    checked = 0
    for (w, h), interpolation, channels, (resize, crop) in itertools.product(sizes, INTERPOLATIONS, (3, 1), geometries):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("RGB" if channels == 3 else "L")
        spec = PreprocessSpec.from_dict({"resize": resize, "crop": crop, "channels": channels, "mean": [0.5] * channels,
                                         "std": [0.25] * channels, "resize_mode": mode, "interpolation": interpolation})
        for tta in (False, True):
            want = torch_side.image_transform(spec, tta)(img).numpy()
            got = preprocess_np.image_transform(spec, tta)(img)
            assert got.dtype == np.uint8 and got.shape == want.shape, (w, h, interpolation, channels, resize, crop, tta)
            assert np.array_equal(got, want), (w, h, interpolation, channels, resize, crop, tta)
            checked += 1
    assert checked == len(sizes) * len(INTERPOLATIONS) * 2 * len(geometries) * 2


def test_the_schema_owns_the_letterbox_fill_and_the_tta_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both transforms read utils.core.schema's LETTERBOX_FILL and TTA_SCALE: changing the one value
    changes both outputs alike (a copy of either number elsewhere would leave one side behind)."""
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 40, 3), dtype=np.uint8))  # wide: borders
    spec = PreprocessSpec.create(16, 3, [0.5] * 3, [0.25] * 3, "letterbox")

    def both(tta: bool) -> np.ndarray:
        want = torch_side.image_transform(spec, tta)(img).numpy()
        got = preprocess_np.image_transform(spec, tta)(img)
        assert np.array_equal(got, want)
        return got

    plain, tta = both(False), both(True)
    assert (plain[:, 0, :] == schema.LETTERBOX_FILL).all()
    monkeypatch.setattr(schema, "LETTERBOX_FILL", 7)
    assert (both(False)[:, 0, :] == 7).all() and np.array_equal(both(False)[:, 8, :], plain[:, 8, :])
    monkeypatch.setattr(schema, "TTA_SCALE", 1.5)
    assert both(True).shape == tta.shape and not np.array_equal(both(True), tta)
    assert torch_side.train_transform(16, "crop").transforms[0].size == [24]  # training's resize follows too


def test_cpp_letterbox_fill_is_the_schemas() -> None:
    """deploy/cpp cannot import Python: its copy of the fill is read from the source."""
    found = re.findall(r"constexpr uint8_t kLetterboxFill = (\d+);", (CPP_SOURCE / "preprocess.cpp").read_text(encoding="utf-8"))
    assert found == [str(schema.LETTERBOX_FILL)]


def test_numpy_normalize_and_softmax_match_torch() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = torch_side.Normalize(mean, std)(torch.from_numpy(batch)).numpy()
    assert np.array_equal(preprocess_np.normalize(batch, mean, std), want)  # the same float32 steps: the same bits
    logits = rng.normal(0, 5, (6, 4)).astype(np.float32)
    from utils.core.task import MULTICLASS, MULTILABEL

    assert np.allclose(MULTICLASS.probabilities(logits), torch.from_numpy(logits).softmax(1).numpy(), atol=1e-7)
    assert np.allclose(MULTILABEL.probabilities(logits), torch.from_numpy(logits).sigmoid().numpy(), atol=1e-7)
    tta = rng.random((2, 10, 4)).astype(np.float32)
    assert np.allclose(preprocess_np.run_with_tta(lambda x: x, tta.reshape(2, 10, 4, 1, 1, 1)).reshape(2, 4),
                       tta.mean(axis=1), atol=1e-7)


# ---------------------------------------------------------------------- without torch
def test_predict_and_metrice_run_without_torch(deploy: dict[str, Any]) -> None:
    run, env = deploy["run"], without_torch(deploy)
    common = ["--source", deploy["root"] / "images", "--save_path", run, "--device", "cpu"]
    test_split = ["--task", "test", "--test_path", deploy["data"] / "test", "--device", "cpu", "--workers", 0]
    jobs = [
        {"script": "predict.py", "args": [*common, "--model_type", "onnx", "--workers", 1], "env": env},  # a loader process too
        {"script": "predict.py", "args": [*common, "--model_type", "openvino", "--workers", 0], "env": env},
        {"script": "metrice.py", "args": ["--weight", run / "export" / "best.onnx", *test_split], "env": env},
        {"script": "metrice.py", "args": ["--save_path", run, *test_split]},
        {"script": "predict.py", "args": [*common, "--workers", 0], "env": env},  # the torch model: one line
        {"script": "predict.py", "args": [*common, "--model_type", "onnx", "--cam_visual"], "env": env},
    ]
    onnx, openvino, metrice_onnx, metrice_torch, needs_torch, cam = run_many(jobs)
    for name in BLOCKED:  # the blocker works: these cannot be imported there
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ) | SUBPROCESS_ENV | env)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, describe(proc)
    for proc, what in ((onnx, "onnx"), (openvino, "openvino")):
        assert_ok(proc)
        assert_same_predictions(read_predictions(predict_folder(proc)), deploy["reference"], f"predict.py {what} without torch")
    for proc in (metrice_onnx, metrice_torch):
        assert_ok(proc)
    assert metrics_of(metrice_onnx) == pytest.approx(metrics_of(metrice_torch), abs=FP32_TOLERANCE, nan_ok=True)
    assert_user_error(needs_torch, "--model_type torch needs PyTorch", "onnx or openvino")
    assert_user_error(cam, "--cam_visual needs", "--model_type torch")


def metrics_of(proc: subprocess.CompletedProcess) -> dict[str, float]:
    folder = Path([ln for ln in proc.stdout.splitlines() if ln.startswith("results: ")][-1].split(": ", 1)[1])
    with (folder / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        return {row["metric"]: float(row["value"]) for row in csv.DictReader(fh)}


def test_weight_takes_any_model_file(deploy: dict[str, Any]) -> None:
    run = deploy["run"]
    source = ["--source", deploy["root"] / "images", "--device", "cpu", "--workers", 0]
    int8, checkpoint, folder, both = run_many([
        {"script": "predict.py", "args": [*source, "--weight", run / "export" / "best_int8.onnx"], "env": without_torch(deploy)},
        {"script": "predict.py", "args": [*source, "--weight", run / "best.pt"]},
        {"script": "predict.py", "args": [*source, "--weight", run]},
        {"script": "predict.py", "args": [*source, "--weight", run / "best.pt", "--save_path", run]},
    ])
    assert_ok(int8)
    assert predict_folder(int8).parent == run / "export" / "predict"
    rows = read_predictions(predict_folder(int8))
    agree = sum(max(p, key=p.get) == max(deploy["reference"][n], key=deploy["reference"][n].get) for n, p in rows.items())
    assert rows.keys() == deploy["reference"].keys() and agree >= len(rows) - 1  # int8: top-1 nearly always the same
    assert_ok(checkpoint)
    assert_same_predictions(read_predictions(predict_folder(checkpoint)), deploy["reference"], "predict.py --weight best.pt")
    assert_user_error(folder, "--weight", "is a folder", "--save_path")
    assert_user_error(both, "either --save_path", "or --weight")


# --------------------------------------------------------------------------------- C++
@pytest.mark.system_deps
def test_cpp_preprocessing_is_bit_identical_to_python(cpp_build: Future, deploy: dict[str, Any], tmp_path: Path) -> None:
    classify = classify_binary(cpp_build)
    files = deploy["images"]
    exif_files = []
    rng = np.random.default_rng(3)
    for orientation in range(1, 9):  # every EXIF orientation, in a PNG eXIf chunk
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif_files.append(tmp_path / f"exif{orientation}.png")
        Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)).save(exif_files[-1], exif=exif.tobytes())
    files = files + exif_files + [tmp_path / "tiny.png"]
    Image.fromarray(rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)).save(files[-1])  # upscaled in every geometry
    for mode, interpolation, channels, (resize, crop) in itertools.product(RESIZE_MODES, INTERPOLATIONS, (3, 1),
                                                                           [(32, 32), (19, 17), (40, 44)]):
        spec = PreprocessSpec.from_dict({"resize": resize, "crop": crop, "channels": channels, "mean": [0.5] * channels,
                                         "std": [0.2] * channels, "resize_mode": mode, "interpolation": interpolation})
        meta, dump = tmp_path / "meta.json", tmp_path / "input.u8"
        meta.write_text(json.dumps({"preprocess": spec.to_dict(), "class_names": ["a", "b"]}), encoding="utf-8")
        proc = subprocess.run([str(classify), "--preprocess-only", "--meta", str(meta), "--dump-input", str(dump),
                               *map(str, files)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, describe(proc)
        got = np.fromfile(dump, dtype=np.uint8).reshape(len(files), channels, crop, crop)
        transform = preprocess_np.image_transform(spec)
        for file, pixels in zip(files, got):
            want = transform(load_image(file, channels))
            assert np.array_equal(pixels, want), (file.name, mode, interpolation, channels, resize, crop,
                                                  int(np.abs(pixels.astype(int) - want).max()))


def run_classify(classify: Path, *args: Any) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([str(classify), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def parse_classify(stdout: str, class_names: list[str]) -> dict[str, dict[str, float]]:
    """classify --all lines -> {file name: {class: probability}}, checking the top-1 columns."""
    out = {}
    for row in csv.reader(stdout.splitlines()):
        path, top, prob, *probs = row
        out[Path(path).name] = dict(zip(class_names, map(float, probs)))
        assert top == max(out[Path(path).name], key=out[Path(path).name].get) and abs(float(prob) - max(map(float, probs))) < 1e-6
    return out


@pytest.mark.system_deps
def test_cpp_classify_matches_predict(cpp_build: Future, deploy: dict[str, Any], tmp_path: Path) -> None:
    classify = classify_binary(cpp_build)
    run, images = deploy["run"], deploy["images"]
    classes = json.loads((run / "export" / "best.torchscript.json").read_text(encoding="utf-8"))["class_names"]
    proc = run_classify(classify, run / "export" / "best.torchscript", *images, "--all", "--batch", 4)
    assert proc.returncode == 0, describe(proc)
    assert_same_predictions(parse_classify(proc.stdout, classes), deploy["reference"], "classify")
    assert f"{len(images)} images classified" in proc.stderr
    # a fixed-batch export (2 images a call): the last call is padded
    fixed = run_classify(classify, deploy["root"] / "fixed" / "best.torchscript", *images[:5], "--all")
    assert fixed.returncode == 0, describe(fixed)
    assert_same_predictions(parse_classify(fixed.stdout, classes), {Path(f).name: deploy["reference"][Path(f).name]
                                                                     for f in images[:5]}, "classify, fixed batch")
    # the metadata embedded in the TorchScript file when the JSON is not beside it
    alone = tmp_path / "model.torchscript"
    shutil.copy(run / "export" / "best.torchscript", alone)
    embedded = run_classify(classify, alone, images[0])
    assert embedded.returncode == 0 and embedded.stdout.split(",")[1] == max(deploy["reference"][images[0].name],
                                                                              key=deploy["reference"][images[0].name].get)
    # an unreadable image is reported and skipped (exit 1); usage errors are one line (exit 2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    broken = run_classify(classify, alone, images[0], tmp_path / "broken.png")
    assert broken.returncode == 1 and len(broken.stdout.splitlines()) == 1 and "skipped" in broken.stderr, describe(broken)
    for args, needle in (((tmp_path / "missing.torchscript", images[0]), "cannot be loaded as TorchScript"),
                         ((alone,), "no image given"), ((alone, images[0], "--batch", "0"), "--batch must be a positive")):
        bad = run_classify(classify, *args)
        lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], describe(bad)


@pytest.mark.system_deps
def test_cpp_classify_divides_the_logits_by_the_temperature(cpp_build: Future, deploy: dict[str, Any], tmp_path: Path) -> None:
    """The metadata's calibration temperature T: classify prints softmax(logits / T), as predict.py does
    (T = 2.5 written into a copy of the JSON; the reference is predict.py at the model's own T)."""
    classify = classify_binary(cpp_build)
    run, images = deploy["run"], deploy["images"]
    info = json.loads((run / "export" / "best.torchscript.json").read_text(encoding="utf-8"))
    classes, own = info["class_names"], (info.get("temperature") or [1.0])[0]
    meta = tmp_path / "calibrated.json"
    meta.write_text(json.dumps(info | {"temperature": [2.5]}), encoding="utf-8")
    proc = run_classify(classify, run / "export" / "best.torchscript", *images, "--all", "--meta", meta)
    assert proc.returncode == 0, describe(proc)
    got = parse_classify(proc.stdout, classes)
    moved = 0.0
    for name, reference in deploy["reference"].items():
        logits = np.log([reference[c] for c in classes]) * own  # the logits, up to a constant
        expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum()
        assert np.allclose([got[name][c] for c in classes], expected, atol=FP32_TOLERANCE), name
        moved = max(moved, max(abs(got[name][c] - reference[c]) for c in classes))
    assert moved > 0.01  # the temperature changed the probabilities
    meta.write_text(json.dumps(info | {"temperature": [1.0, 2.0, 3.0]}), encoding="utf-8")
    bad = run_classify(classify, run / "export" / "best.torchscript", images[0], "--meta", meta)
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(lines) == 1 and "the temperature must be one positive number" in lines[0], describe(bad)
