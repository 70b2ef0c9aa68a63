"""predict.py and its library (utils/predict.py, utils/cam.py): a folder of mixed images and junk,
single files, globs, ensembles, every CAM method, transformers' reshapes, and the user errors.

Self-contained: its own tiny dataset and its own 1-epoch resnet10t run (trained once per session
in a subprocess); the CLI runs in subprocesses as a user runs it, two at a time.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import assert_user_error, run_inprocess
from utils.core.checkpoint import load_checkpoint
from utils.core.log import UserError
from utils.data.decode import load_image
from utils.data.transforms import Normalize, eval_transform
from utils.explain.cam import CAM_TYPES, NHWCToNCHW, TokensToNCHW, cam_maps, cam_panel, find_cam_layer
from utils.infer.backends import load_backend
from utils.infer.ensemble import load_ensemble, predict_pil
from utils.infer.rows import prediction_rows
from utils.infer.sources import find_images
from utils.models.weights import model_from_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220)}
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
       "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
VALID = ["rgb.png", "gray.png", "palette.png", "rgba.png", "deep16.png", "sub/rotated.jpg"]
JUNK = {"notes.txt": "not an image file", "empty.png": "empty", "truncated.jpg": "decode"}


def run(script: str, *args: Any, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, script if script.startswith("-") else str(REPO / script), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | ENV, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def predict_folder_of(proc: subprocess.CompletedProcess) -> Path:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("predict folder: "))
    return Path(line.split(": ", 1)[1])


def read_rows(folder: Path, name: str = "predictions.csv") -> list[dict[str, str]]:
    with (folder / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def colour_image(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 32) -> Image.Image:
    arr = np.tile(np.array(colour, dtype=np.float64), (size, size, 1)) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch resnet10t run on 3 colours x 8 train / 2 val images of 32x32."""
    root = tmp_path_factory.mktemp("predict_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                colour_image(colour, rng).save(root / split / name / f"{k}.png")
    save = root / "runs" / "exp"
    ok(run("main.py", "--model_name", "resnet10t", "--image_size", 32, "--epoch", 1, "--workers", 0, "--batch_size", 8,
           "--device", "cpu", "--train_path", root / "train", "--val_path", root / "val", "--test_path", root / "none",
           "--label_path", root / "label.txt", "--save_path", save))
    assert (save / "best.pt").is_file()
    return save


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid images in six modes (one EXIF-rotated, one in a sub-folder) and three bad files."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    red = colour_image(COLOURS["red"], rng, 40)
    red.save(folder / "rgb.png")
    colour_image(COLOURS["green"], rng, 40).convert("L").save(folder / "gray.png")
    colour_image(COLOURS["blue"], rng, 40).convert("P").save(folder / "palette.png")
    rgba = colour_image(COLOURS["green"], rng, 40).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    (folder / "sub").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    colour_image(COLOURS["blue"], rng, 40).resize((48, 24)).save(folder / "sub" / "rotated.jpg", exif=exif.tobytes())
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    colour_image(COLOURS["red"], rng, 64).save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="session")
def cli_runs(run_dir: Path, mixed_folder: Path) -> dict[str, subprocess.CompletedProcess]:
    """The CLI runs, at the same time: the mixed folder (with --save_images and --cam_visual), one file,
    and a user error."""
    jobs = {
        "folder": ("predict.py", "--source", mixed_folder, "--save_path", run_dir, "--device", "cpu", "--workers", 1,
                   "--batch_size", 4, "--save_images", "--cam_visual", "--conf_threshold", 0.9),
        "file": ("predict.py", "--source", mixed_folder / "rgb.png", "--save_path", run_dir, "--device", "cpu",
                 "--workers", 0, "--test_tta"),
        "error": ("predict.py", "--source", mixed_folder / "missing", "--save_path", run_dir, "--device", "cpu"),
        # a deployment machine has no timm, grad-cam or matplotlib: predict.py must import without them
        "imports": ("-c", "import sys; sys.modules.update(dict.fromkeys(['timm', 'pytorch_grad_cam', 'matplotlib', 'cv2'])); "
                          "import predict, utils.infer.rows, utils.infer.loader, utils.draw.labels, utils.explain.cam; print('imported')"),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(run, *job) for key, job in jobs.items()}
        return {key: f.result() if key == "error" else ok(f.result()) for key, f in futures.items()}


