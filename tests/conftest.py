"""Shared fixtures and helpers: tiny generated images, the scripts run in subprocesses, shared runs.

Every script is run the way a user runs it (`python main.py ...` from the repository root) in a
subprocess, with one compute thread (tiny models are fastest that way, and several runs can share
a 2-core machine), offline, and with empty model caches of its own. Independent runs are started
two at a time (`run_many`) to keep the suite short.
"""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests import the library (utils, processing) directly

torch.set_num_threads(1)  # the in-process tests use tiny tensors; threads only add overhead

TINY_MODEL = "resnet10t"
TINY_CLASSES = ["blue", "green", "red"]  # already in natural order
TRAIN_LOG_HEADER = ["epoch", "lr", "loss", "acc", "mean_acc", "test_loss", "test_acc", "test_mean_acc"]
# Distinct colours: a tiny model separates them within an epoch or two.
PALETTE = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20), (160, 40, 200), (20, 200, 200), (240, 120, 20)]
MULTILABEL_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220), "yellow": (230, 200, 20)}

pytest_plugins = ["system_deps"]  # tests/system_deps.py: with REQUIRE_SYSTEM_DEPS=1 (CI) a system_deps test may not skip

# Set once per session by the `_session_env` fixture: what every subprocess gets on top of os.environ.
SUBPROCESS_ENV: dict[str, str] = {}


# ---------------------------------------------------------------------------- subprocesses
# main.py run as `python main.py ...` (runpy, as __main__), with one addition: an optimizer-step hook
# that sends the process SIGTERM right after the given step, so the signal lands at a known step
# whatever the machine's speed.
_SIGTERM_AFTER_STEP = """
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
after, script = int(sys.argv.pop(1)), sys.argv[1]
steps = 0
def hook(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == after:
        os.kill(os.getpid(), signal.SIGTERM)
register_optimizer_step_post_hook(hook)
sys.argv.pop(0)
runpy.run_path(script, run_name="__main__")
"""


