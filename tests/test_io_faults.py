"""Faults of the files and of the process, started for real; each ends in one line and a known exit
code, and nothing is lost.

- A model's metadata edited (ONNX metadata_props, the JSON beside a file, OpenVINO rt_info) to ask
  for 60000-pixel images or one channel of a 3-channel model: predict.py and metrice.py refuse it
  in one line naming the file and the field, under a 4 GB address-space limit (a 60000-pixel image
  alone is 10.8 GB, so a run that tried would fail loudly instead of swapping the machine).
- A tmpfs that fills while main.py saves last.pt: one line naming the folder and the space
  needed; the checkpoints are the ones from before.
- A read-only bind mount under main.py, predict.py, export.py, metrice.py and metrice.py --task
  features: one line each, before any work.
- SIGTERM (and SIGKILL) to a real predict.py mid-run: whole rows, the folder marked incomplete,
  the files left listed.

Mounting needs root (CAP_SYS_ADMIN); where it is not allowed those tests are skipped, saying so
(CI runs as root). Every mount is undone in a finally. The run is conftest's trained_run (copied,
never written), exported once here.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from conftest import (REPO, SUBPROCESS_ENV, TrainedRun, assert_ok, assert_user_error, describe, run_inprocess,
                      run_script, train_args)
from utils.core.checkpoint import load_checkpoint

MEMORY_LIMIT = 4 << 30  # address space of the scripts run on edited metadata (a normal run needs under 2 GB)
# A script run as `python script.py ...` with its address space limited (runpy, as __main__).
_LIMITED = """
import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TEMP_NAME = re.compile(r"^\..*\.tmp-\d+-")  # utils.core.files' temporaries


def run_limited(script: str, *args: Any) -> subprocess.CompletedProcess:
    """run_script with the address space limited to MEMORY_LIMIT."""
    cmd = [sys.executable, "-c", _LIMITED, str(MEMORY_LIMIT), str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=300)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ mounts
def _mount(*args: Any) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=60)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=60).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)  # busy: detach it anyway


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip, saying why, where this machine does not let the tests mount (not root, no CAP_SYS_ADMIN)."""
    probe = tmp_path_factory.mktemp("mount_probe")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("the mount and umount commands are missing here: the disk-fault tests mount a tmpfs and a bind mount")
    proc = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", probe)
    if proc.returncode != 0:
        pytest.skip(f"mounting is not allowed here (uid {os.geteuid()}; needs root / CAP_SYS_ADMIN, as CI has): "
                    f"{(proc.stderr or proc.stdout).strip()[:200]}")
    _umount(probe)


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted on `path` (a small disk that really fills)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    assert proc.returncode == 0, describe(proc)
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(source: Path, target: Path) -> Iterator[Path]:
    """`source` seen read-only at `target` (a bind mount remounted ro)."""
    target.mkdir(parents=True, exist_ok=True)
    proc = _mount("--bind", source, target)
    assert proc.returncode == 0, describe(proc)
    try:
        proc = _mount("-o", "remount,bind,ro", target)
        assert proc.returncode == 0, describe(proc)
        yield target
    finally:
        _umount(target)


def copy_run(run: Path, dest: Path, names: tuple[str, ...] | None = None) -> Path:
    """The files (not the folders) of a run folder copied to `dest`; `names` only, if given."""
    dest.mkdir(parents=True)
    for file in run.iterdir():
        if file.is_file() and not TEMP_NAME.match(file.name) and (names is None or file.name in names):
            shutil.copy2(file, dest / file.name)
    return dest


# ------------------------------------------------------------------- 8: edited metadata
@pytest.fixture(scope="module")
def exported(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trained_run in ONNX and OpenVINO (best.onnx, best.xml and their JSON), outside its run folder."""
    out = tmp_path_factory.mktemp("io_export")
    assert_ok(run_script("export.py", "--save_path", trained_run.path, "--export", "onnx", "openvino", "--device", "cpu",
                         "--output_path", out))
    return out