# ------------------------------------------------------------------------------- the CLI
def test_folder_rows_skipped_and_probabilities(cli_runs: dict[str, Any], mixed_folder: Path, run_dir: Path) -> None:
    proc = cli_runs["folder"]
    folder = predict_folder_of(proc)
    assert folder.parent == run_dir / "predict"
    rows = read_rows(folder)
    assert sorted(Path(r["path"]).relative_to(mixed_folder).as_posix() for r in rows) == sorted(VALID)
    skipped = {Path(r["path"]).name: r["reason"] for r in read_rows(folder, "skipped.csv")}
    assert set(skipped) == set(JUNK)
    for name, word in JUNK.items():
        assert word in skipped[name], skipped
    classes = list(COLOURS)
    for row in rows:
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]  # 3 classes: the top-k is the whole distribution
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert probs == sorted(probs, reverse=True)
        assert {row[f"top{k}_class"] for k in (1, 2, 3)} == set(classes)
        assert row["class"] == row["top1_class"] and float(row["prob"]) == float(row["top1_prob"])
        assert row["uncertain"] == str(int(float(row["prob"]) < 0.9))
        entropy = -sum(p * np.log(p) for p in probs if p > 0)
        assert float(row["entropy"]) == pytest.approx(entropy, abs=1e-4)
    assert "predicted classes" in proc.stdout and "6 images predicted" in proc.stdout
    assert "3 skipped" in proc.stdout


def test_top1_matches_a_direct_forward_pass(cli_runs: dict[str, Any], run_dir: Path) -> None:
    rows = read_rows(predict_folder_of(cli_runs["folder"]))
    ckpt = load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(ckpt)
    spec = ckpt.meta.preprocess
    x = torch.stack([eval_transform(spec)(load_image(r["path"], spec.channels)) for r in rows])
    with torch.no_grad():
        probs = (model(Normalize(spec.mean, spec.std)(x)) / torch.tensor(ckpt.meta.temperature or [1.0])).softmax(dim=1)
    for row, p in zip(rows, probs):
        assert row["class"] == ckpt.meta.class_names[int(p.argmax())]
        assert float(row["prob"]) == pytest.approx(float(p.max()), abs=1e-4)


def test_save_images_and_cam_write_one_png_per_image(cli_runs: dict[str, Any], mixed_folder: Path) -> None:
    folder = predict_folder_of(cli_runs["folder"])
    images = sorted(p.relative_to(folder / "images").as_posix() for p in (folder / "images").rglob("*") if p.is_file())
    assert images == sorted(VALID)  # png and jpg keep their names; sub-folders are mirrored
    cams = sorted(p.relative_to(folder / "cam").as_posix() for p in (folder / "cam").rglob("*.png"))
    assert cams == sorted(["rgb.png", "gray.png", "palette.png", "rgba.png", "deep16.png", "sub/rotated.jpg.png"])
    panel = Image.open(folder / "cam" / "rgb.png")
    assert panel.size == (3 * 224, 224)
    drawn = Image.open(folder / "images" / "sub" / "rotated.jpg")
    assert drawn.height > drawn.width  # EXIF orientation applied (24x48 stored as 48x24 + rotate tag)
    assert "GradCAM on layer" in cli_runs["folder"].stdout


def test_single_file_with_tta(cli_runs: dict[str, Any], mixed_folder: Path, run_dir: Path) -> None:
    folder = predict_folder_of(cli_runs["file"])
    rows = read_rows(folder)
    assert [r["path"] for r in rows] == [str(mixed_folder / "rgb.png")]
    assert read_rows(folder, "skipped.csv") == []
    # two runs never share a predict folder
    assert folder != predict_folder_of(cli_runs["folder"]) and folder.parent == run_dir / "predict"


def test_predict_imports_without_training_packages(cli_runs: dict[str, Any]) -> None:
    assert cli_runs["imports"].stdout.strip() == "imported"


