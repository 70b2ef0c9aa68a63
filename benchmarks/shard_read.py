"""Reading images from class folders vs WebDataset tar shards (not a test): scan time and images/s.

    python benchmarks/shard_read.py                          # 100,000 images, workers 0 and 2
    python benchmarks/shard_read.py --images 20000 --workers 0

The images (small JPEGs of 64-128 px, a few hundred bytes each: a gradient and a shape, 10 class
folders) are generated once into --cache (default: the toolkit's cache folder, bench/shard_read/N),
and written once more as shards of 10,000 (utils.data.shard_writer, the format processing.py
--write_shards writes). Then, for each form, in one run:
  scan first    utils.data.sources.scan_split with an empty scan cache (folders: listing and header
                checks; shards: the walk over each shard's tar headers)
  scan cached   the same scan again, from the cache main.py keeps between runs
  read          one epoch through the loader main.py uses (ImageDataset, EpochSampler shuffled,
                build_loader, batch 256), decode and the evaluation transform at 64 px included,
                with 0 and 2 loader processes
Run it alone on the machine: every figure is wall-clock time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = 10


def generate(folder: Path, count: int) -> None:
    """`count` small JPEGs in 10 class folders (skipped when a finished set is there)."""
    done = folder / ".done"
    if done.is_file():
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        size = int(rng.integers(64, 129))
        ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(0, 255, 3)[None, None, :]
        img = Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8))
        box = sorted(rng.integers(0, size, 2).tolist()) + sorted(rng.integers(0, size, 2).tolist())
        ImageDraw.Draw(img).ellipse([box[0], box[2], box[1] + 1, box[3] + 1], fill=tuple(rng.integers(0, 255, 3).tolist()))
        out = folder / "raw" / f"c{i % CLASSES}"
        out.mkdir(parents=True, exist_ok=True)
        img.save(out / f"{i:07d}.jpg", quality=30)
    from utils.data.shard_writer import ShardItem, plan_shards

    raw = folder / "raw"
    items = [ShardItem(p, [int(p.parent.name[1:])], p.relative_to(raw).as_posix()) for p in sorted(raw.glob("*/*.jpg"))]
    plan_shards("train", items, [f"c{i}" for i in range(CLASSES)], 0, (10_000, None)).write(folder / "shards")
    done.write_text("ok\n")


def scan_times(spec: Path, scratch: Path) -> tuple[float, float, list]:
    """(first scan s, cached scan s, samples) with a fresh scan cache under `scratch`."""
    from utils.data import shards
    from utils.data.sources import scan_split

    os.environ["PYTORCH_CLASSIFIER_CACHE"] = str(scratch)
    times = []
    for _ in range(2):
        shards._INDEXES.clear()  # a new process's view: only the on-disk cache
        start = time.perf_counter()
        image_set = scan_split(spec, what="bench")
        times.append(time.perf_counter() - start)
    return times[0], times[1], image_set.samples


def read_rate(samples: list, workers: int) -> float:
    """Images/s of one shuffled epoch through main.py's loader."""
    from utils.core.schema import PreprocessSpec
    from utils.data.loaders import EpochSampler, ImageDataset, build_loader
    from utils.data.transforms import eval_transform

    spec = PreprocessSpec(resize=64, crop=64, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    sampler = EpochSampler(len(samples), True, seed=0)
    sampler.set_epoch(0)
    loader = build_loader(ImageDataset(samples, eval_transform(spec), 3, seed=0), 256, sampler, workers)
    start = time.perf_counter()
    seen = sum(len(batch["targets"]) for batch in loader)
    elapsed = time.perf_counter() - start
    assert seen == len(samples), (seen, len(samples))
    return seen / elapsed


def main() -> None:
    from prettytable import PrettyTable

    from utils.data.scan_cache import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", type=Path, default=None, help="where the images are generated (kept)")
    args = parser.parse_args()
    folder = args.cache or cache_dir() / "bench" / "shard_read" / str(args.images)
    start = time.perf_counter()
    generate(folder, args.images)
    print(f"{args.images} images in {folder} ({time.perf_counter() - start:.0f} s to make or find)", flush=True)
    table = PrettyTable(["form", "scan first s", "scan cached s", *[f"read img/s, workers {w}" for w in args.workers]])
    with tempfile.TemporaryDirectory() as scratch:
        for form, spec in (("class folders", folder / "raw"), ("tar shards", folder / "shards" / "train")):
            first, cached, samples = scan_times(spec, Path(scratch) / form.replace(" ", "_"))
            rates = [read_rate(samples, w) for w in args.workers]
            table.add_row([form, f"{first:.2f}", f"{cached:.2f}", *[f"{r:,.0f}" for r in rates]])
            print(f"{form}: scanned in {first:.2f} s (cached {cached:.2f} s), read at {rates} img/s", flush=True)
    print(table)


if __name__ == "__main__":
    main()
