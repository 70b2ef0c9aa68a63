"""Split a folder of class folders into train / val / test, stratified, exact and seeded.

    python processing.py --data_path raw/ --output_path dataset --val_size 0.2 --test_size 0.2
    python processing.py --sample digits --data_path dataset/digits --output_path dataset

The source folder is never changed: images are copied (or symlinked with --link). Each class is
split in the asked ratios, rounded per class; the three splits are disjoint and together hold every
readable image. Exact and near copies of an image (found as audit.py finds them) go into one split
together, so none leaks into val or test (--allow_duplicates_across_splits: image by image); the
rule and its rounding: utils.data.split. `--sample digits` first writes scikit-learn's bundled
handwritten digits (1,797 real 8x8 images, 10 classes) as PNG class folders into --data_path.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from prettytable import PrettyTable

from utils.core.config import ArgumentParser, finite_float, group_flags
from utils.core.files import atomic_write_text
from utils.core.log import UserError, script_main
from utils.core.options import Options
from utils.data.duplicates import HASH_DISTANCE
from utils.data.folders import class_folders, resolve_class_names, scan_class_folders
from utils.data.imageset import report_skipped
from utils.data.lists import write_list
from utils.data.shard_writer import DEFAULT_SHARD_SIZE, parse_shard_size, split_shards
from utils.data.split import SPLITS, copy_groups, split_dataset

LOGGER = logging.getLogger("processing")
MANIFEST = ".processing.json"  # in --output_path: the files this script wrote there (only those are replaced)
SAMPLE_MARKER = ".sample.json"  # in --data_path: written by --sample
SAMPLES = ("digits",)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Split class folders into train/val/test.")
    p = parser.add_argument
    p("--data_path", default="dataset/raw", help="the whole dataset: <data_path>/<class>/<images>")
    p("--output_path", default="dataset", help="where train/, val/, test/ and label.txt are written")
    p("--label_path", default=None, help="where label.txt goes (default: <output_path>/label.txt)")
    p("--val_size", type=finite_float, default=0.2, help="fraction of each class for validation (0 = none)")
    p("--test_size", type=finite_float, default=0.2, help="fraction of each class for testing (0 = none)")
    p("--seed", type=int, default=0, help="random seed of the split")
    p("--link", action="store_true", help="symlink the images instead of copying them")
    p("--force", action="store_true", help="replace the train/, val/, test/ and label.txt an earlier run of processing.py wrote")
    p("--write_lists", action="store_true",
      help="write train.csv, val.csv, test.csv (path,label rows pointing into --data_path) instead of copying images")
    p("--write_shards", action="store_true",
      help="write each split as WebDataset tar shards (<split>/<split>-000000.tar ... and shards.json) instead of "
           "class folders")
    p("--shard_size", default=None, help="--write_shards: start a new shard after this many images (10000), bytes "
                                         f"(500MB, 1GB) or either (10000,1GB) (default: {DEFAULT_SHARD_SIZE})")
    p("--sample", choices=SAMPLES, default=None, help="first write a bundled sample dataset into --data_path")
    p("--allow_duplicates_across_splits", action="store_true",
      help="split image by image: exact and near copies of an image may land in different splits")
    p("--hash_distance", type=int, default=HASH_DISTANCE, help="pHash bits within which two images are near copies "
                                                               "(as audit.py's)")
    p("--workers", type=int, default=os.cpu_count() or 1, help="processes that decode and hash images (0 = this one)")
    return group_flags(parser, "processing")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    args = get_args_parser().parse_args(argv)
    for name in ("val_size", "test_size"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.val_size + args.test_size >= 1.0:
        raise UserError(f"--val_size + --test_size must leave images for training (got {args.val_size + args.test_size:g})")
    if not 0 <= args.hash_distance <= 32 or args.workers < 0:
        raise UserError(f"--hash_distance must be from 0 to 32 bits and --workers at least 0, got {args.hash_distance} "
                        f"and {args.workers}")
    if args.write_shards and (args.write_lists or args.link):
        raise UserError(f"--write_shards writes the images into shards: leave out --{'write_lists' if args.write_lists else 'link'}")
    if args.shard_size is not None and not args.write_shards:
        raise UserError("--shard_size sizes the shards of --write_shards: add --write_shards, or leave --shard_size out")
    args.shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    parse_shard_size(args.shard_size)
    return Options.of(args)


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
def kept_together(images: dict[str, list[Path]], args: Options) -> list[list[Path]]:
    """The groups of copies the split keeps in one split (none with --allow_duplicates_across_splits),
    said in a line, with a warning naming an example of a group that spans class folders."""
    if args.allow_duplicates_across_splits:
        return []
    groups = copy_groups(images, args.hash_distance, args.workers)
    print(f"kept {len(groups)} group(s) of exact or near copies each in one split ({sum(map(len, groups))} images)",
          flush=True)
    folder_of = {path: folder for folder, paths in images.items() for path in paths}
    mixed = [g for g in groups if len({folder_of[p] for p in g}) > 1]
    if mixed:
        a = mixed[0][0]
        b = next(p for p in mixed[0] if folder_of[p] != folder_of[a])
        LOGGER.warning("warning: %d group(s) of copies hold images of different classes, each kept in one split, "
                       "e.g. %s and %s; python audit.py --data_path <data_path> lists them all", len(mixed), a, b)
    return groups


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def read_manifest(output: Path) -> dict[str, Any]:
    """What an earlier processing.py wrote into `output` ({} when nothing: a folder of the user's)."""
    try:
        data = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else {}


def existing_outputs(output: Path) -> list[Path]:
    """Every file (or link) under output/train, val and test (links not followed), and the lists
    output/train.csv, val.csv and test.csv."""
    found = [output / f"{split}.csv" for split in SPLITS if (output / f"{split}.csv").is_file()]
    for split in SPLITS:
        for dirpath, _, filenames in os.walk(output / split):
            found.extend(Path(dirpath) / name for name in filenames)
    return found


def check_paths(source: Path, output: Path, label_path: Path, force: bool) -> list[Path]:
    """Refuse outputs that overlap the source, and any overwrite of what processing.py did not
    write itself; without --force, any overwrite at all.

    Returns:
        The files of an earlier split that --force replaces.
    """
    for target in [output / s for s in SPLITS] + [label_path]:
        if _inside(source, target) or _inside(target, source):
            raise UserError(f"{target} overlaps the source folder {source}: choose an --output_path outside it")
    if label_path.is_dir():
        raise UserError(f"--label_path {label_path} is a folder: pass the path of the file to write, "
                        f"e.g. {label_path / 'label.txt'}")
    for split in SPLITS:
        if (output / split).exists() and not (output / split).is_dir():
            raise UserError(f"{output / split} is a file, not a folder: choose another --output_path")
    manifest = read_manifest(output)
    ours = set(manifest.get("files", []))
    existing = existing_outputs(output)
    label_exists = label_path.exists() or label_path.is_symlink()
    if (existing or label_exists) and not force:
        shown = sorted({p.relative_to(output).parts[0] for p in existing} | ({label_path.name} if label_exists else set()))
        raise UserError(f"{output} already holds {', '.join(shown)}: pass --force to replace what processing.py wrote "
                        "there, or choose another --output_path")
    foreign = [p for p in existing if p.relative_to(output).as_posix() not in ours]
    if foreign:
        raise UserError(f"{output} holds {len(foreign)} file(s) that processing.py did not write (e.g. {foreign[0]}): "
                        "--force replaces only its own; move them away or choose another --output_path")
    if label_exists and manifest.get("label_path") != str(label_path.absolute()):
        raise UserError(f"--label_path {label_path} exists and was not written by processing.py: move it away or "
                        "choose another --label_path")
    return existing + ([label_path] if label_exists else [])


def remove_outputs(paths: Sequence[Path], output: Path) -> None:
    """Delete the files of an earlier split (all written by processing.py) and the folders they leave empty."""
    for path in paths:
        path.unlink()
    for split in SPLITS:
        for dirpath, _, _ in sorted(os.walk(output / split), key=lambda w: -len(w[0])):
            if not os.listdir(dirpath):
                os.rmdir(dirpath)


def place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def write_sample(args: Options, source: Path) -> None:
    """--sample: the bundled digits into --data_path (a new or empty folder, or an earlier sample)."""
    marker = source / SAMPLE_MARKER
    if source.exists() and not source.is_dir():
        raise UserError(f"--data_path {source} is a file: --sample writes a folder")
    if source.exists() and any(source.iterdir()) and not marker.is_file():
        raise UserError(f"{source} already holds files that --sample did not write: --sample writes into a new or "
                        "empty folder (or over an earlier sample); choose another --data_path")
    count = write_digits(source)
    atomic_write_text(marker, json.dumps({"sample": args.sample, "images": count}) + "\n")
    print(f"sample '{args.sample}': wrote {count} images into {source}", flush=True)


def scan_source(source: Path) -> tuple[list[str], list[str], dict[str, int], dict[str, list[Path]], list[tuple[str, str]]]:
    """The class folders of --data_path: (folders, class names, folder -> index, images, skipped)."""
    if not source.is_dir():
        raise UserError(f"--data_path {source} is not a folder (expected <data_path>/<class name>/<images>)")
    folders = class_folders(source)
    if not folders:
        raise UserError(f"--data_path {source} has no class folders (expected <data_path>/<class name>/<images>)")
    class_names, folder_index = resolve_class_names(folders, source / "label.txt")
    found, skipped = scan_class_folders(source, folders)
    images = {folder: [Path(p) for p in paths] for folder, paths in found.items()}
    skipped = [(path, why) for path, why in skipped if path != str(source / SAMPLE_MARKER)]  # our own note
    for folder in folders:
        if not images[folder]:
            raise UserError(f"class folder {source / folder} holds no readable images: add images or remove it")
    report_skipped(skipped, f"{source}")
    return folders, class_names, folder_index, images, skipped


def main(args: Options) -> dict[str, Any]:
    source = Path(args.data_path)
    output = Path(args.output_path)
    label_path = Path(args.label_path) if args.label_path else output / "label.txt"
    if args.sample:
        write_sample(args, source)
    folders, class_names, folder_index, images, skipped = scan_source(source)

    stale = check_paths(source, output, label_path, args.force)  # refusals first, the hashing after
    groups = kept_together(images, args)
    remove_outputs(stale, output)  # an earlier split is replaced only once the new one is decided
    split = split_dataset(images, args.val_size, args.test_size, args.seed, groups)
    shards = split_shards(split, source, class_names, folder_index, args.seed, args.shard_size) if args.write_shards else []
    if args.write_shards:
        planned = [output / name for plan in shards for name in plan.files()]
    elif args.write_lists:
        planned = [output / f"{s}.csv" for s in SPLITS if any(split[s][f] for f in folders)]
    else:
        planned = [output / s / folder / path.relative_to(source / folder) for s in SPLITS for folder in folders
                   for path in split[s][folder]]
    output.mkdir(parents=True, exist_ok=True)
    # written first, so a split cut short by a kill can still be replaced with --force
    atomic_write_text(output / MANIFEST, json.dumps({"files": [p.relative_to(output).as_posix() for p in planned],
                                                     "label_path": str(label_path.absolute())}) + "\n")
    table = PrettyTable(["class", "name", *SPLITS, "total"])
    totals = {s: 0 for s in SPLITS}
    for folder in sorted(folders, key=lambda f: folder_index[f]):
        counts = [len(split[s][folder]) for s in SPLITS]
        if not (args.write_lists or args.write_shards):
            for s in SPLITS:
                for path in split[s][folder]:
                    place(path, output / s / folder / path.relative_to(source / folder), args.link)
        for s, n in zip(SPLITS, counts):
            totals[s] += n
        table.add_row([folder_index[folder], class_names[folder_index[folder]], *counts, sum(counts)])
    table.add_row(["", "total", *totals.values(), sum(totals.values())])
    if args.write_lists:  # path,label rows pointing into the source, relative to the list
        for s in SPLITS:
            rows = [(path, [class_names[folder_index[f]]]) for f in folders for path in split[s][f]]
            if rows:
                write_list(output / f"{s}.csv", rows, output)
    for plan in shards:
        plan.write(output)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(label_path, "".join(f"{n}\n" for n in class_names))
    print(table)
    made = [str(p) for p in planned] if args.write_lists else [str(output / s) for s in SPLITS if totals[s]]
    verb = "listed" if args.write_lists else "sharded" if args.write_shards else "linked" if args.link else "copied"
    print(f"{verb} {sum(totals.values())} images {'in' if args.write_lists else 'into'} {', '.join(made)}; "
          f"classes in {label_path}; {len(skipped)} file(s) skipped", flush=True)
    return {"counts": totals, "skipped": skipped}


if __name__ == "__main__":
    script_main(main, parse_args)
