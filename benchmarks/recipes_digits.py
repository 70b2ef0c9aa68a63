"""Compare training recipes side by side on the bundled digits sample (test accuracy of best.pt).

    python benchmarks/recipes_digits.py                       # resnet18, 32 px, 12 epochs each
    python benchmarks/recipes_digits.py --epoch 20 --recipes none ema "--mixup cutmix"

Each recipe is a string of main.py flags added to the same base command; every run uses the same
split, seed and number of epochs. Prints one PrettyTable row per recipe.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from prettytable import PrettyTable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = ["none", "--Augment AutoAugment", "--mixup cutmix", "--ema"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--epoch", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="main.py flags per recipe ('none' = no extra flag)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".cache" / "recipes"), help="work folder")
    return parser


def main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    data = work / "split"
    if not (data / "train").is_dir():
        subprocess.run([sys.executable, "processing.py", "--sample", "digits", "--data_path", str(work / "digits"),
                        "--output_path", str(data), "--force"], cwd=ROOT, check=True, capture_output=True)
    table = PrettyTable(["recipe", "test acc", "test mean_acc", "best epoch", "minutes"])
    for recipe in args.recipes:
        extra = [] if recipe == "none" else shlex.split(recipe)
        cmd = [sys.executable, "main.py", "--model_name", args.model_name, "--image_size", str(args.image_size),
               "--epoch", str(args.epoch), "--batch_size", str(args.batch_size), "--workers", str(args.workers),
               "--train_path", f"{data}/train", "--val_path", f"{data}/val", "--test_path", f"{data}/test",
               "--save_path", str(work / "runs" / "exp"), *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        minutes = (time.time() - t0) / 60
        test = re.search(r"test \(\d+ images, best\.pt\): acc ([\d.]+), mean_acc ([\d.]+)", proc.stdout)
        best = re.search(r"best\.pt: epoch (\d+)", proc.stdout)
        if proc.returncode != 0 or not test:
            table.add_row([recipe, "failed", proc.stderr.strip().splitlines()[-1][:60] if proc.stderr.strip() else "", "", f"{minutes:.1f}"])
            continue
        table.add_row([recipe, f"{float(test.group(1)):.4f}", f"{float(test.group(2)):.4f}", best.group(1) if best else "", f"{minutes:.1f}"])
        print(f"{recipe}: test acc {test.group(1)}", flush=True)
    table.title = f"{args.model_name} {args.image_size}px, {args.epoch} epochs, digits sample (359 test images)"
    print(table)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
