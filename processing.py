"""Split a folder of class folders into train / val / test, stratified, exact and seeded.

    python processing.py --data_path raw/ --output_path dataset --val_size 0.2 --test_size 0.2
    python processing.py --sample digits --data_path dataset/digits --output_path dataset

The source folder is never changed: images are copied (or symlinked with --link). Each class is
split in the asked ratios, rounded per class; the three splits are disjoint and together hold every
readable image. `--sample digits` first writes scikit-learn's bundled handwritten digits
(1,797 real 8x8 images, 10 classes) as PNG class folders into --data_path.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from prettytable import PrettyTable

from utils.config import ArgumentParser
from utils.images import class_folders, natural_key, report_skipped, resolve_class_names, scan_class_folder
from utils.log import UserError, run_cli

LOGGER = logging.getLogger("processing")
SPLITS = ("train", "val", "test")
SAMPLES = ("digits",)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Split class folders into train/val/test.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--data_path", default="dataset/raw", help="the whole dataset: <data_path>/<class>/<images>")
    p("--output_path", default="dataset", help="where train/, val/, test/ and label.txt are written")
    p("--label_path", default=None, help="where label.txt goes (default: <output_path>/label.txt)")
    p("--val_size", type=float, default=0.2, help="fraction of each class for validation (0 = none)")
    p("--test_size", type=float, default=0.2, help="fraction of each class for testing (0 = none)")
    p("--seed", type=int, default=0, help="random seed of the split")
    p("--link", action="store_true", help="symlink the images instead of copying them")
    p("--force", action="store_true", help="replace train/, val/, test/ and label.txt in a non-empty --output_path")
    p("--sample", choices=SAMPLES, default=None, help="first write a bundled sample dataset into --data_path")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    for name in ("val_size", "test_size"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.val_size + args.test_size >= 1.0:
        raise UserError(f"--val_size + --test_size must leave images for training (got {args.val_size + args.test_size:g})")
    return args


# ----------------------------------------------------------------------------------- sample
def write_digits(folder: Path) -> int:
    """scikit-learn's handwritten digits (shipped with it) as 8x8 grayscale PNGs in class folders.

    Returns:
        The number of images written.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counters: dict[int, int] = {}
    for image, target in zip(digits.images, digits.target):
        target = int(target)
        counters[target] = counters.get(target, 0) + 1
        out = folder / str(target)
        out.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
        Image.fromarray(pixels, "L").save(out / f"{target}_{counters[target]:04d}.png")
    return len(digits.target)


# ------------------------------------------------------------------------------------ split
def split_counts(n: int, val_size: float, test_size: float) -> tuple[int, int, int]:
    """Images of one class per split: val and test rounded, train the rest (at least one)."""
    n_val = int(round(n * val_size))
    n_test = int(round(n * test_size))
    while n_val + n_test >= n and (n_val or n_test):  # keep at least one training image
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def split_dataset(images: dict[str, list[Path]], val_size: float, test_size: float, seed: int) -> dict[str, dict[str, list[Path]]]:
    """Stratified split: {split: {class folder: [paths]}}, each class shuffled with its own seeded RNG.

    A class's split depends only on the seed, the class name and its files, not on the other classes.
    """
    out: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    for name, paths in images.items():
        order = sorted(paths, key=lambda p: natural_key(str(p)))
        random.Random(f"{seed}:{name}").shuffle(order)
        n_train, n_val, _ = split_counts(len(order), val_size, test_size)
        out["train"][name] = order[:n_train]
        out["val"][name] = order[n_train:n_train + n_val]
        out["test"][name] = order[n_train + n_val:]
    return out


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_paths(source: Path, output: Path, label_path: Path, force: bool) -> list[Path]:
    """Refuse outputs that overlap the source or would overwrite data without --force.

    Returns:
        The existing outputs that --force will replace.
    """
    targets = [output / s for s in SPLITS]
    for target in targets + [label_path]:
        if _inside(source, target) or _inside(target, source):
            raise UserError(f"{target} overlaps the source folder {source}: choose an --output_path outside it")
    existing = [t for t in targets if t.exists() and (t.is_file() or any(t.iterdir()))]
    if label_path.exists():
        existing.append(label_path)
    if existing and not force:
        raise UserError(f"{output} already holds {', '.join(p.name for p in existing)}: "
                        "pass --force to replace them, or choose another --output_path")
    return existing


def place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def main(args: argparse.Namespace) -> dict[str, Any]:
    source = Path(args.data_path)
    output = Path(args.output_path)
    label_path = Path(args.label_path) if args.label_path else output / "label.txt"

    if args.sample:
        if source.exists() and any(source.iterdir()):
            if not args.force:
                raise UserError(f"{source} is not empty: write the sample elsewhere (--data_path) or pass --force")
            if not (source / "0").is_dir():
                raise UserError(f"{source} holds other data: --force only replaces an earlier sample there")
            shutil.rmtree(source)
        count = write_digits(source)
        print(f"sample '{args.sample}': wrote {count} images into {source}", flush=True)

    if not source.is_dir():
        raise UserError(f"--data_path {source} is not a folder (expected <data_path>/<class name>/<images>)")
    folders = class_folders(source)
    if not folders:
        raise UserError(f"--data_path {source} has no class folders (expected <data_path>/<class name>/<images>)")
    class_names, folder_index = resolve_class_names(folders, source / "label.txt")

    images: dict[str, list[Path]] = {}
    skipped: list[tuple[str, str]] = []
    for folder in folders:
        good, skip = scan_class_folder(source / folder)
        skipped += skip
        if not good:
            raise UserError(f"class folder {source / folder} holds no readable images: add images or remove it")
        images[folder] = good
    report_skipped(skipped, f"{source}")

    existing = check_paths(source, output, label_path, args.force)
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    split = split_dataset(images, args.val_size, args.test_size, args.seed)
    table = PrettyTable(["class", "name", *SPLITS, "total"])
    totals = {s: 0 for s in SPLITS}
    for folder in sorted(folders, key=lambda f: folder_index[f]):
        counts = []
        for s in SPLITS:
            for path in split[s][folder]:
                place(path, output / s / folder / path.relative_to(source / folder), args.link)
            counts.append(len(split[s][folder]))
            totals[s] += len(split[s][folder])
        table.add_row([folder_index[folder], class_names[folder_index[folder]], *counts, sum(counts)])
    table.add_row(["", "total", *totals.values(), sum(totals.values())])
    label_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.write_text("".join(f"{n}\n" for n in class_names), encoding="utf-8")
    print(table)
    made = [str(output / s) for s in SPLITS if totals[s]]
    print(f"{'linked' if args.link else 'copied'} {sum(totals.values())} images into {', '.join(made)}; "
          f"classes in {label_path}; {len(skipped)} file(s) skipped", flush=True)
    return {"counts": totals, "skipped": skipped}


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
