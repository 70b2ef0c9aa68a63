"""Training throughput on this machine: the limit, the model step, the data pipeline, and main.py end to end.

    python benchmarks/train_throughput.py                          # resnet18 at 32 and 64 px
    python benchmarks/train_throughput.py --compare /path/to/other/checkout   # its main.py side by side
    python benchmarks/train_throughput.py --sizes 64 --epochs 8 --model_name resnet34
    python benchmarks/train_throughput.py --epochs 10 --timm_train ../pytorch-image-models/train.py  # timm beside it
    python benchmarks/train_throughput.py --data photos --sizes 64 --timm_train ../pytorch-image-models/train.py
    python benchmarks/train_throughput.py --device 0 --sizes 224 --model_name resnet50 --batch_size 128 \
        --epochs 8 --main_args "--amp --channels_last"                # a GPU: resnet50 at 224 px with AMP
    make bench

For each --sizes value it prints one PrettyTable row (per checkout) of training images/second:

  limit      the same work as an epoch of main.py on tensors already in memory, in one process:
             a training step (forward, label-smoothed cross-entropy, backward, AdamW step -- main.py's
             defaults) over every training image in batches, then a no-grad forward over every
             validation image. --limit_epochs timed epochs after one untimed one; the median.
  (a) step   the training steps of the limit alone (no validation).
  (b) data   the data pipeline alone: the DataLoader main.py builds (utils.data.loaders.ImageDataset +
             train_transform + EpochSampler + build_loader, with the utils.data.image_cache that its
             --cache_images builds: auto unless --main_args says otherwise), iterated without a
             model, epochs 2..N.
  (c) main   main.py itself, in a subprocess, with everything in: validation every epoch,
             best.pt/last.pt every epoch, train.log, TensorBoard, plots. Its cost per epoch is
             (wall of an N-epoch run - wall of a 2-epoch run) / (N - 2), so start-up cancels;
             images/second = training images / that cost.
  (c)/limit  how much of the limit main.py reaches. The limit is measured before the first row
             and again after each row; a row is divided by the mean of the two around it (the
             "limit drift" column is how far they differ: a shared machine's speed drifts).

--timm_train runs timm's own train.py the same way, as one more row: same split, model, image
size, batch, epochs, --workers and device, and main.py's optimizer (AdamW, lr 1e-3, weight decay
5e-4, label smoothing 0.1); timm's own recipe otherwise. It validates every epoch and keeps its
checkpoints too; its images/second count the images it trains on (it drops the last partial batch).

It also prints where main.py's epoch time goes (its "time per epoch:" line: train, val,
checkpoints, logs and plots, and the share of the fixed costs: checkpoints, logs and plots) and
the wall time of its 2-epoch run; with --timm_train, one line per size of main.py against timm's
train.py and the limit. The data (--data) is scikit-learn's digits (1,797 8x8 images; 1,079 train
/ 359 val / 359 test), or photos: 720 photos-like JPEGs of 256-500 px a side in 4 classes
(gradients, soft shapes, blur and noise, generated from seed 0 by ensure_photos; 432 train / 144
val / 144 test), where decoding and resizing weigh as with real photos and the epochs are short,
so per-epoch fixed costs show. Either is split by processing.py into --cache_dir; main.py gets no
test split. Everything runs on --device (the CPU by default, with
PyTorch's default thread count) with main.py's default --workers there. --main_args go to every
main.py run; of them, --amp and --channels_last apply to the limit as well (autocast float16 with a
gradient scaler on CUDA, bfloat16 on the CPU; NHWC weights and batches), --compile does not.

Compare figures only within one run of this script: the machine may be shared. The "other load"
column says how many cores other processes kept busy (from /proc/stat): above ~0.1 a row is
unreliable.
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
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.core.device import default_workers, gpu_workers

TIMING = re.compile(r"time per epoch: (.*)")


class OtherLoad:
    """How many cores other processes kept busy while a measurement ran (Linux /proc/stat; else None).

    Busy time of the whole machine minus the CPU time of this process and of its waited-for children,
    divided by the wall time.
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
    parser = argparse.ArgumentParser(description="Images/second of the limit, the training step, the data pipeline and "
                                                 "main.py.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--data", default="digits", choices=["digits", "photos"], help="digits: scikit-learn's 8x8 digits (1,079 train "
      "images); photos: 432 train images of 256-500 px, photos-like, generated (see ensure_photos)")
    p("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes (--image_size of main.py)")
    p("--model_name", default="resnet18", help="model (as main.py's --model_name)")
    p("--batch_size", type=int, default=64, help="images per step")
    p("--workers", type=int, default=None, help="main.py's --workers (default: main.py's own default on --device)")
    p("--epochs", type=int, default=6, help="epochs of the long main.py run (the short one has 2)")
    p("--limit_epochs", type=int, default=2, help="timed epochs of the in-memory limit")
    p("--compare", nargs="*", default=[], help="other checkouts whose main.py runs beside this one's")
    p("--timm_train", default=None, metavar="TRAIN_PY", help="timm's train.py (from a pytorch-image-models checkout): "
      "run beside main.py on the same split, model, size, batch, workers and device")
    p("--cache_dir", default=str(ROOT / "benchmarks" / ".cache"), help="where the digits sample and the runs go")
    p("--skip", nargs="*", default=[], choices=["limit", "data", "main"], help="leave these measurements out")
    p("--device", default="cpu", help="cpu, or a CUDA device index such as 0, for the limit and main.py")
    p("--main_args", default="", help="more main.py flags for every run (e.g. '--amp --channels_last --compile')")
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


