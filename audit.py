"""Check a dataset before training: copies leaking across splits, copies with other labels, broken,
tiny, stretched, flat and odd-mode images.

    python audit.py --data_path raw/                     # a folder of class folders
    python audit.py --data_path dataset/                 # a split root: dataset/train, val, test
    python audit.py --train_path train.csv --val_path val.csv --save_path runs/audit

Writes into --save_path (a new folder: runs/audit, then runs/audit2 ...) findings.csv (one row per
finding) and report.html (one self-contained page: counts, histograms, thumbnails of each finding),
and prints a table of the findings by kind. Findings are not errors: the exit code is 0 whatever is
found, and 2 only for a usage error. The kinds and how copies are found: utils.data.quality and
utils.data.duplicates; the report: utils.evaluate.audit_report.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from utils.core.config import ArgumentParser, finite_float, group_flags
from utils.core.log import UserError, script_main, settle_heap
from utils.core.options import Options
from utils.data.duplicates import HASH_DISTANCE
from utils.data.stream import local_split

LOGGER = logging.getLogger("audit")
SPLITS = ("train", "val", "test")
WHOLE = "all"  # the split name of a --data_path that is not split


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Check a dataset: duplicates, leaks across splits, label conflicts, broken "
                                        "and odd images.")
    p = parser.add_argument
    p("--data_path", "--data", dest="data_path", default=None, metavar="ROOT",
      help="a folder of class folders, or a split root holding train/, val/, test/ class folders (--data: main.py's name)")
    p("--train_path", default=None, help="instead of --data_path: the train split (a folder or a list file)")
    p("--val_path", default=None, help="the val split (a folder or a list file)")
    p("--test_path", default=None, help="the test split (a folder or a list file)")
    p("--label_path", default=None, help="class names of numbered class folders or of a list's numeric labels "
                                         "(default: label.txt in --data_path when there is one)")
    p("--list_sep", default=None, help="separator of text lists (default: any whitespace)")
    p("--image_column", default=None, help="an hf:PATH split's image column (default image, else its one Image column)")
    p("--label_column", default=None, help="an hf:PATH split's label column (default label)")
    p("--save_path", default="runs/audit", help="the report folder (incremented when it exists: audit2 ...)")
    p("--workers", type=int, default=os.cpu_count() or 1, help="processes that decode and hash images (0 = this one)")
    p("--hash_distance", type=int, default=HASH_DISTANCE,
      help="pHash bits (of 64) within which two images are near copies (dHash may differ by 4 more)")
    p("--min_size", type=int, default=32, help="a shorter side under this many pixels is 'tiny'")
    p("--max_aspect", type=finite_float, default=4.0, help="a longer side over this many times the shorter is 'aspect'")
    p("--max_shown", type=int, default=200, help="findings of each kind shown in report.html (all are in findings.csv)")
    return group_flags(parser, "audit")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    args = get_args_parser().parse_args(argv)
    given = [f"--{s}_path" for s in SPLITS if getattr(args, f"{s}_path")]
    if args.data_path and given:
        raise UserError(f"give --data_path or {'/'.join(given)}, not both")
    if not args.data_path and not given:
        raise UserError("nothing to audit: give --data_path (a folder of class folders or of train/val/test) "
                        "or --train_path/--val_path/--test_path")
    if not 0 <= args.hash_distance <= 32:
        raise UserError(f"--hash_distance must be from 0 to 32 bits, got {args.hash_distance}")
    for name, low in (("min_size", 1), ("max_shown", 0), ("workers", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.max_aspect < 1:
        raise UserError(f"--max_aspect must be at least 1 (a square), got {args.max_aspect:g}")
    return Options.of(args)


def split_sources(args: Options) -> list[tuple[str, Path]]:
    """(split name, path) of each split to audit: the split paths given, the train/val/test folders
    of a split root, or the --data_path folder itself (split 'all')."""
    if not args.data_path:  # a URL of shards: copied once into the cache, audited there
        return [(s, Path(local_split(getattr(args, f"{s}_path")))) for s in SPLITS if getattr(args, f"{s}_path")]
    root = Path(args.data_path)
    if not root.exists():
        raise UserError(f"--data_path {root} not found: pass a folder of class folders or of train/, val/, test/")
    if not root.is_dir():
        raise UserError(f"--data_path {root} is a file, not a folder: a list file goes to --train_path/--val_path/--test_path")
    folders = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if folders and set(folders) <= set(SPLITS):
        return [(s, root / s) for s in SPLITS if s in folders]
    return [(WHOLE, root)]


def scan(args: Options) -> tuple[list[tuple[str, str, str]], str]:
    """Every image to audit as (path, split, label) and a title of what was audited."""
    from utils.data.imageset import report_skipped
    from utils.data.sources import scan_split, source_options

    items: list[tuple[str, str, str]] = []
    sources = split_sources(args)
    for split, path in sources:
        label_path = args.label_path
        if label_path is None and args.data_path and (Path(args.data_path) / "label.txt").is_file():
            label_path = Path(args.data_path) / "label.txt"
        image_set = scan_split(path, label_path=label_path, check_headers=False, what=f"{split} split",
                               use_cache=False, reading=source_options(args))
        report_skipped(image_set.skipped, f"{split} split {path}")
        names = image_set.class_names
        items += [(p, split, "|".join(names[i] for i in image_set.task.labels(t))) for p, t in image_set.samples]
    title = args.data_path or ", ".join(f"{s} {p}" for s, p in sources)
    return items, str(title)


def main(args: Options) -> dict[str, Any]:
    from utils.core.run import increment_path
    from utils.data.duplicates import duplicate_groups
    from utils.data.quality import audit_findings, inspect_images
    from utils.evaluate.audit_report import summary_table, write_findings_csv, write_report

    items, title = scan(args)
    folder = increment_path(args.save_path)
    print(f"audit folder: {folder}", flush=True)
    settle_heap()
    start = time.perf_counter()
    records = inspect_images(items, args.workers)
    hashed = time.perf_counter()
    groups = duplicate_groups([r.fingerprint for r in records], args.hash_distance)
    searched = time.perf_counter()
    findings = audit_findings(records, groups, args.min_size, args.max_aspect)
    write_findings_csv(folder / "findings.csv", findings)
    write_report(folder / "report.html", records, findings, title, args.max_shown)
    print(summary_table(findings))
    print(f"{len(records)} images: decoded and hashed in {hashed - start:.1f} s, copies searched in "
          f"{searched - hashed:.1f} s; {len(groups)} group(s) of copies", flush=True)
    print(f"report: {folder / 'report.html'}; every finding: {folder / 'findings.csv'}", flush=True)
    return {"save_path": folder, "findings": findings, "records": records, "groups": groups}


if __name__ == "__main__":
    script_main(main, parse_args)
