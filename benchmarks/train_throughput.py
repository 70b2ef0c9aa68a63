"""Training throughput on this machine: the model step, the data pipeline, and main.py end to end.

    python benchmarks/train_throughput.py                          # resnet18 at 32 and 64 px, main.py's --workers
    python benchmarks/train_throughput.py --workers 0 1 2          # one row per worker count
    python benchmarks/train_throughput.py --sizes 64 --epochs 4 --model_name resnet34
    make bench

For each --sizes value (and each --workers value) it prints one PrettyTable row with images/second of:

  (a) step   the training step alone: forward + loss + backward + optimizer step (main.py's defaults:
             AdamW, label-smoothed cross-entropy) on a batch already in memory; --warmup_steps
             untimed steps, then the median of --steps timed ones.
  (b) data   the data pipeline alone: the DataLoader main.py builds (utils.data.ImageDataset +
             train_transform + EpochSampler + build_loader, same --workers), iterated without a model.
             One untimed epoch starts the workers; then --epochs - 1 epochs are timed.
  (c) main   main.py itself, in a subprocess, on the digits sample (train only: --val_path and
             --test_path name folders that do not exist). Images/second come from the per-epoch
             seconds main.py prints in its epoch table titles ("epoch 2/3  lr ...  8.3s"), over
             epochs 2..N: epoch 1 is left out (worker start-up, train_batch*.png plotting). Those
             seconds cover the training loop only, not the checkpoint saving and curve plotting
             main.py does between epochs; the "(c) incl. saves" column adds those: it divides the
             images of epochs 2..N by the time between the moments epoch 1's and epoch N's titles
             were printed.
  (c)/(a)    how much of the bare model speed main.py reaches.

Everything runs on the CPU (main.py gets --device cpu), with PyTorch's default thread count.

The digits sample (scikit-learn's 1,797 8x8 images, 10 classes; 1,079 train images) is written
into --cache_dir by processing.py the first time (`--sample digits --force`); runs of main.py go
into a temporary folder there and are deleted afterwards. --cache_dir defaults to
benchmarks/.cache (git-ignored).

Timings are only meaningful on an otherwise idle machine. The "other load" column says how many
cores other processes kept busy during the row's measurements (worst of (a), (b), (c); from
/proc/stat, Linux only): above ~0.1 the row is unreliable, and a warning says so. On 2 cores a
second busy process slows a 2-thread training step far more than 2x (the compute threads wait
for each other at every parallel region). Even idle, a small VM's figures move by 10-15% from run
to run (main.py prints epoch seconds to 0.1 s, too): compare worker counts over repeated runs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.device import default_workers  # noqa: E402  (main.py's --workers default)

EPOCH_TITLE = re.compile(r"epoch (\d+)/(\d+)\s+lr \S+\s+([0-9.]+)s")


class OtherLoad:
    """How many cores other processes kept busy while a measurement ran (Linux /proc/stat; else None).

    Busy time of the whole machine minus the CPU time of this process and of its waited-for children
    (main.py and its loader workers, the DataLoader workers of (b)), divided by the wall time.
    """

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(v) for v in fields]
        busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system (idle iowait) irq softirq steal
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def cores(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / wall) if wall > 0 else None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Images/second of the training step, the data pipeline and main.py.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes (--image_size of main.py)")
    p("--model_name", default="resnet18", help="model (as main.py's --model_name)")
    p("--batch_size", type=int, default=64, help="images per step")
    p("--workers", type=int, nargs="+", default=[default_workers()],
      help="data loader processes, one row per value (the default is main.py's default on this machine)")
    p("--epochs", type=int, default=3, help="epochs of main.py (c) and of the loader (b); the first is not timed")
    p("--steps", type=int, default=10, help="timed training steps of (a)")
    p("--warmup_steps", type=int, default=3, help="untimed training steps of (a)")
    p("--cache_dir", default=str(ROOT / "benchmarks" / ".cache"), help="where the digits sample and the runs go")
    p("--skip", nargs="*", default=[], choices=["step", "data", "main"], help="leave these measurements out")
    p("--keep_runs", action="store_true", help="keep main.py's run folders (and print their paths)")
    return parser


# ------------------------------------------------------------------------------------ data
def ensure_digits(cache_dir: Path) -> Path:
    """The digits split under cache_dir (written by processing.py if missing); returns the split folder."""
    split = cache_dir / "split"
    if (split / "train").is_dir() and (split / "label.txt").is_file():
        return split
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "processing.py"), "--sample", "digits", "--data_path", str(cache_dir / "digits"),
           "--output_path", str(split), "--force"]
    print("writing the digits sample:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 or not (split / "train").is_dir():
        sys.exit(f"error: processing.py failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return split


# ------------------------------------------------------------------------------ measurements
def step_throughput(model_name: str, size: int, batch_size: int, num_classes: int, steps: int, warmup: int) -> float:
    """(a) images/s of forward + loss + backward + optimizer step on an in-memory batch (median step)."""
    import torch

    from utils.losses import build_loss
    from utils.optim import build_optimizer
    from utils.registry import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes, 3)
    model.train()
    optimizer = build_optimizer(model, "AdamW", 1e-3, 5e-4, 0.9)       # main.py's defaults
    criterion = build_loss("CrossEntropyLoss", 0.1, None)
    images = torch.randn(batch_size, 3, size, size)
    targets = torch.randint(0, num_classes, (batch_size,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = criterion(model(images), targets)
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def data_throughput(samples: Sequence[tuple[str, int]], size: int, batch_size: int, workers: int, epochs: int) -> float:
    """(b) images/s of main.py's training DataLoader alone, over epochs 2..N (epoch 1 starts the workers)."""
    from utils.data import EpochSampler, ImageDataset, build_loader, train_transform

    sampler = EpochSampler(len(samples), shuffle=True, seed=0)
    loader = build_loader(ImageDataset(samples, train_transform(size), 3, seed=0), batch_size, sampler, workers,
                          False, drop_last=len(samples) % batch_size == 1)
    images, seconds = 0, 0.0
    for epoch in range(max(2, epochs)):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch["targets"]) for batch in loader)
        if epoch > 0:
            images += n
            seconds += time.perf_counter() - t0
    del loader  # stops persistent workers
    return images / seconds


