"""Images/second of the three ways to deploy a model, on the same image files (not a test).

    python benchmarks/deploy_fps.py                        # resnet18 at 64 px, 512 PNG files of 96x72
    python benchmarks/deploy_fps.py --model_name resnet50 --image_size 224 --size 320 240

It writes a small dataset, trains the model for one epoch with main.py (the speed does not depend
on the weights), exports it with export.py (TorchScript, ONNX) and builds deploy/cpp, then runs, in
turns for several rounds:
  - predict.py --model_type torch (best.pt, PyTorch),
  - predict.py --model_type onnx in a process where torch, torchvision and timm cannot be imported
    (the torch-free predictor: numpy, Pillow, onnxruntime),
  - deploy/cpp's classify on best.torchscript (libtorch),
each on every file of the folder: decoding, preprocessing, inference and writing the results. It
reports the images/second each prints (the clock starts once the model has loaded) and the wall
time of the whole command (start-up and model loading included), medians over the rounds, and
checks that the three agree on the top-1 class. All use --threads compute threads (OMP_NUM_THREADS).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prettytable import PrettyTable

ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]
BLOCKER = '''import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NotInstalled())
'''


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/deploy_fps", help="work folder (dataset, run, build)")
    parser.add_argument("--model_name", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="image files to predict")
    parser.add_argument("--size", type=int, nargs=2, default=[96, 72], help="width and height of the image files")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads of every predictor")
    return parser


def sh(cmd: list[Any], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(map(str, cmd))}")
    return proc


def prepare(args: argparse.Namespace, out: Path) -> tuple[Path, Path, Path]:
    """(the run folder, the folder of images to predict, the classify binary), made once."""
    data, run, images, build = out / "data", out / "run", out / "images", out / "cpp-build"
    rng = np.random.default_rng(0)
    if not (run / "export" / "best.onnx").is_file():
        for split, n in (("train", 32), ("val", 8)):
            for c, colour in enumerate(COLOURS):
                folder = data / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    img = np.tile(np.array(colour, float), (args.image_size, args.image_size, 1))
                    Image.fromarray(np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)).save(folder / f"{k}.png")
        sh([sys.executable, "main.py", "--model_name", args.model_name, "--image_size", args.image_size, "--epoch", 1,
            "--batch_size", 16, "--workers", 0, "--device", "cpu", "--train_path", data / "train", "--val_path",
            data / "val", "--test_path", data / "none", "--label_path", data / "label.txt", "--save_path", run])
        sh([sys.executable, "export.py", "--save_path", run, "--export", "torchscript", "onnx", "--device", "cpu"])
    if len(list(images.glob("*.png"))) != args.images:
        images.mkdir(parents=True, exist_ok=True)
        width, height = args.size
        for k in range(args.images):
            base = np.tile(np.array(COLOURS[k % len(COLOURS)], float), (height, width, 1))
            Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)).save(images / f"{k:05d}.png")
    if not (build / "classify").is_file():
        import torch

        sh(["cmake", "-S", ROOT / "deploy" / "cpp", "-B", build, "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
        sh(["cmake", "--build", build, "-j", str(os.cpu_count() or 1)])
    (out / "blocker").mkdir(exist_ok=True)
    (out / "blocker" / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    return run, images, build / "classify"


def top1_of_predict(stdout: str) -> dict[str, str]:
    folder = Path(re.search(r"^predict folder: (.*)$", stdout, re.M).group(1))
    lines = (folder / "predictions.csv").read_text(encoding="utf-8").splitlines()[1:]
    return {Path(ln.split(",")[0]).name: ln.split(",")[1] for ln in lines}


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    run, images, classify = prepare(args, out)
    files = sorted(images.glob("*.png"))
    env = dict(os.environ) | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    blocked = env | {"PYTHONPATH": str(out / "blocker")}
    common = ["--source", images, "--device", "cpu", "--workers", 0, "--batch_size", args.batch_size]
    cases = {
        "predict.py, torch (best.pt)": ([sys.executable, "predict.py", *common, "--save_path", run], env),
        "predict.py, onnxruntime, no torch": ([sys.executable, "predict.py", *common, "--weight", run / "export" / "best.onnx"],
                                              blocked),
        "classify (C++, libtorch)": ([classify, run / "export" / "best.torchscript", *files, "--batch", args.batch_size], env),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    walls: dict[str, list[float]] = {name: [] for name in cases}
    top1: dict[str, dict[str, str]] = {}
    for _ in range(args.rounds):
        for name, (cmd, case_env) in cases.items():
            start = time.perf_counter()
            proc = sh(cmd, case_env)
            walls[name].append(time.perf_counter() - start)
            rates[name].append(float(re.search(r"\(([\d.]+) images/s", proc.stdout + proc.stderr).group(1)))
            top1[name] = ({Path(ln.split(",")[0]).name: ln.split(",")[1] for ln in proc.stdout.splitlines()}
                          if "classify" in name else top1_of_predict(proc.stdout))
    reference = top1["predict.py, torch (best.pt)"]
    table = PrettyTable(["predictor", "images/s (after loading)", "whole command, s", "top-1 = torch"])
    table.title = (f"{len(files)} PNG files of {args.size[0]}x{args.size[1]}, {args.model_name} at {args.image_size} px, "
                   f"batch {args.batch_size}, {args.threads} thread(s), median of {args.rounds}")
    for name in cases:
        agree = sum(top1[name][k] == v for k, v in reference.items()) / len(reference)
        table.add_row([name, f"{statistics.median(rates[name]):.1f}", f"{statistics.median(walls[name]):.2f}", f"{agree:.1%}"])
    print(table)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