def run_main_stopped_after(step: int, args: Sequence[Any]) -> subprocess.CompletedProcess:
    """Run main.py with `args` and SIGTERM it right after optimizer step `step` (counted from 1)."""
    cmd = [sys.executable, "-c", _SIGTERM_AFTER_STEP, str(step), str(REPO / "main.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=600)


# main.py as `python main.py` runs it (alone, or as torchrun's script), with what a test records or
# triggers:
# - RECORD_DIR: the process appends to RECORD_DIR/rank<RANK>.jsonl every training image it loads
#   ({"read": [epoch, index]}), and whenever an epoch's metrics are computed, its own sums before
#   they are added up over the processes ({"loss_sum", "count", "correct"}; multi-label: the "probs"
#   and "targets" rows the metrics come from) with the "metrics";
# - STOP_AFTER_STEP: right after that optimizer step (counted from 1 in the process), rank 0 sends
#   STOP_SIGNAL (default SIGTERM) to itself, or with STOP_TARGET=torchrun to its parent, torchrun.
RECORDING_MAIN = """
import json, os, runpy, signal, sys, time
script = sys.argv.pop(1)
sys.argv[0] = script
sys.path.insert(0, os.path.dirname(script))  # as `python main.py` would
rank = os.environ.get("RANK", "0")
if os.environ.get("RECORD_DIR"):
    from utils.data.loaders import ImageDataset
    from utils.evaluate.metrics import EpochSums, MultiLabelSums
    record = open(os.path.join(os.environ["RECORD_DIR"], f"rank{rank}.jsonl"), "a", buffering=1)
    get_item, metrics, multilabel_metrics = ImageDataset.__getitem__, EpochSums.metrics, MultiLabelSums.metrics
    def recorded_get_item(self, key):
        if self.seed is not None:  # the training set (evaluation and the mean/std pass have no seed)
            record.write(json.dumps({"read": list(key)}) + "\\n")
        return get_item(self, key)
    def recorded_metrics(self):
        result = metrics(self)
        record.write(json.dumps({"loss_sum": self.loss_sum, "count": self.count,
                                 "correct": int(self.confusion.trace()), "metrics": result}) + "\\n")
        return result
    def recorded_multilabel_metrics(self):
        result = multilabel_metrics(self)
        probs, targets, _, _ = self.arrays()
        record.write(json.dumps({"probs": probs.tolist(), "targets": targets.tolist(), "metrics": result}) + "\\n")
        return result
    ImageDataset.__getitem__, EpochSums.metrics = recorded_get_item, recorded_metrics
    MultiLabelSums.metrics = recorded_multilabel_metrics
if os.environ.get("STOP_AFTER_STEP"):
    from torch.optim.optimizer import register_optimizer_step_post_hook
    after, steps = int(os.environ["STOP_AFTER_STEP"]), [0]
    sig = getattr(signal, os.environ.get("STOP_SIGNAL", "SIGTERM"))
    def hook(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == after and rank == "0":
            if os.environ.get("STOP_TARGET") == "torchrun":
                os.kill(os.getppid(), sig)
                time.sleep(1)  # torchrun passes SIGTERM on to every process before this one polls for it
            else:
                os.kill(os.getpid(), sig)
    register_optimizer_step_post_hook(hook)
runpy.run_path(script, run_name="__main__")
"""


def recording_main(folder: Path) -> Path:
    """RECORDING_MAIN written into `folder` (the script to run instead of main.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recording_main.py"
    path.write_text(RECORDING_MAIN)
    return path


def run_recorded(record_dir: Path, *args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python main.py args...` in a subprocess, recording what it reads and sums into record_dir (RECORDING_MAIN)."""
    record_dir.mkdir(parents=True, exist_ok=True)
    return run_script(str(recording_main(record_dir)), REPO / "main.py", *args,
                      env={"RECORD_DIR": str(record_dir)} | (env or {}))


def records(folder: Path) -> dict[int, list[dict[str, Any]]]:
    """What each process of a recorded run wrote (RECORDING_MAIN's RECORD_DIR): rank -> its lines, in order."""
    import json

    return {int(f.stem[4:]): [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted(folder.glob("rank*.jsonl"))}


def reads(lines: list[dict[str, Any]], epoch: int) -> list[int]:
    """The training images (indices) a recorded process read in a 0-based epoch, in order."""
    return [r["read"][1] for r in lines if "read" in r and r["read"][0] == epoch]


def run_script(script: str, *args: Any, env: dict[str, str] | None = None, timeout: float = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repository root; returns the finished process."""
    full_env = dict(os.environ) | SUBPROCESS_ENV | (env or {})
    cmd = [sys.executable, str(REPO / script), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_many(jobs: Sequence[dict[str, Any]], workers: int = 2) -> list[subprocess.CompletedProcess]:
    """Run several run_script(**job) at once (each job: {"script", "args", optional "env", "timeout"})."""
    def one(job: dict[str, Any]) -> subprocess.CompletedProcess:
        return run_script(job["script"], *job.get("args", ()), env=job.get("env"), timeout=job.get("timeout", 600))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))


def run_inprocess(script: str, *args: Any) -> subprocess.CompletedProcess:
    """Run a script's command line in this process: `run_cli(main, parse_args, args)` of the module
    `script` (main.py, predict.py ...), with stdout and stderr captured and the exit code returned as
    the process would return it (argparse's own exit too). For error paths and short runs that would
    otherwise pay seconds of imports in a subprocess."""
    import contextlib
    import importlib
    import io

    from utils.core.log import run_cli

    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_cli(module.main, module.parse_args, argv)
        except SystemExit as exc:  # argparse: --help, or a bad flag
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            import logging

            logging.getLogger().handlers.clear()  # run_cli's handler writes to the captured stderr
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


class _TrainingWouldStart(Exception):
    """Raised where main.py would start training (built_trainer)."""


def built_trainer(monkeypatch: pytest.MonkeyPatch, *args: Any) -> Any:
    """main.py's command line run in this process up to the start of training: the Trainer it built
    from those flags (its model before any step, optimizer, schedule, loaders ...); nothing is trained."""
    from utils.train.trainer import Trainer

    built: list[Any] = []

    def stop_at_fit(self: Any) -> None:
        built.append(self)
        raise _TrainingWouldStart

    monkeypatch.setattr(Trainer, "fit", stop_at_fit)
    try:
        proc = run_inprocess("main.py", *args)
    except _TrainingWouldStart:
        return built[0]
    pytest.fail(f"main.py ended before it would train:\n{describe(proc)}")


def describe(proc: subprocess.CompletedProcess) -> str:
    """The tail of a finished process's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one stderr line starting 'error:' that holds every needle.

    Returns:
        The error line.
    """
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, describe(proc)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def train_args(data: Path | None, save_path: Path, *extra: Any, model: str = TINY_MODEL) -> list[str]:
    """main.py arguments for a tiny CPU run. Every path is explicit, so nothing in the repository's
    dataset/ or runs/ is read or written; `extra` comes last and wins (argparse keeps the last value)."""
    args = ["--model_name", model, "--image_size", "32", "--workers", "0", "--batch_size", "8", "--epoch", "1",
            "--device", "cpu", "--save_path", save_path]
    if data is not None:
        args += ["--train_path", data / "train", "--val_path", data / "val", "--test_path", data / "test",
                 "--label_path", data / "label.txt"]
    return [str(a) for a in [*args, *extra]]


# ------------------------------------------------------------------------------ tiny images
def class_image(class_index: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    """An RGB image of one class: its palette colour, a class-specific stripe pattern, some noise."""
    base = np.array(PALETTE[class_index % len(PALETTE)], dtype=np.float64)
    img = np.tile(base, (size, size, 1))
    period = 3 + class_index  # stripes differ per class, so even a colour-blind model could tell
    img[:, ::period] *= 0.6
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_class_folders(root: Path, counts: dict[str, int], seed: int = 0, size: int = 24, ext: str = ".png",
                       colour_of: dict[str, int] | None = None) -> Path:
    """Write root/<class>/<i>.png for each class; returns root. `colour_of` maps class -> palette index."""
    rng = np.random.default_rng(seed)
    for i, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            class_image((colour_of or {}).get(name, i), rng, size).save(folder / f"img{k}{ext}")
    return root


def make_split_dataset(root: Path, classes: Sequence[str], train: int = 8, val: int = 3, test: int = 3, seed: int = 0) -> Path:
    """root/train|val|test/<class>/<images>, each class its own colour in every split."""
    colour_of = {c: i for i, c in enumerate(classes)}
    for k, (split, n) in enumerate((("train", train), ("val", val), ("test", test))):
        if n:
            make_class_folders(root / split, {c: n for c in classes}, seed=seed + k, colour_of=colour_of)
    return root


def make_truncated_jpeg(path: Path, keep: float = 0.5) -> Path:
    """A JPEG with an intact header whose body is cut: it opens, but decoding fails."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def add_junk_files(folder: Path) -> dict[str, str]:
    """Files that must be skipped: {file name: a word the skip reason contains}."""
    class_image(0, np.random.default_rng(0)).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(2).integers(0, 255, 300, dtype=np.uint8).tobytes())
    return {".hidden.png": "hidden", "notes.txt": "not an image file", "empty.png": "empty", "garbage.jpg": "not an image"}


# --------------------------------------------------------------------------------- folders
def write_multilabel_split(root: Path, name: str, n: int, seed: int) -> Path:
    """root/<name>.csv (path,labels) and its 32 px images: 1-3 squares of distinct colours each."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    names = list(MULTILABEL_COLOURS)
    rows = [["path", "labels"]]
    for i in range(n):
        labels = sorted(rng.choice(len(names), rng.integers(1, 4), replace=False))
        img = Image.new("RGB", (32, 32), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        for c in labels:
            x, y = rng.integers(0, 22, 2)
            draw.rectangle([int(x), int(y), int(x) + 9, int(y) + 9], fill=MULTILABEL_COLOURS[names[c]])
        path = root / name / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        rows.append([f"{name}/{i}.png", "|".join(names[c] for c in labels)])
    with (root / f"{name}.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / f"{name}.csv"


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file, link and folder under root: relative path -> (kind/hash, size, mtime_ns)."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                kind = "link:" + os.readlink(path)
            elif path.is_dir():
                kind = "dir"
            else:
                kind = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (kind, st.st_size, st.st_mtime_ns)
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterable[None]:
    """Subprocesses run offline with empty model caches and one compute thread."""
    caches = tmp_path_factory.mktemp("caches")
    os.environ["PYTORCH_CLASSIFIER_CACHE"] = str(caches / "scans")  # in-process scans too: never the user's cache
    SUBPROCESS_ENV.update({
        "PYTORCH_CLASSIFIER_CACHE": str(caches / "scans"),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(caches / "hf"), "TORCH_HOME": str(caches / "torch"),
        "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
    })
    yield
    SUBPROCESS_ENV.clear()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes (blue, green, red) x 8 train / 3 val / 3 test images of 24x24."""
    return make_split_dataset(tmp_path_factory.mktemp("tiny"), TINY_CLASSES)


@dataclass
class TrainedRun:
    path: Path
    proc: subprocess.CompletedProcess
    loss: str
    optimizer: str
    epochs: int


@pytest.fixture(scope="session")
def trained_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three short runs that together use every --loss and every --optimizer.

    The first (2 epochs) goes to runs/exp; then, at the same time, a second with the same
    --save_path (so it must become runs/exp2) and a third elsewhere. The first run folder is
    snapshotted between, to check that the second run did not touch it.
    """
    runs = tmp_path_factory.mktemp("trained") / "runs"
    plan = [("CrossEntropyLoss", "SGD", 2, runs / "exp"), ("FocalLoss", "AdamW", 1, runs / "exp"),
            ("PolyLoss", "RMSProp", 1, runs / "poly")]
    jobs = [{"script": "main.py", "args": train_args(tiny_data, save, "--loss", loss, "--optimizer", opt, "--epoch", epochs)}
            for loss, opt, epochs, save in plan]
    first = run_script(jobs[0]["script"], *jobs[0]["args"])
    assert_ok(first)
    before = snapshot(runs / "exp")
    rest = run_many(jobs[1:])
    for proc in rest:
        assert_ok(proc)
    folders = [runs / "exp", runs / "exp2", runs / "poly"]
    out: dict[str, Any] = {
        loss: TrainedRun(folder, proc, loss, opt, epochs)
        for (loss, opt, epochs, _), folder, proc in zip(plan, folders, [first, *rest])
    }
    out["first_before"] = before
    out["first_after"] = snapshot(runs / "exp")
    return out


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A multi-label run (list files of 1-3 coloured squares per image, 6 epochs, thresholds tuned
    on val), recorded by run_recorded: {"root", "lists": {split: list file}, "run", "proc", "records"}.
    test_multilabel checks it (the records: what the epochs scored); the serve tests serve it."""
    root = tmp_path_factory.mktemp("multilabel")
    lists = {name: write_multilabel_split(root, name, n, seed) for name, n, seed in
             (("train", 96, 0), ("val", 32, 1), ("test", 32, 2))}
    run = root / "run"
    proc = run_recorded(root / "records", "--model_name", "resnet10t", "--image_size", "32", "--workers", "0",
                        "--batch_size", "16", "--epoch", "6", "--lr", "0.003", "--device", "cpu", "--train_path", lists["train"],
                        "--val_path", lists["val"], "--test_path", lists["test"], "--save_path", run, "--mixup", "mixup")
    return {"root": root, "lists": lists, "run": run, "proc": proc, "records": root / "records"}


@pytest.fixture(scope="session")
def trained_run(trained_runs: dict[str, Any]) -> TrainedRun:
    """The 2-epoch CrossEntropyLoss + SGD run."""
    return trained_runs["CrossEntropyLoss"]