def main_throughput(split: Path, size: int, args: argparse.Namespace, workers: int, train_images: int) -> dict[str, Any]:
    """(c) run main.py on the digits train split; images/s from its epoch-title seconds (epochs 2..N)."""
    runs = Path(tempfile.mkdtemp(prefix=f"run_{size}px_w{workers}_", dir=args.cache_dir))
    cmd = [sys.executable, str(ROOT / "main.py"), "--model_name", args.model_name, "--image_size", str(size),
           "--batch_size", str(args.batch_size), "--epoch", str(args.epochs), "--workers", str(workers),
           "--train_path", str(split / "train"), "--label_path", str(split / "label.txt"),
           "--val_path", str(runs / "no_val"), "--test_path", str(runs / "no_test"),
           "--save_path", str(runs / "exp"), "--patience", "0", "--device", "cpu"]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    # stderr (tqdm bars, log lines) goes to a thread so the pipe never fills.
    err_chunks: list[str] = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    seconds: dict[int, float] = {}
    printed_at: dict[int, float] = {}
    out_lines = []
    try:
        for line in proc.stdout:
            out_lines.append(line)
            m = EPOCH_TITLE.search(line)
            if m:
                epoch = int(m.group(1))
                seconds[epoch] = float(m.group(3))
                printed_at[epoch] = time.perf_counter()
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave main.py training on its own
            proc.terminate()
            proc.wait()
    reader.join()
    wall = time.perf_counter() - t_start
    if not args.keep_runs:
        shutil.rmtree(runs, ignore_errors=True)
    else:
        print(f"kept main.py run folder: {runs}", flush=True)
    timed = [e for e in sorted(seconds) if e > 1]
    if proc.returncode != 0 or not timed:
        tail = "".join(out_lines)[-1500:] + "".join(err_chunks)[-1500:]
        sys.exit(f"error: main.py failed (exit {proc.returncode}) or printed no epoch times:\n{' '.join(cmd)}\n{tail}")
    loop = len(timed) * train_images / sum(seconds[e] for e in timed)
    with_saves = len(timed) * train_images / (printed_at[timed[-1]] - printed_at[1])
    return {"loop": loop, "with_saves": with_saves, "epoch_seconds": [seconds[e] for e in sorted(seconds)], "wall": wall}


