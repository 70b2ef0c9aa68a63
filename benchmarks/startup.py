"""Start-up costs (not a test): each script's --help, and main.py on a folder of 100,000 images.

    python benchmarks/startup.py                      # --help of each script, then the 100,000-image folder
    python benchmarks/startup.py --images 20000 --skip help

  --help      wall seconds of `python <script>.py --help` (median of --repeat runs).
  big folder  main.py's start-up on --images images (copies of the digits sample, 10 classes):
              the seconds from the command to the "training ..." line (scan, header checks,
              mean/std pass, model; --cache_images off, whose first pass is epoch 1's decoding
              moved forward), and the peak memory (VmHWM) until then, first with an empty
              scan cache and then again with the cache of the first run; main.py is stopped there.
              The scan alone (utils.data.sources.scan_split, in a child process) is timed the same way,
              with its peak memory, and (in a third, traced run) the memory of the Python objects it keeps.
              "of which imports" is a process that only imports what training imports: the floor of
              any start-up; "start-up less imports" is what the data costs.

The folder is written once into --cache_dir (a few seconds per 10,000 images); the scan cache goes
into a temporary folder (PYTORCH_CLASSIFIER_CACHE), so the user's cache is not touched.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import ensure_digits  # noqa: E402

SCRIPTS = ("main.py", "metrice.py", "predict.py", "export.py", "audit.py", "processing.py", "serve.py")
SCAN = """
import resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from utils.data.sources import scan_split
trace = sys.argv[3] == "trace"  # Python objects traced: slower, so timed in a run of its own
if trace:
    tracemalloc.start()
t0 = time.perf_counter()
image_set = scan_split(sys.argv[2], what="train set")
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else 0.0
print(len(image_set.samples), seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak)
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--images", type=int, default=100_000, help="images in the big folder")
    p("--repeat", type=int, default=3, help="runs of each --help")
    p("--cache_dir", default=str(ROOT / "benchmarks" / ".cache"))
    p("--skip", nargs="*", default=[], choices=["help", "scan", "main"])
    return parser


def help_seconds(script: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def big_folder(cache_dir: Path, images: int) -> Path:
    """cache_dir/big<N>/train/<digit>/<k>.png: copies of the digits (real files, not links)."""
    root = cache_dir / f"big{images}"
    train = root / "train"
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    split = ensure_digits(cache_dir)
    sources = sorted((split / "train").rglob("*.png")) + sorted((split / "val").rglob("*.png"))
    blobs = [(p.parent.name, p.read_bytes()) for p in sources]
    for i in range(images):
        digit, data = blobs[i % len(blobs)]
        folder = train / digit
        if i < len(blobs):
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(data)
    (root / ".complete").write_text("")
    return root


def main_startup(root: Path, scan_cache: Path) -> dict[str, float]:
    """Seconds to main.py's 'training' line and the peak memory until then; main.py is then stopped."""
    cmd = [sys.executable, str(ROOT / "main.py"), "--model_name", "resnet18", "--image_size", "32", "--epoch", "1",
           "--train_path", str(root / "train"), "--val_path", str(root / "none"), "--test_path", str(root / "none"),
           "--save_path", str(scan_cache / "runs" / "exp"), "--device", "cpu",
           "--cache_images", "off"]  # the decoded-image cache would decode every image before the line
    env = dict(os.environ, PYTORCH_CLASSIFIER_CACHE=str(scan_cache), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seconds, peak = None, None
    for line in proc.stdout:
        if line.startswith("training "):
            seconds = time.perf_counter() - t0
            status = Path(f"/proc/{proc.pid}/status")
            if status.exists():
                peak = next((int(ln.split()[1]) / 1024 for ln in status.read_text().splitlines() if ln.startswith("VmHWM")), None)
            break
    proc.kill()
    proc.wait()
    if seconds is None:
        sys.exit("error: main.py did not reach training")
    return {"seconds": seconds, "peak_mb": peak}


def import_seconds(repeat: int = 3) -> float:
    """Seconds from the command to the end of the imports of main.py's training (the floor of any
    start-up, whatever the data), read as main_startup reads its line (the process's exit not counted)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import main, utils.train.trainer; print('imported', flush=True)"
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        times.append(time.perf_counter() - t0)
        proc.wait()
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    from prettytable import PrettyTable

    cache_dir = Path(args.cache_dir).resolve()
    if "help" not in args.skip:
        table = PrettyTable(["script", "--help seconds"])
        for script in SCRIPTS:
            table.add_row([script, f"{help_seconds(script, args.repeat):.2f}"])
        print(table, flush=True)
    if "scan" in args.skip and "main" in args.skip:
        return
    root = big_folder(cache_dir, args.images)
    table = PrettyTable(["what", "first (no cache) s", "second (cached) s", "ratio", "peak memory MB (first, second)"])
    table.title = f"{args.images:,} images"
    with tempfile.TemporaryDirectory() as tmp:
        scan_cache = Path(tmp)
        if "scan" not in args.skip:
            runs = []
            for mode in ("time", "time", "trace"):  # first (no cache), cached, cached with tracemalloc
                out = subprocess.run([sys.executable, "-c", SCAN, str(ROOT), str(root / "train"), mode], capture_output=True,
                                     text=True, check=True, env=dict(os.environ, PYTORCH_CLASSIFIER_CACHE=str(scan_cache)))
                runs.append([float(v) for v in out.stdout.split()])
            table.add_row(["scan_split", f"{runs[0][1]:.2f}", f"{runs[1][1]:.2f}", f"{runs[1][1] / runs[0][1]:.2f}",
                           f"{runs[0][2]:.0f}, {runs[1][2]:.0f} (Python objects {runs[2][3]:.0f})"])
            shutil.rmtree(scan_cache / "scan", ignore_errors=True)
        if "main" not in args.skip:
            first, second = main_startup(root, scan_cache), main_startup(root, scan_cache)
            table.add_row(["main.py start-up", f"{first['seconds']:.2f}", f"{second['seconds']:.2f}",
                           f"{second['seconds'] / first['seconds']:.2f}", f"{first['peak_mb']:.0f}, {second['peak_mb']:.0f}"])
            floor = import_seconds()
            table.add_row(["  of which imports", f"{floor:.2f}", f"{floor:.2f}", "", "(torch, timm, torchvision)"])
            table.add_row(["  start-up less imports", f"{first['seconds'] - floor:.2f}", f"{second['seconds'] - floor:.2f}",
                           f"{(second['seconds'] - floor) / (first['seconds'] - floor):.2f}", ""])
    print(table, flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