def test_user_error_is_one_line(cli_runs: dict[str, Any]) -> None:
    proc = cli_runs["error"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no such file or folder" in errors[0]


def test_urls_and_hf_sources_are_refused_naming_what_predict_reads(tmp_path: Path) -> None:
    """--source of a URL or an hf: dataset is not 'no such file': one line saying what predict.py reads
    (checked before any model is loaded, so an empty run folder will do)."""
    for source in ("https://example.com/cat.jpg", "hf:data/digits/test"):
        assert_user_error(run_inprocess("predict.py", "--source", source, "--save_path", tmp_path, "--device", "cpu"),
                          f"--source {source}: predict.py reads image files, folders, globs, list files and local tar "
                          "shards, not URLs or hf: datasets", "metrice.py scores a labelled hf: split")


# ----------------------------------------------------------------- in-process, same run
def predict_main(*argv: Any) -> Path:
    import predict

    return predict.main(predict.parse_args([str(a) for a in argv]))


def test_glob_and_ensemble(run_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    single = read_rows(predict_main("--source", str(mixed_folder / "*.png"), "--save_path", run_dir, "--device", "cpu",
                                    "--workers", 0))
    # the glob matches the top-level PNGs only; the empty one is skipped at decode time
    assert sorted(Path(r["path"]).name for r in single) == ["deep16.png", "gray.png", "palette.png", "rgb.png", "rgba.png"]
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("best.pt", "args.yaml"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    for method in ("mean", "vote"):
        ens = read_rows(predict_main("--source", str(mixed_folder / "*.png"), "--save_path", run_dir, other,
                                     "--ensemble", method, "--device", "cpu", "--workers", 0))
        assert [r["class"] for r in ens] == [r["class"] for r in single]  # two copies of one model agree with it
        for row in ens:
            assert sum(float(row[f"top{k}_prob"]) for k in (1, 2, 3)) == pytest.approx(1.0, abs=1e-4)


def test_two_streams_write_what_one_stream_writes(run_dir: Path, mixed_folder: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--streams 2 (two batches at once, utils/infer/streams.py) gives the same files, byte for byte, as
    one batch at a time: every row in file order with its own image's probabilities, the undecodable
    files skipped in order (batches of one: some hold no image at all). The forward passes ran in both
    streams' threads."""
    import predict

    threads: dict[str, set[str]] = {}
    forward = predict.predict_maybe_rejecting

    def watched(*args: Any) -> Any:
        threads[mode].add(threading.current_thread().name)
        time.sleep(0.01)  # long enough for the other stream to take a batch meanwhile
        return forward(*args)

    monkeypatch.setattr(predict, "predict_maybe_rejecting", watched)
    argv = ["--source", mixed_folder, "--save_path", run_dir, "--device", "cpu", "--workers", 0, "--batch_size", 1]
    mode = "one"
    threads[mode] = set()
    one = predict_main(*argv, "--streams", 1)
    assert "streams of" not in capsys.readouterr().out and threads["one"] == {threading.current_thread().name}
    mode = "two"
    threads[mode] = set()
    two = predict_main(*argv, "--streams", 2)
    assert "2 streams of 1 compute thread each" in capsys.readouterr().out and threads["two"] == {"stream-0", "stream-1"}
    for name in ("predictions.csv", "skipped.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert len(read_rows(two)) == len(VALID) and not (two / "incomplete.txt").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--streams", "2", "--cam_visual"], "--streams 2: --cam_visual runs one batch at a time"),
    (["--streams", "-1"], "--streams must be 0 or more"),
    (["--cam_visual", "--cam_class", "rde"], "did you mean red"),
    (["--cam_visual", "--cam_layer", "layer9"], "did you mean"),
    (["--cam_layer", "layer3"], "only applies with --cam_visual"),
    (["--batch_size", "0"], "--batch_size"),
    (["--ensemble", "vote", "--ensemble_weights", "1"], "--ensemble weighted"),
])
def test_user_errors(run_dir: Path, mixed_folder: Path, argv: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        predict_main("--source", mixed_folder / "rgb.png", "--save_path", run_dir, "--device", "cpu", "--workers", 0, *argv)


def test_cam_class_explains_the_named_class(run_dir: Path, mixed_folder: Path) -> None:
    common = ("--source", mixed_folder / "rgb.png", "--save_path", run_dir, "--device", "cpu", "--workers", 0,
              "--cam_visual", "--cam_layer", "layer2", "--cam_type", "GradCAM")
    own = predict_main(*common)
    predicted = read_rows(own)[0]["class"]
    other = next(name for name in sorted(COLOURS) if name != predicted)
    named = predict_main(*common, "--cam_class", other)
    assert [p.name for p in (named / "cam").iterdir()] == ["rgb.png"]
    # the middle third of the panel is the heatmap overlay: another class, another map
    overlays = [np.asarray(Image.open(folder / "cam" / "rgb.png").convert("RGB"), dtype=np.int16)[:, 224:448]
                for folder in (own, named)]
    assert np.abs(overlays[0] - overlays[1]).mean() > 5
    # and by value: the map of the named class is not the map of the predicted one
    backend = load_backend(run_dir, device="cpu")
    spec = backend.meta.preprocess
    x = backend.normalize(eval_transform(spec)(load_image(mixed_folder / "rgb.png", 3))[None])
    names = list(backend.meta.class_names)
    maps = [cam_maps(backend.model, x, "layer2", "GradCAM", [names.index(c)], on_degenerate="ignore")[0]
            for c in (predicted, other)]
    assert np.abs(maps[0] - maps[1]).mean() > 0.05


def handmade_run(folder: Path, channels: int, size: int) -> Path:
    """A run folder whose best.pt holds an untrained resnet10t of the same classes (no training needed)."""
    from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
    from utils.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("resnet10t", len(COLOURS), channels)
    spec = PreprocessSpec.create(size, channels, [0.5] * channels, [0.25] * channels)
    meta = ModelMeta("resnet10t", tuple(sorted(COLOURS)), spec)  # main.py sorts the class folders
    folder.mkdir(parents=True)
    torch.save(Checkpoint("best", meta, model.state_dict(), epoch=1).to_dict(), folder / "best.pt")
    return folder


def test_grayscale_model_with_tta_and_cam(mixed_folder: Path, tmp_path: Path) -> None:
    gray = handmade_run(tmp_path / "gray", channels=1, size=48)
    folder = predict_main("--source", mixed_folder, "--save_path", gray, "--device", "cpu", "--workers", 0, "--test_tta",
                          "--cam_visual", "--save_images")
    assert len(read_rows(folder)) == len(VALID)
    assert len(list((folder / "cam").rglob("*.png"))) == len(VALID)  # the CAM explains the centre view of the TTA
    assert Image.open(folder / "cam" / "gray.png").size == (3 * 224, 224)


def test_ensemble_of_different_input_sizes_and_channels(run_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    gray = handmade_run(tmp_path / "gray", channels=1, size=48)
    rows = read_rows(predict_main("--source", mixed_folder, "--save_path", run_dir, gray, "--device", "cpu", "--workers", 0,
                                  "--ensemble", "weighted", "--ensemble_weights", 1, 0))
    single = read_rows(predict_main("--source", mixed_folder, "--save_path", run_dir, "--device", "cpu", "--workers", 0))
    assert len(rows) == len(VALID)
    for ens, one in zip(rows, single):  # weight 0 for the second model: the first one's probabilities
        assert ens["class"] == one["class"] and float(ens["prob"]) == pytest.approx(float(one["prob"]), abs=1e-5)
    with pytest.raises(UserError, match="other classes"):
        other = tmp_path / "other"
        other.mkdir()
        ckpt = torch.load(gray / "best.pt", weights_only=True)
        torch.save(ckpt | {"class_names": ["a", "b", "c"]}, other / "best.pt")
        predict_main("--source", mixed_folder, "--save_path", run_dir, other, "--device", "cpu", "--workers", 0)



def constant_run(folder: Path, probs: list[float]) -> Path:
    """A run whose model gives the same probabilities (over blue, green, red) for every image:
    resnet10t with a zero classifier weight and log(probs) as its bias."""
    handmade_run(folder, channels=3, size=32)
    ckpt = torch.load(folder / "best.pt", weights_only=True)
    ckpt["model"]["fc.weight"] = torch.zeros_like(ckpt["model"]["fc.weight"])
    ckpt["model"]["fc.bias"] = torch.tensor(probs).log()
    torch.save(ckpt, folder / "best.pt")
    return folder


def ensemble_rows(mixed_folder: Path, runs: list[Path], *extra: Any) -> list[dict[str, str]]:
    return read_rows(predict_main("--source", mixed_folder / "rgb.png", "--save_path", *runs, "--device", "cpu",
                                  "--workers", 0, *extra))


def distribution(row: dict[str, str]) -> dict[str, float]:
    return {row[f"top{k}_class"]: float(row[f"top{k}_prob"]) for k in (1, 2, 3)}


def test_ensembles_of_models_that_disagree(mixed_folder: Path, tmp_path: Path) -> None:
    confident = constant_run(tmp_path / "confident", [0.9, 0.05, 0.05])  # blue
    unsure = [constant_run(tmp_path / f"unsure{i}", [0.3, 0.4, 0.3]) for i in (1, 2)]  # green, twice
    assert distribution(ensemble_rows(mixed_folder, [confident])[0]) == pytest.approx({"blue": 0.9, "green": 0.05, "red": 0.05}, abs=1e-5)
    three = [confident, *unsure]

    mean = ensemble_rows(mixed_folder, three, "--ensemble", "mean")[0]
    assert mean["class"] == "blue"  # the confident model outweighs the two others on average
    assert distribution(mean) == pytest.approx({"blue": 0.5, "green": 0.85 / 3, "red": 0.65 / 3}, abs=1e-5)

    vote = ensemble_rows(mixed_folder, three, "--ensemble", "vote")[0]
    assert vote["class"] == "green"  # two votes of three
    shares = distribution(vote)
    assert shares["green"] == pytest.approx(2 / 3, abs=1 / 12) and shares["blue"] == pytest.approx(1 / 3, abs=1 / 12)
    assert shares["red"] < 1 / 12

    # weights 3 : 1 : 0, normalised: (3 * confident + unsure) / 4
    for weights in (["3", "1", "0"], ["0.6", "0.2", "0"]):
        weighted = ensemble_rows(mixed_folder, three, "--ensemble", "weighted", "--ensemble_weights", *weights)[0]
        assert distribution(weighted) == pytest.approx({"blue": 0.75, "green": 0.1375, "red": 0.1125}, abs=1e-5)


def test_vote_tie_is_broken_by_the_mean(mixed_folder: Path, tmp_path: Path) -> None:
    sure_blue = constant_run(tmp_path / "blue", [0.7, 0.2, 0.1])
    green = constant_run(tmp_path / "green", [0.05, 0.6, 0.35])
    # one vote each; the mean is blue 0.375, green 0.4: green wins, not the more confident model's blue
    vote = ensemble_rows(mixed_folder, [sure_blue, green], "--ensemble", "vote")[0]
    assert vote["class"] == "green" and vote["top2_class"] == "blue" and vote["top3_class"] == "red"
    assert float(vote["top1_prob"]) == pytest.approx(0.5, abs=1 / 6) and float(vote["top3_prob"]) < 1 / 6


# ---------------------------------------------------------------------- library level
def test_full_distribution_sums_to_one(run_dir: Path, mixed_folder: Path) -> None:
    ensemble = load_ensemble([run_dir], device="cpu")
    images = [Image.open(mixed_folder / name) for name in ("rgb.png", "gray.png", "palette.png", "rgba.png", "deep16.png")]
    probs = predict_pil(ensemble, images)  # any PIL mode in, converted as the training side does; numpy out
    assert probs.shape == (5, 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    tta = predict_pil(ensemble, images, tta=True)
    assert np.allclose(tta.sum(axis=1), 1.0, atol=1e-5)
    rows = prediction_rows(["a", "b", "c", "d", "e"], probs, ensemble.class_names, conf_threshold=1.0)
    assert all(r.uncertain for r in rows) and [r.index for r in rows] == probs.argmax(axis=1).tolist()


def test_find_images(mixed_folder: Path, tmp_path: Path) -> None:
    found = find_images(mixed_folder)
    assert sorted(p.relative_to(mixed_folder).as_posix() for p in found.files) == sorted(VALID + ["empty.png", "truncated.jpg"])
    assert [Path(p).name for p, _ in found.skipped] == ["notes.txt"]
    single = find_images(mixed_folder / "notes.txt")
    assert single.files == [] and "not an image file" in single.skipped[0][1]
    assert [p.name for p in find_images(str(mixed_folder / "**" / "*.jpg")).files] == ["rotated.jpg", "truncated.jpg"]
    with pytest.raises(UserError, match="matches no file"):
        find_images(str(tmp_path / "*.png"))


@pytest.fixture(scope="module")
def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=3).eval()


@pytest.mark.parametrize("cam_type", CAM_TYPES)
def test_every_cam_type_on_a_tiny_cnn(tiny_cnn: torch.nn.Module, cam_type: str) -> None:
    layer = find_cam_layer(tiny_cnn, 32, 3)
    assert layer.name == "layer3" and layer.layout == "NCHW"  # layer4 is 1x1 at 32 px: the last stage with a grid
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = int(tiny_cnn(x).argmax())  # an untrained model: other classes may have no positive evidence
    # raw: as grad-cam returns it, before cam_maps replaces NaN and clips; a degenerate map raises
    raw = cam_maps(tiny_cnn, x, layer, cam_type, [predicted], batch_size=128, raw=True, on_degenerate="raise")
    assert raw.shape == (1, 32, 32) and raw.dtype == np.float32
    assert np.isfinite(raw).all() and raw.max() - raw.min() > 0.5
    maps = cam_maps(tiny_cnn, x, layer, cam_type, [predicted], batch_size=128)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert all(p.requires_grad for p in tiny_cnn.parameters())  # flags restored


def test_cam_under_inference_mode(tiny_cnn: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = cam_maps(tiny_cnn, x, "layer3", "GradCAM", [0, 1])
    with torch.inference_mode():  # a server's request handler
        maps = cam_maps(tiny_cnn, x, None, "GradCAM", [0, 1])
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert maps.max() > maps.min()


def test_cam_layer_by_name_and_unknown(tiny_cnn: torch.nn.Module) -> None:
    assert find_cam_layer(tiny_cnn, 64, 3).name == "layer4"
    layer = find_cam_layer(tiny_cnn, 32, 3, name="layer2.0")
    assert layer.name == "layer2.0" and layer.shape[1:] == (128, 4, 4)
    with pytest.raises(UserError, match="layer4"):
        find_cam_layer(tiny_cnn, 32, 3, name="layer44")
    with pytest.raises(UserError, match="image-shaped"):
        find_cam_layer(tiny_cnn, 32, 3, name="fc")


def test_gradcam_on_a_tiny_vit() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3).eval()
    size = model.pretrained_cfg["input_size"][-1]  # test_vit is built for 160 px
    layer = find_cam_layer(model, size, 3)
    assert layer.layout == "tokens" and layer.name == f"blocks.{len(model.blocks) - 1}.norm1"
    assert isinstance(layer.reshape_transform, TokensToNCHW) and layer.reshape_transform.prefix == model.num_prefix_tokens
    maps = cam_maps(model, torch.randn(2, 3, size, size), layer, "GradCAM", [0, 1])
    assert maps.shape == (2, size, size) and np.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1
    assert maps.max() > maps.min()  # the patch tokens get gradients: the map is not flat


def test_gradcam_on_a_channels_last_swin() -> None:
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                            num_classes=3).eval()
    layer = find_cam_layer(model, 32, 3)
    assert layer.layout == "NHWC" and isinstance(layer.reshape_transform, NHWCToNCHW)
    maps = cam_maps(model, torch.randn(1, 3, 32, 32), layer, "GradCAM", [1])
    assert maps.shape == (1, 32, 32) and np.isfinite(maps).all()
    panel = cam_panel(torch.zeros(3, 32, 32, dtype=torch.uint8), maps[0], ["red (0.90)"], size=64)
    assert panel.size == (192, 64)


def test_outputs_of_a_list_that_climbs_out_never_land_on_a_source_image(run_dir: Path, tmp_path: Path) -> None:
    """A list's `../x.png` rows: the drawn copies stay inside the predict folder (named after the file),
    and the source images are left byte for byte as they were."""
    import hashlib

    from utils.infer.sources import relative_name

    assert relative_name(tmp_path / "lists" / ".." / "img" / "a.png", tmp_path / "lists") == Path("a.png")
    assert relative_name(tmp_path / "lists" / "sub" / "a.png", tmp_path / "lists") == Path("sub/a.png")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for k, colour in enumerate(COLOURS.values()):
        colour_image(colour, rng).save(images / f"{k}.png")
    before = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in images.iterdir()}
    lists = tmp_path / "deep" / "lists"
    lists.mkdir(parents=True)
    (lists / "source.txt").write_text("".join(f"../../images/{k}.png\n" for k in range(len(COLOURS))))
    folder = predict_main("--source", lists / "source.txt", "--save_path", run_dir, "--device", "cpu", "--workers", 0,
                          "--save_images")
    try:
        assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in images.iterdir()} == before
        drawn = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        assert drawn == [f"images/{k}.png" for k in range(len(COLOURS))]
    finally:
        shutil.rmtree(folder.parent)
