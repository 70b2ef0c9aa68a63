"""Inference images/second of every CPU backend of utils.infer.backends on one model (not a test).

    python benchmarks/backend_fps.py                       # resnet18 at 64 px, batch 1 and 64
    python benchmarks/backend_fps.py --model_name resnet50 --image_size 224 --batch_sizes 1 32
    python benchmarks/backend_fps.py --image_size 224 --batch_sizes 1 8 --mobile   # + NCNN and TFLite (fp32/fp16/int8)

It writes a small dataset of coloured images, trains the model for one epoch with main.py (the
speed does not depend on the weights; the run gives export.py real calibration and parity
images), exports it with export.py (TorchScript, ONNX, int8 ONNX, OpenVINO), then times each
backend (with --mobile also NCNN and TFLite float32, float16 and int8: requirements/mobile.txt) the
way metrice.py --task fps does: `predict_probs(backend, batch)` on a random uint8
batch already in memory (normalisation included, decoding and resizing excluded), after a
warm-up. The cases are timed in turns, several rounds (so a busy spell of other processes on
the machine slows every case alike), and the median seconds per batch is reported. Prints a
PrettyTable (with each model file's size) and writes fps.csv. The run and its exports are reused when --out already has them.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from prettytable import PrettyTable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.infer.backends import load_backend, predict_probs
from utils.infer.speed import cpu_name, time_batches, warm_up

BACKENDS = [("torch", "torch", None), ("torchscript", "torchscript", None), ("onnx", "onnx", None),
            ("onnx-int8", "onnx", "best_int8.onnx"), ("openvino", "openvino", None)]
MOBILE = [("ncnn", "ncnn", None), ("tflite", "tflite", None), ("tflite-fp16", "tflite", "best_fp16.tflite"),
          ("tflite-int8", "tflite", "best_int8.tflite")]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/backend_fps", help="work folder (dataset, run, fps.csv)")
    parser.add_argument("--model_name", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--min_seconds", type=float, default=3.0, help="time each case at least this long in all")
    parser.add_argument("--rounds", type=int, default=5, help="turns over all cases")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch compute threads")
    parser.add_argument("--mobile", action="store_true", help="also NCNN and TFLite (export.py --export ncnn tflite --int8)")
    return parser


def sh(*cmd: Any) -> None:
    cmd = [sys.executable, *map(str, cmd)]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"FAILED ({proc.returncode})")


def write_dataset(root: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = np.clip(np.tile(np.array(colour, float), (size, size, 1)) + rng.normal(0, 25, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{k}.png")


def file_size_mb(backend: Any) -> float:
    """A backend's model on disk: its file and the companions of its format (.bin), best.pt's size for torch."""
    from utils.deploy.formats import get_format

    file = Path(getattr(backend, "file", "") or getattr(backend, "path", "") or "")
    if not file.is_file():
        return float("nan")
    parts = [p for p in get_format(backend.model_type).files_of(file)[:-1] if p.is_file()]
    return sum(p.stat().st_size for p in parts) / 1e6


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data, run = out / "data", out / "run"
    if not (run / "best.pt").is_file():
        write_dataset(data, args.image_size)
        sh("main.py", "--model_name", args.model_name, "--image_size", args.image_size, "--epoch", 1, "--batch_size", 16,
           "--workers", 0, "--device", "cpu", "--train_path", data / "train", "--val_path", data / "val",
           "--test_path", data / "none", "--save_path", run)
    if not all((run / "export" / f).is_file() for f in ("best.torchscript", "best.onnx", "best_int8.onnx", "best.xml")):
        sh("export.py", "--save_path", run, "--export", "torchscript", "onnx", "openvino", "--int8", "--device", "cpu")
    backends = BACKENDS + (MOBILE if args.mobile else [])
    if args.mobile and not all((run / "export" / f).is_file() for f in ("best.ncnn.param", "best.tflite", "best_int8.tflite")):
        sh("export.py", "--save_path", run, "--export", "ncnn", "tflite", "--int8", "--device", "cpu")
    torch.set_num_threads(args.threads)  # onnxruntime and OpenVINO take the same number (utils.infer.backends)
    cases, sizes = [], {}
    for label, model_type, file in backends:
        backend = load_backend(run / "export" / file if file else run, model_type, "cpu")
        sizes[label] = file_size_mb(backend)
        spec = backend.meta.preprocess
        for bs in args.batch_sizes:
            x = torch.randint(0, 256, (bs, spec.channels, spec.crop, spec.crop), dtype=torch.uint8)
            fn = (lambda b, inp: lambda: predict_probs(b, inp))(backend, x)
            warm_up(fn)
            cases.append((label, bs, fn, []))
    for r in range(args.rounds):
        for label, bs, fn, times in cases:
            times.extend(time_batches(fn, min_iters=5, min_seconds=args.min_seconds / args.rounds, max_seconds=30.0,
                                      warmup=False))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    rows = []
    for label, bs, fn, times in cases:
        median = statistics.median(times)
        rows.append({"backend": label, "size_mb": sizes[label], "batch_size": bs, "images_per_s": bs / median, "ms_per_batch": median * 1000,
                     "iterations": len(times)})
    cpu = cpu_name()
    table = PrettyTable(["backend", "MB", *[f"batch {b} images/s" for b in args.batch_sizes]])
    table.title = f"{args.model_name} at {args.image_size} px on {cpu}, {os.cpu_count()} CPUs (torch threads {args.threads})"
    for label, *_ in backends:
        table.add_row([label, f"{sizes[label]:.1f}", *[f"{r['images_per_s']:.1f}" for r in rows if r["backend"] == label]])
    table.align = "r"
    print(table)
    with (out / "fps.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'fps.csv'}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
