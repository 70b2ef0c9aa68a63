"""Prediction throughput: predict.py end to end against a bare batched forward pass (not a test).

    python benchmarks/predict_throughput.py                     # resnet18 at 32 px, batch 64, the digits images
    python benchmarks/predict_throughput.py --model_name resnet50 --image_size 64 --rounds 3

  bare       the model's forward pass and softmax on uint8 batches already in memory (normalised
             on the fly, as the torch backend does), batch after batch, in this process, on all
             its compute threads.
  bare x2    the same forward passes in two threads at once, one compute thread each: what
             predict.py's two streams (--streams, utils/infer/streams.py) can reach with no
             loading and no rows.
  predict.py predict.py on the same images from disk, as a user runs it (its default --workers
             and --streams); images/second from its own summary line, which times from the first
             batch to the last row written (start-up and model loading excluded). `1 stream`:
             with --streams 1, one batch at a time on all the compute threads.
  loader     predict.py's loader alone (utils.infer.loader: reading, decoding, preprocessing; no
             model), in this process, as predict.py's default --workers 0 runs it on 1-2 CPUs.
  ratio      predict.py / bare (the issue's figure) and predict.py / the faster of bare and
             bare x2 (what this CPU does with no overhead either way).

The model is an untrained one of the requested architecture written as a best.pt of this toolkit
(speed does not depend on the weights); the images are scikit-learn's digits (all 1,797 of them)
written by processing.py into --cache_dir. Compare figures only within one run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import ensure_digits  # noqa: E402

SUMMARY = re.compile(r"(\d+) images predicted in ([0-9.]+)s \(([0-9.]+) images/s\)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--model_name", default="resnet18")
    p("--image_size", type=int, default=32)
    p("--batch_size", type=int, default=64)
    p("--rounds", type=int, default=3, help="measurements of each, alternating; the median is reported")
    p("--cache_dir", default=str(ROOT / "benchmarks" / ".cache"))
    return parser


def make_run(folder: Path, model_name: str, size: int, class_names: list[str]) -> Path:
    """A run folder whose best.pt holds an untrained model (mean/std of the digits, roughly)."""
    import torch

    from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
    from utils.models.registry import create_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(model_name, len(class_names), 3)
    meta = ModelMeta(model_name, tuple(class_names), PreprocessSpec.create(size, 3, [0.2] * 3, [0.3] * 3))
    torch.save(Checkpoint("best", meta, model.state_dict(), epoch=1).to_dict(), folder / "best.pt")
    return folder


def bare_inputs(run: Path, files: list[Path]) -> tuple[Any, Any]:
    """The run's PyTorch backend and the files as one preprocessed uint8 array in memory."""
    from utils.data.decode import load_image
    from utils.infer.backends import load_backend, preprocess_images

    backend = load_backend(run, "torch", "cpu")
    return backend, preprocess_images(backend.meta, [load_image(f, 3) for f in files])


def bare_forward(run: Path, files: list[Path], batch_size: int) -> float:
    """images/s of the model on uint8 batches in memory (decoding and resizing done beforehand)."""
    from utils.infer.backends import predict_probs

    backend, images = bare_inputs(run, files)
    predict_probs(backend, images[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(images), batch_size):
        predict_probs(backend, images[start:start + batch_size])
    return len(images) / (time.perf_counter() - t0)


def bare_streams(run: Path, files: list[Path], batch_size: int, streams: int = 2) -> float:
    """images/s of `streams` threads running the bare forward pass side by side on interleaved
    batches, each on an equal share of the compute threads (at least one)."""
    import threading

    import torch

    from utils.infer.backends import predict_probs

    backend, images = bare_inputs(run, files)
    starts = list(range(0, len(images), batch_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))  # the threads started below take this count

    def forward(mine: list[int]) -> None:
        for start in mine:
            predict_probs(backend, images[start:start + batch_size])

    try:
        warm = [threading.Thread(target=forward, args=([0],)) for _ in range(streams)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        pool = [threading.Thread(target=forward, args=(starts[i::streams],)) for i in range(streams)]
        t0 = time.perf_counter()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return len(images) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def loader_only(run: Path, files: list[Path], batch_size: int) -> float:
    """images/s of predict.py's loader alone: files read, decoded and preprocessed, no model."""
    from utils.infer.backends import load_backend
    from utils.infer.ensemble import InputPlan
    from utils.infer.loader import prediction_loader

    plan = InputPlan([load_backend(run, "torch", "cpu").meta.preprocess])
    t0 = time.perf_counter()
    for _ in prediction_loader(files, plan, batch_size, 0):
        pass
    return len(files) / (time.perf_counter() - t0)


def predict_py(run: Path, source: Path, batch_size: int, *extra: str) -> float:
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--source", str(source), "--save_path", str(run),
                           "--batch_size", str(batch_size), "--device", "cpu", *extra], cwd=ROOT, capture_output=True, text=True)
    match = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or not match:
        sys.exit(f"error: predict.py failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(match.group(3))


def main(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from prettytable import PrettyTable

    split = ensure_digits(Path(args.cache_dir).resolve())
    source = split
    files = sorted(p for p in source.rglob("*.png"))
    classes = sorted({p.parent.name for p in files})
    run = make_run(Path(args.cache_dir).resolve() / f"predict_{args.model_name}_{args.image_size}", args.model_name,
                   args.image_size, classes)
    figures: dict[str, list[float]] = {"bare": [], "bare_x2": [], "loader": [], "predict": [], "predict_1": []}
    for r in range(args.rounds):
        figures["bare"].append(bare_forward(run, files, args.batch_size))
        figures["bare_x2"].append(bare_streams(run, files, args.batch_size))
        figures["loader"].append(loader_only(run, files, args.batch_size))
        figures["predict"].append(predict_py(run, source, args.batch_size))
        figures["predict_1"].append(predict_py(run, source, args.batch_size, "--streams", "1"))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items())
              + f" images/s, ratio {figures['predict'][-1] / figures['bare'][-1]:.2f}", flush=True)
    result = {k: statistics.median(v) for k, v in figures.items()}
    best = max(result["bare"], result["bare_x2"])
    result["ratio"] = result["predict"] / result["bare"]
    result["ratio_best"] = result["predict"] / best
    result["ratio_1"] = result["predict_1"] / result["bare"]
    table = PrettyTable(["images", "bare forward img/s", "bare x2 img/s", "loader img/s", "predict.py img/s",
                         "ratio", "ratio to the faster bare", "predict.py, 1 stream", "its ratio"])
    table.title = (f"{args.model_name} at {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
                   f"median of {args.rounds} rounds")
    table.add_row([len(files), f"{result['bare']:.1f}", f"{result['bare_x2']:.1f}", f"{result['loader']:.1f}",
                   f"{result['predict']:.1f}", f"{result['ratio']:.2f}", f"{result['ratio_best']:.2f}",
                   f"{result['predict_1']:.1f}", f"{result['ratio_1']:.2f}"])
    print(table)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