# ------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure and print the table; returns its rows as dicts."""
    import torch
    from prettytable import PrettyTable

    from utils.images import scan_split

    if args.epochs < 2:
        sys.exit("error: --epochs must be at least 2 (the first epoch is not timed)")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if min(args.sizes) < 1 or min(args.workers) < 0 or args.warmup_steps < 0:
        sys.exit("error: --sizes must be positive, --workers and --warmup_steps 0 or more")
    workers_list = args.workers
    args.cache_dir = str(Path(args.cache_dir).resolve())
    split = ensure_digits(Path(args.cache_dir))
    train_set = scan_split(split / "train", label_path=split / "label.txt", what="train set")
    n_train = len(train_set.samples)
    drop = n_train % args.batch_size == 1
    n_epoch_images = n_train - (n_train % args.batch_size if drop else 0)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    probe = OtherLoad()
    time.sleep(1.0)
    idle = probe.cores()
    print(f"{args.model_name}, batch {args.batch_size}, {n_train} train images, {args.epochs} epochs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} compute threads, {cpus} CPUs"
          + (f"; other processes busy on {idle:.2f} cores" if idle is not None else ""), flush=True)

    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        step = step_load = None
        if "step" not in args.skip:
            probe = OtherLoad()
            step = step_throughput(args.model_name, size, args.batch_size, len(train_set.class_names), args.steps,
                                   args.warmup_steps)
            step_load = probe.cores()
            print(f"{size} px  (a) step: {step:.1f} img/s", flush=True)
        for workers in workers_list:
            data = main_run = None
            loads = [step_load]
            if "data" not in args.skip:
                probe = OtherLoad()
                data = data_throughput(train_set.samples, size, args.batch_size, workers, args.epochs)
                loads.append(probe.cores())
                print(f"{size} px, {workers} workers  (b) data: {data:.1f} img/s", flush=True)
            if "main" not in args.skip:
                probe = OtherLoad()
                main_run = main_throughput(split, size, args, workers, n_epoch_images)
                loads.append(probe.cores())
                print(f"{size} px, {workers} workers  (c) main.py: {main_run['loop']:.1f} img/s  (epoch seconds "
                      f"{main_run['epoch_seconds']}, wall {main_run['wall']:.1f}s)", flush=True)
            known = [v for v in loads if v is not None]
            rows.append({"size": size, "workers": workers, "step": step, "data": data,
                         "main": main_run["loop"] if main_run else None,
                         "main_with_saves": main_run["with_saves"] if main_run else None,
                         "ratio": main_run["loop"] / step if main_run and step else None,
                         "other_load": max(known) if known else None})

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "-" if value is None else format(value, spec)

    table = PrettyTable(["image size", "workers", "(a) step img/s", "(b) data img/s", "(c) main.py img/s",
                         "(c) incl. saves img/s", "(c)/(a)", "other load"])
    table.title = f"{args.model_name} training throughput, batch {args.batch_size}, {torch.get_num_threads()} threads"
    for r in rows:
        table.add_row([f"{r['size']} px", r["workers"], fmt(r["step"]), fmt(r["data"]), fmt(r["main"]),
                       fmt(r["main_with_saves"]), fmt(r["ratio"], ".0%"), fmt(r["other_load"], ".2f")])
    table.align = "r"
    print(table, flush=True)
    busy = [r for r in rows if (r["other_load"] or 0) > 0.1]
    if busy:
        print(f"warning: other processes kept up to {max(r['other_load'] for r in busy):.2f} cores busy during "
              f"{len(busy)} row(s) ('other load'): those figures are too low; rerun on an idle machine", flush=True)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
