"""audit.py's speed (not a test): generated images with planted copies, decoded and hashed, then searched.

    python benchmarks/audit_speed.py                          # 10,000 and 100,000 images
    python benchmarks/audit_speed.py --images 2000 --workers 2 --bktree

For each --images N, N varied images (random ellipses, boxes and lines over noise textures, flat
colours or gradients in any direction, 64-128 px, 4 in 5 JPEG, 1 in 5 PNG, 10 class folders) are
written into a temporary folder, 1 in 100 of them a planted copy of another (JPEG quality 60, half
size, 5% cropped off each border or 20% brighter, in turn). Then, as audit.py does it:
  scan     utils.data.sources.scan_split of the folder
  hash     utils.data.quality.inspect_images: decode, measure, fingerprint (--workers processes)
  search   utils.data.duplicates.duplicate_groups: the multi-index over the pHashes, checks, union-find
  report   findings, findings.csv and report.html
each in seconds and images/second, with the planted copies found and the pairs of distinct images
grouped (false matches). --bktree also times a BK-tree (pure Python) on the same pHashes (1,000
queries, extrapolated to N) against the multi-index. 100,000 images take about 3 minutes to write
and 5 to audit on 2 cores, and about 1 GB of disk.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COPIES = ("jpeg60", "half", "crop5", "bright20")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--images", type=int, nargs="+", default=[10_000, 100_000], help="dataset sizes")
    p("--workers", type=int, default=os.cpu_count() or 1, help="processes that write, decode and hash")
    p("--folder", default=None, help="where the images go (default: a temporary folder, removed after)")
    p("--bktree", action="store_true", help="also time a BK-tree on the same hashes")
    return parser


def synthetic_image(seed: int) -> Image.Image:
    """A varied RGB image of 64-128 px: shapes over a texture, a flat colour or a gradient."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(64, 129, 2))
    kind = rng.integers(0, 3)
    if kind == 0:
        small = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    elif kind == 1:
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        t = (np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5) + 0.5)[..., None]
        img = Image.fromarray(np.clip(t * rng.integers(0, 256, 3) + (1 - t) * rng.integers(0, 256, 3), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(-10, w)), int(rng.integers(-10, h))
        box = [x0, y0, x0 + int(rng.integers(8, w)), y0 + int(rng.integers(8, h))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(2, 8)))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 15), (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def planted_copy(img: Image.Image, how: str) -> Image.Image:
    """A copy of `img` changed as `how` (one of COPIES) says."""
    if how == "jpeg60":
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if how == "half":
        return img.resize((img.width // 2, img.height // 2), Image.BILINEAR)
    if how == "crop5":
        dx, dy = round(img.width * 0.05), round(img.height * 0.05)
        return img.crop((dx, dy, img.width - dx, img.height - dy))
    return ImageEnhance.Brightness(img).enhance(1.2)


def write_one(job: tuple[str, int, int | None, int]) -> None:
    """Image `index` (seed `base` + a planted change when `copy_of` is set) into folder."""
    folder, index, copy_of, seed = job
    img = synthetic_image(seed)
    name = f"{index:06d}"
    if copy_of is not None:
        how = COPIES[index % len(COPIES)]
        img, name = planted_copy(img, how), f"{index:06d}_copy{copy_of:06d}_{how}"
    path = Path(folder) / f"c{index % 10}" / name
    if index % 5 == 0:
        img.save(path.with_suffix(".png"))
    else:
        img.save(path.with_suffix(".jpg"), quality=90)


def write_images(folder: Path, n: int, workers: int) -> int:
    """N images (1 in 100 a planted copy of an earlier one) into folder/c0..c9; returns the copies."""
    for c in range(10):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n):
        copy_of = i - 50 if i % 100 == 99 else None
        jobs.append((str(folder), i, copy_of, 10_000_000 + (copy_of if copy_of is not None else i)))
    if workers > 0:
        with multiprocessing.get_context().Pool(workers) as pool:
            pool.map(write_one, jobs, chunksize=256)
    else:
        for job in jobs:
            write_one(job)
    return sum(1 for _, _, c, _ in jobs if c is not None)


def base_of(path: str) -> int:
    """The generated image a file shows: its own number, or the one it is a copy of."""
    stem = Path(path).stem
    return int(stem.split("_copy")[1].split("_")[0]) if "_copy" in stem else int(stem[:6])


def bktree_seconds(codes: np.ndarray, queries: np.ndarray, radius: int, sample: int = 1000) -> tuple[float, float]:
    """(build seconds, search seconds extrapolated from `sample` queries to all) of a pure-Python BK-tree."""
    start = time.perf_counter()
    items = [int(c) for c in codes]
    root: list = [items[0], {}]
    for item in items[1:]:
        node = root
        while True:
            d = (item ^ node[0]).bit_count()
            if d not in node[1]:
                node[1][d] = [item, {}]
                break
            node = node[1][d]
    built = time.perf_counter()
    for q in (int(x) for x in queries[:sample]):
        stack = [root]
        while stack:
            node = stack.pop()
            d = (q ^ node[0]).bit_count()
            stack.extend(child for k, child in node[1].items() if d - radius <= k <= d + radius)
    searched = (time.perf_counter() - built) * len(queries) / min(sample, len(queries))
    return built - start, searched


def audit_once(folder: Path, workers: int, bktree: bool) -> dict:
    """Time audit.py's steps on the folder; count planted copies found and false matches."""
    from utils.data.duplicates import HASH_DISTANCE, duplicate_groups
    from utils.data.quality import audit_findings, inspect_images
    from utils.data.sources import scan_split
    from utils.evaluate.audit_report import write_findings_csv, write_report

    t = [time.perf_counter()]
    image_set = scan_split(folder, check_headers=False, use_cache=False)
    items = [(p, "all", image_set.class_names[c]) for p, c in image_set.samples]
    t.append(time.perf_counter())
    records = inspect_images(items, workers)
    t.append(time.perf_counter())
    prints = [r.fingerprint for r in records]
    groups = duplicate_groups(prints, HASH_DISTANCE)
    t.append(time.perf_counter())
    findings = audit_findings(records, groups, 32, 4.0)
    write_findings_csv(folder / "findings.csv", findings)
    write_report(folder / "report.html", records, findings, str(folder))
    t.append(time.perf_counter())
    found = false = 0
    for group in groups:
        bases = [base_of(records[i].path) for i in group]
        found += sum(1 for i in group if "_copy" in records[i].path and bases.count(base_of(records[i].path)) > 1)
        false += len(group) - max(bases.count(b) for b in set(bases))
    out = {"n": len(records), "scan": t[1] - t[0], "hash": t[2] - t[1], "search": t[3] - t[2], "report": t[4] - t[3],
           "found": found, "false": false}
    if bktree:
        codes = np.array([p.phash for p in prints], dtype=np.uint64)
        out["bktree"] = bktree_seconds(codes.reshape(-1), codes[:, 0], HASH_DISTANCE)
    return out


def main(args: argparse.Namespace) -> None:
    from prettytable import PrettyTable

    table = PrettyTable(["images", "write s", "scan s", "hash s", "hash img/s", "search s", "search img/s", "report s",
                         "audit s", "planted found", "false matches"])
    notes = []
    for n in args.images:
        base = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="audit_speed_"))
        folder = base / f"n{n}"
        try:
            start = time.perf_counter()
            planted = write_images(folder, n, args.workers)
            written = time.perf_counter() - start
            r = audit_once(folder, args.workers, args.bktree)
            audit = r["scan"] + r["hash"] + r["search"] + r["report"]
            table.add_row([f"{r['n']:,}", f"{written:.1f}", f"{r['scan']:.1f}", f"{r['hash']:.1f}", f"{r['n'] / r['hash']:,.0f}",
                           f"{r['search']:.2f}", f"{r['n'] / r['search']:,.0f}", f"{r['report']:.1f}", f"{audit:.1f}",
                           f"{r['found']}/{planted}", r["false"]])
            if "bktree" in r:
                notes.append(f"{n:,} images: BK-tree build {r['bktree'][0]:.1f} s, search {r['bktree'][1]:.0f} s "
                             f"(1,000 queries, extrapolated) against the multi-index's whole search {r['search']:.2f} s")
        finally:
            if not args.folder:
                shutil.rmtree(base, ignore_errors=True)
        print(table, flush=True)
    print(f"{os.cpu_count()} CPUs, --workers {args.workers}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