PHOTO_CLASSES = ("blobs", "bars", "rings", "speckle")  # what tells the classes of the photos-like set apart
PHOTOS_PER_CLASS = 180  # 720 images: processing.py's 60/20/20 split gives 432 train, 144 val, 144 test


def photo_image(rng: Any, cls: int) -> Any:
    """One photos-like JPEG-able image of class `cls`: 256-500 px a side, a smooth colour gradient, soft
    shapes of the class's kind, blur and sensor noise (what a camera gives, not flat synthetic tiles)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = (int(v) for v in rng.integers(256, 501, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(30, 220, size=(2, 3))
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h)
    pixels = c0 + (c1 - c0) * (t[..., None] - t.min()) / (np.ptp(t) + 1e-6)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(12, max(13, min(w, h) // 4)))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if cls == 0:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif cls == 1:
            draw.rectangle([x - r // 4, 0, x + r // 4, h], fill=colour)
        elif cls == 2:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=max(2, r // 5))
        else:
            for _ in range(40):
                px, py = x + int(rng.integers(-r, r + 1)), y + int(rng.integers(-r, r + 1))
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), size=(h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def ensure_photos(cache_dir: Path) -> Path:
    """The photos-like set under cache_dir (PHOTOS_PER_CLASS JPEGs per class of PHOTO_CLASSES, generated
    from seed 0, then split by processing.py); returns the split folder."""
    import numpy as np

    split = cache_dir / "photos_split"
    if (split / "train").is_dir() and (split / "label.txt").is_file():
        return split
    raw = cache_dir / "photos"
    rng = np.random.default_rng(0)
    for cls, name in enumerate(PHOTO_CLASSES):
        (raw / name).mkdir(parents=True, exist_ok=True)
        for i in range(PHOTOS_PER_CLASS):
            photo_image(rng, cls).save(raw / name / f"{name}_{i:04d}.jpg", quality=90)
    cmd = [sys.executable, str(ROOT / "processing.py"), "--data_path", str(raw), "--output_path", str(split), "--force"]
    print("splitting the photos-like set:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 or not (split / "train").is_dir():
        sys.exit(f"error: processing.py failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return split


# ------------------------------------------------------------------------------ measurements
def limit_throughput(model_name: str, size: int, batch_size: int, num_classes: int, n_train: int, n_val: int,
                     epochs: int, device: str = "cpu", amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """The limit and (a): an epoch of training steps over n_train in-memory images, then a no-grad
    forward over n_val, one untimed epoch first; images/s from the median epoch. On a GPU the
    tensors are on the GPU already; with `amp`, main.py's autocast (and gradient scaler on CUDA)."""
    import contextlib

    import torch

    from utils.models.registry import create_model
    from utils.train.losses import build_loss
    from utils.train.optim import build_optimizer

    dev = torch.device("cpu" if device == "cpu" else f"cuda:{device}" if device.isdigit() else device)
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(model_name, num_classes, 3).to(dev, memory_format=memory)
    optimizer = build_optimizer(model, "AdamW", 1e-3, 5e-4, 0.9)       # main.py's defaults
    criterion = build_loss("CrossEntropyLoss", 0.1, None)
    train_x = torch.randn(n_train, 3, size, size, device=dev).contiguous(memory_format=memory)
    train_y = torch.randint(0, num_classes, (n_train,), device=dev)
    val_x = torch.randn(n_val, 3, size, size, device=dev).contiguous(memory_format=memory)
    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if amp and dev.type == "cuda" else None

    def autocast() -> Any:
        return torch.autocast(dev.type, dtype=dtype) if amp else contextlib.nullcontext()

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    steps, epochs_s = [], []
    for epoch in range(epochs + 1):
        model.train()
        t0 = now()
        for start in range(0, n_train - (n_train % batch_size == 1), batch_size):
            with autocast():
                loss = criterion(model(train_x[start:start + batch_size]).float(), train_y[start:start + batch_size])
            loss.item()
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        t1 = now()
        model.eval()
        with torch.inference_mode(), autocast():
            for start in range(0, n_val, batch_size):
                model(val_x[start:start + batch_size]).float().softmax(1)
        t2 = now()
        if epoch:
            steps.append(t1 - t0)
            epochs_s.append(t2 - t0)
    return {"limit": n_train / statistics.median(epochs_s), "step": n_train / statistics.median(steps)}