def edit_onnx(exported: Path, dest: Path, change: dict[str, Any], embedded: bool) -> Path:
    """best.onnx with `change` in its preprocess: in metadata_props (embedded), or with no metadata
    inside and the change in the JSON beside it."""
    import onnx

    dest.mkdir()
    model = onnx.load(str(exported / "best.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    info = json.loads((exported / "best.onnx.json").read_text())
    info["preprocess"].update(change)
    del model.metadata_props[:]
    if embedded:
        onnx.helper.set_model_props(model, props | {"pytorch_classifier_ng": json.dumps(info)})
    onnx.save(model, str(dest / "best.onnx"))
    (dest / "best.onnx.json").write_text(json.dumps(info))
    return dest / "best.onnx"


def edit_openvino(exported: Path, dest: Path, crop: int) -> Path:
    """best.xml (+ .bin) whose rt_info asks for another crop."""
    dest.mkdir()
    shutil.copy2(exported / "best.bin", dest / "best.bin")
    text = (exported / "best.xml").read_text(encoding="utf-8")
    edited = text.replace("&quot;crop&quot;: 32,", f"&quot;crop&quot;: {crop},")
    assert edited != text
    (dest / "best.xml").write_text(edited, encoding="utf-8")
    return dest / "best.xml"


EDITS = {  # name -> (make the edited model, what the one line names)
    "onnx embedded crop 60000": (lambda e, d: edit_onnx(e, d, {"crop": 60000}, True),
                                 ["best.onnx (embedded metadata)", "'crop' must be an integer from 1 to 4096, not 60000"]),
    "onnx embedded channels 1": (lambda e, d: edit_onnx(e, d, {"channels": 1, "mean": [0.5], "std": [0.25]}, True),
                                 ["best.onnx (embedded metadata)", "'channels' is 1 but the model's input has 3 channels"]),
    "onnx json crop 60000": (lambda e, d: edit_onnx(e, d, {"crop": 60000, "resize": 60000}, False),
                             ["best.onnx.json", "'resize' must be an integer from 1 to 4096, not 60000"]),
    "openvino embedded crop 64": (lambda e, d: edit_openvino(e, d, 64),
                                  ["best.xml (embedded metadata)", "'crop' is 64 but the model's input is 32x32"]),
}


def one_image(run: TrainedRun, name: str) -> Path:
    """A test image of class `name` of the run's data (its args.yaml names the split)."""
    import yaml

    test = Path(yaml.safe_load((run.path / "args.yaml").read_text())["test_path"])
    return sorted((test / name).glob("*.png"))[0]


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_metadata_is_refused_in_one_line_by_predict_and_metrice(edit: str, exported: Path, trained_run: TrainedRun,
                                                                       tmp_path: Path) -> None:
    make, needles = EDITS[edit]
    model = make(exported, tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("blue", "red"):
        shutil.copy2(one_image(trained_run, name), images / f"{name}.png")
    with ThreadPoolExecutor(max_workers=2) as pool:  # metrice.py evaluates the run's test split (its args.yaml)
        predict = pool.submit(run_limited, "predict.py", "--source", images, "--weight", model, "--device", "cpu")
        metrice = pool.submit(run_limited, "metrice.py", "--weight", model, "--device", "cpu")
    for proc in (predict.result(), metrice.result()):
        line = assert_user_error(proc, *needles)
        assert "export the model again" in line or "write it again" in line, line  # and how to mend it
    assert not (model.parent / "predict").exists() and not (model.parent / "test").exists()  # refused before any output


# ------------------------------------------------------------------------ 9: a full disk
def test_a_disk_that_fills_while_main_saves_stops_it_in_one_line_with_the_checkpoints_intact(
        trained_run: TrainedRun, mounts: None, tmp_path: Path) -> None:
    """trained_run resumed for one more epoch on a tmpfs with room for everything but last.pt's
    temporary: one line naming the folder and the space needed, the checkpoints as they were."""
    files = [f for f in trained_run.path.iterdir() if f.is_file() and not TEMP_NAME.match(f.name)]
    room = 12 << 20  # the new best.pt (10 MB) fits, last.pt (40 MB) does not
    with tmpfs(tmp_path / "disk", sum(f.stat().st_size for f in files) + room) as disk:
        run = copy_run(trained_run.path, disk / "exp")
        before = {name: sha256(run / name) for name in ("last.pt", "best.pt")}
        proc = run_script("main.py", "--save_path", run, "--resume", "--epoch", trained_run.epochs + 1)
        line = assert_user_error(proc, "the disk is full: last.pt needs about", f"in {run} and", "MB are free",
                                 f"python main.py --save_path {run} --resume --epoch {trained_run.epochs + 1}")
        assert f"epoch {trained_run.epochs + 1}/{trained_run.epochs + 1}" in proc.stdout, describe(proc)  # it trained
        needed = float(re.search(r"needs about ([\d.]+) MB", line).group(1))
        assert needed >= 0.9 * (run / "last.pt").stat().st_size / 1e6, line  # the size of what did not fit
        assert sha256(run / "last.pt") == before["last.pt"]  # the last epoch's state, to resume from
        ckpt = load_checkpoint(run / "best.pt")  # the old best.pt, or the new one whole
        assert ckpt.epoch in (trained_run.epochs, trained_run.epochs + 1)
        assert load_checkpoint(run / "last.pt").epoch == trained_run.epochs
        assert not [p.name for p in run.iterdir() if TEMP_NAME.match(p.name)]  # the temporary gave its space back
        with (run / "train.log").open(newline="") as fh:
            rows = list(csv.reader(fh))
        assert {len(r) for r in rows} == {len(rows[0])}, rows  # whole rows only


# ------------------------------------------------------------------- 10: a read-only folder
READ_ONLY_CALLS = {  # script -> its arguments, given the read-only run folder and a writable data folder
    "main.py": lambda run, data: train_args(data, run.parent / "new"),
    "predict.py": lambda run, data: ["--source", data / "test", "--save_path", run, "--device", "cpu"],
    "export.py": lambda run, data: ["--save_path", run, "--export", "onnx", "--device", "cpu"],
    "metrice.py": lambda run, data: ["--save_path", run, "--device", "cpu"],
    "metrice.py --task features": lambda run, data: ["--save_path", run, "--device", "cpu", "--task", "features"],
}


@pytest.mark.parametrize("call", list(READ_ONLY_CALLS))
def test_a_read_only_output_folder_is_one_line_before_any_work(call: str, trained_run: TrainedRun, tiny_data: Path,
                                                               mounts: None, tmp_path: Path) -> None:
    source = copy_run(trained_run.path, tmp_path / "source" / "run", ("best.pt", "args.yaml", "label.txt"))
    with read_only(source.parent, tmp_path / "ro") as ro:
        proc = run_inprocess(call.split()[0], *READ_ONLY_CALLS[call](ro / "run", tiny_data))
        line = assert_user_error(proc, "Read-only file system", str(ro))
        assert proc.stdout == "", describe(proc)  # nothing done before: no run folder, no model loaded, no scan
        assert sorted(p.name for p in (ro / "run").iterdir()) == ["args.yaml", "best.pt", "label.txt"]
    assert ("--save_path" in line) and ("pass" in line or "copy" in line), line  # the flag, and what to do


# ------------------------------------------------------------ 12: a loader process killed mid-batch
class DyingDataset:
    """A PredictDataset stand-in whose loader process is killed (SIGKILL, as the out-of-memory killer
    does) the first `times` times it loads the batch starting at `die_at` (marker files count them)."""

    def __init__(self, count: int, die_at: int, times: int, markers: Path) -> None:
        self.files = [f"f{i}.png" for i in range(count)]
        self.die_at, self.times, self.markers = die_at, times, markers

    def __len__(self) -> int:
        return len(self.files)

    def load_batch(self, indices: range) -> dict[str, Any]:
        if indices[0] == self.die_at and len(list(self.markers.iterdir())) < self.times:
            (self.markers / f"death{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return {"inputs": [], "views": None, "indices": list(indices), "failed": []}


@pytest.mark.parametrize("times", [1, 99])
def test_a_loader_process_killed_mid_batch_is_replaced_and_its_batch_loaded_again(times: int, tmp_path: Path) -> None:
    """multiprocessing.Pool waited forever for the batch of a killed loader process (and then for a queue
    lock it held). Now the pool is restarted and the batches not back are asked again: every batch comes
    back once, in order; a batch whose loader dies every time is one clear line (UserError) after 3 deaths."""
    from utils.core.log import UserError
    from utils.infer.loader import RETRIES, PredictionLoader

    dataset = DyingDataset(12, die_at=4, times=times, markers=tmp_path)
    loader = PredictionLoader(dataset, batch_size=2, workers=2)  # type: ignore[arg-type]
    if times == 1:
        assert [b["indices"] for b in loader] == [[i, i + 1] for i in range(0, 12, 2)]
        assert len(list(tmp_path.iterdir())) == 1
        return
    with pytest.raises(UserError, match=f"loader processes died {RETRIES + 1} times loading f4.png ... f5.png"):
        list(loader)
    assert len(list(tmp_path.iterdir())) == RETRIES + 1


# ------------------------------------------------------------------------ 12: a stopped predict.py
def tiny_images(folder: Path, count: int) -> list[Path]:
    """`count` 16x16 PNGs of noise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = [folder / f"img{i:04d}.png" for i in range(count)]
    for file in files:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(file, compress_level=0)
    return files


def read_csv_strictly(path: Path) -> list[list[str]]:
    """Every line of a CSV: whole lines only (each ends with its line break and has the header's fields)."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), text[-200:]
    rows = list(csv.reader(text.splitlines()))
    assert {len(r) for r in rows} == {len(rows[0])}, rows
    return rows


@pytest.mark.parametrize("sig, workers, streams", [("SIGTERM", 0, 1), ("SIGKILL", 0, 1), ("SIGTERM", 2, 1), ("SIGINT", 2, 1),
                                                   ("SIGINT", 0, 2), ("SIGTERM", 2, 2), ("SIGTERM to the group", 2, 1),
                                                   ("SIGTERM to the group", 2, 2)])
def test_a_predict_stopped_mid_run_leaves_whole_rows_and_says_what_is_left(sig: str, workers: int, streams: int,
                                                                          trained_run: TrainedRun, tmp_path: Path) -> None:
    """A real signal to a real predict.py once its first rows are on disk: SIGTERM stops after the
    batch (exit 143) with the folder marked incomplete and the files left listed; even SIGKILL leaves
    whole rows and the marker. With loader processes too: SIGTERM to predict.py, and Ctrl-C (SIGINT to
    the whole process group, loaders included) stop it the same way, loaders and all (they used to
    take the main process's handler, and predict.py waited for them forever). With two streams (two
    batches at once), the batches the streams are running when the signal comes are not written."""
    files = tiny_images(tmp_path / "images", 600)
    model = tmp_path / "model" / "best.pt"
    model.parent.mkdir()
    shutil.copy2(trained_run.path / "best.pt", model)
    folder = model.parent / "predict" / "exp"
    cmd = [sys.executable, str(REPO / "predict.py"), "--source", str(tmp_path / "images"), "--weight", str(model),
           "--device", "cpu", "--batch_size", "2", "--workers", str(workers), "--streams", str(streams)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            csv_file = folder / "predictions.csv"
            if csv_file.is_file() and csv_file.read_text().count("\n") >= 2:  # the header and a first batch
                break
            time.sleep(0.01)
        if sig == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        elif sig == "SIGTERM to the group":
            os.killpg(proc.pid, signal.SIGTERM)  # what systemd's stop does to a service's processes
        else:
            proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if workers:
        time.sleep(0.5)
        assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b"", "loaders left running"
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    rows = read_csv_strictly(folder / "predictions.csv")[1:]
    predicted = [Path(r[0]).name for r in rows]
    assert 0 < len(rows) < len(files), describe(done)  # stopped mid-run
    assert predicted == [f.name for f in files[:len(rows)]]  # in order, each once
    marker = (folder / "incomplete.txt").read_text()
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and "predict.py started writing this folder" in marker
        return
    name = sig.split()[0]  # "SIGTERM to the group": SIGTERM
    assert proc.returncode == 128 + getattr(signal, name), describe(done)
    assert "Traceback" not in err, describe(done)
    line = next(ln for ln in err.splitlines() if ln.startswith(f"stopped by {name}"))
    assert f"after {len(rows)} of {len(files)} files" in line and f"their {len(rows)} rows" in line, line
    assert marker.strip() == line  # the folder says it too
    left = [Path(r[0]) for r in read_csv_strictly(folder / "remaining.csv")[1:]]
    assert [p.name for p in left] == [f.name for f in files[len(rows):]]  # nothing lost, nothing twice
    assert f"--source {folder / 'remaining.csv'}" in line
    assert f"{len(rows)} images predicted" in out, describe(done)  # the usual summary of what was written