def data_throughput(samples: Sequence[tuple[str, int]], size: int, batch_size: int, workers: int, epochs: int,
                    cache_mode: str = "auto") -> float:
    """(b) images/s of main.py's training DataLoader alone, over epochs 2..N (epoch 1 starts the workers),
    with the image cache main.py builds for `cache_mode` (its --cache_images)."""
    from utils.data.image_cache import ImageCache, cache_budget
    from utils.data.loaders import EpochSampler, ImageDataset, build_loader
    from utils.data.transforms import train_transform

    transform = train_transform(size)
    cache = ImageCache.build([path for path, _ in samples], 3, transform, cache_mode, cache_budget(cache_mode, 1, workers),
                             workers, "training images")
    sampler = EpochSampler(len(samples), shuffle=True, seed=0)
    loader = build_loader(ImageDataset(samples, transform, 3, seed=0, cache=cache), batch_size, sampler, workers,
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


def run_main(checkout: Path, split: Path, size: int, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """One main.py run of a checkout; its wall time and its 'time per epoch' line."""
    runs = Path(tempfile.mkdtemp(prefix=f"run_{size}px_", dir=args.cache_dir))
    cmd = [sys.executable, str(checkout / "main.py"), "--model_name", args.model_name, "--image_size", str(size),
           "--batch_size", str(args.batch_size), "--epoch", str(epochs), "--workers", str(args.workers),
           "--train_path", str(split / "train"), "--label_path", str(split / "label.txt"),
           "--val_path", str(split / "val"), "--test_path", str(runs / "no_test"),
           "--save_path", str(runs / "exp"), "--patience", "0", "--device", args.device, *args.main_args.split()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    shutil.rmtree(runs, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"error: main.py of {checkout} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n"
                 f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    timing = TIMING.search(proc.stdout)
    return {"wall": wall, "timing": timing.group(1) if timing else ""}


def run_timm(script: Path, split: Path, size: int, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of timm's train.py (from a pytorch-image-models checkout) on the same split, model,
    size, batch, loader workers and device as main.py; its wall time."""
    runs = Path(tempfile.mkdtemp(prefix=f"timm_{size}px_", dir=args.cache_dir))
    extra = args.main_args.split()
    device = "cpu" if args.device == "cpu" else f"cuda:{args.device}"
    cmd = [sys.executable, str(script), "--data-dir", str(split), "--train-split", "train", "--val-split", "val",
           "--model", args.model_name, "--img-size", str(size), "--num-classes", str(args.num_classes),
           "-b", str(args.batch_size), "--epochs", str(epochs), "-j", str(args.workers), "--device", device,
           "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "5e-4", "--smoothing", "0.1",  # main.py's defaults
           "--output", str(runs), "--log-interval", "100000", *(["--no-prefetcher"] if device == "cpu" else []),
           *(["--amp"] if "--amp" in extra else []), *(["--channels-last"] if "--channels_last" in extra else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=script.parent, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(runs, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"error: {script} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-1500:]}")
    return {"wall": wall, "timing": ""}


def main_throughput(checkout: Path, split: Path, size: int, n_train: int, args: argparse.Namespace) -> dict[str, Any]:
    """(c) images/s of main.py (or of timm's train.py, when `checkout` is that file) from the wall
    times of a 2-epoch and an N-epoch run."""
    run = run_timm if checkout.is_file() else run_main
    short = run(checkout, split, size, 2, args)
    long = run(checkout, split, size, args.epochs, args)
    per_epoch = (long["wall"] - short["wall"]) / (args.epochs - 2)
    if checkout.is_file():  # timm's loader drops the last partial batch: it trains on fewer images an epoch
        n_train = n_train // args.batch_size * args.batch_size
    return {"main": n_train / per_epoch, "per_epoch": per_epoch, "wall2": short["wall"], "timing": long["timing"]}


def fixed_share(timing: str) -> float | None:
    """The share of main.py's epoch (its 'time per epoch' line) that its checkpoints, logs and plots took."""
    parts = {name: float(sec) for name, sec in re.findall(r"([a-z ]+?) ([\d.]+)s \(", timing)}
    total = sum(parts.values())
    fixed = sum(v for k, v in parts.items() if k.strip() in ("checkpoints", "logs and plots"))
    return fixed / total if total else None


def print_against_timm(rows: list[dict[str, Any]]) -> None:
    """One line per size with a timm train.py row: this checkout's main.py against timm and the limit, same run."""
    for size in dict.fromkeys(r["size"] for r in rows):
        ours = next((r for r in rows if r["size"] == size and Path(r["checkout"]) == ROOT and r.get("main")), None)
        timm = next((r for r in rows if r["size"] == size and Path(r["checkout"]).is_file() and r.get("main")), None)
        if ours is None or timm is None:
            continue
        print(f"{size} px: main.py {ours['main']:.1f} img/s, timm train.py {timm['main']:.1f} img/s, limit "
              f"{ours['limit'] or 0:.1f} img/s: main.py / timm {ours['main'] / timm['main']:.2f}, main.py / limit "
              f"{ours['ratio'] or 0:.2f}, timm / limit {timm['ratio'] or 0:.2f}", flush=True)


# ------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure and print the table; returns its rows as dicts."""
    import torch
    from prettytable import PrettyTable

    from utils.data.sources import scan_split

    if args.epochs < 3:
        sys.exit("error: --epochs must be at least 3 (the per-epoch cost is the difference with a 2-epoch run)")
    args.cache_dir = str(Path(args.cache_dir).resolve())
    if args.workers is None:  # what main.py picks on that device
        args.workers = default_workers() if args.device == "cpu" else gpu_workers()
    split = ensure_photos(Path(args.cache_dir)) if args.data == "photos" else ensure_digits(Path(args.cache_dir))
    train_set = scan_split(split / "train", label_path=split / "label.txt", what="train set")
    n_val = len(scan_split(split / "val", class_names=train_set.class_names).samples)
    n_train = len(train_set.samples)
    args.num_classes = len(train_set.class_names)
    checkouts = [ROOT, *[Path(c).resolve() for c in args.compare]]
    if args.timm_train:
        checkouts.append(Path(args.timm_train).resolve())
    print(f"{args.model_name}, batch {args.batch_size}, {n_train} train / {n_val} val images, main.py --workers "
          f"{args.workers} --device {args.device} {args.main_args}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        probe = OtherLoad()
        extra = args.main_args.split()

        def measure_limit() -> dict[str, float | None]:
            if "limit" in args.skip:
                return {"limit": None, "step": None}
            return limit_throughput(args.model_name, size, args.batch_size, len(train_set.class_names), n_train, n_val,
                                    args.limit_epochs, args.device, "--amp" in extra, "--channels_last" in extra)

        before = measure_limit()
        cache_mode = extra[extra.index("--cache_images") + 1] if "--cache_images" in extra[:-1] else "auto"
        data = (data_throughput(train_set.samples, size, args.batch_size, args.workers, 3, cache_mode)
                if "data" not in args.skip else None)
        for checkout in checkouts:
            run = main_throughput(checkout, split, size, n_train, args) if "main" not in args.skip else {}
            # the limit again after the row's runs: a shared machine's speed drifts over minutes, so
            # each row is compared with the mean of the limits measured just before and just after it
            after = measure_limit() if run else before
            limit = {k: (before[k] + after[k]) / 2 if before[k] and after[k] else None for k in ("limit", "step")}
            row = {"size": size, "checkout": str(checkout), **limit, "limit_spread": (
                abs(before["limit"] - after["limit"]) / limit["limit"] if limit["limit"] else None), "data": data, **run}
            row["ratio"] = row["main"] / row["limit"] if run and limit["limit"] else None
            row["other_load"] = probe.cores()
            rows.append(row)
            print(f"{size} px {checkout}: {row}", flush=True)
            before = after

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "-" if value is None else format(value, spec)

    table = PrettyTable(["size", "checkout", "limit", "(a) step", "(b) data", "(c) main.py", "(c)/limit",
                         "2-epoch wall s", "limit drift", "other load"])
    table.title = f"{args.model_name} training images/s, batch {args.batch_size}, {args.data}"
    for r in rows:
        name = Path(r["checkout"]).name if Path(r["checkout"]).is_dir() else "timm train.py"
        table.add_row([f"{r['size']} px", name, fmt(r["limit"]), fmt(r["step"]), fmt(r["data"]),
                       fmt(r.get("main")), fmt(r["ratio"], ".2f"), fmt(r.get("wall2")),
                       "-" if r["limit_spread"] is None else f"{r['limit_spread']:.0%}", fmt(r["other_load"], ".2f")])
    table.align = "r"
    print(table, flush=True)
    for r in rows:
        if r.get("timing"):
            share = fixed_share(r["timing"])
            print(f"{r['size']} px {Path(r['checkout']).name}: main.py time per epoch: {r['timing']}"
                  + (f"; fixed costs (checkpoints, logs and plots) {share:.1%} of the epoch" if share is not None else ""),
                  flush=True)
    print_against_timm(rows)
    if any((r["other_load"] or 0) > 0.1 for r in rows):
        print("warning: other processes kept cores busy during the measurements ('other load'): rerun on an idle machine",
              flush=True)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
