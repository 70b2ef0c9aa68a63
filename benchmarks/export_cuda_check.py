"""One-shot check of export.py's CUDA paths on a GPU machine (not a test: CI has no GPU).

    python benchmarks/export_cuda_check.py --out /tmp/export_cuda_check

Needs a CUDA GPU; onnxruntime-gpu and tensorrt are optional (the checks that need them say
"skipped" without them). It writes a small dataset, trains resnet10t for one epoch at 32 px on
the GPU, then:
  1. export.py --half --export torchscript onnx (float16, on the GPU) -> parity within the fp16 tolerance,
  2. export.py --export onnx torchscript (float32 on the GPU, TF32 off) -> parity within 1e-4,
  3. the torch backend in float16 (load_backend(..., half=True)) against float32,
  4. the ONNX backend on --device 0: CUDA provider if onnxruntime-gpu is installed, else a warning and the CPU,
  5. export.py --export tensorrt (float32, then --half), if the tensorrt package is installed, and its backend.
Prints one line per check and exits non-zero if any ran and failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.data.decode import load_image
from utils.infer.backends import load_backend, predict_probs, preprocess_images

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]
RESULTS: list[tuple[str, str]] = []


def sh(*cmd: Any) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *map(str, cmd)]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print("\n".join((proc.stdout + proc.stderr).splitlines()[-14:]), flush=True)
    return proc


def record(name: str, ok: bool | None, detail: str = "") -> None:
    verdict = "skipped" if ok is None else ("ok" if ok else "FAILED")
    RESULTS.append((name, verdict))
    print(f"[{verdict}] {name} {detail}", flush=True)


def write_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = np.clip(np.tile(np.array(colour, float), (32, 32, 1)) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{k}.png")


def parity_of(json_file: Path) -> dict[str, Any]:
    return json.loads(json_file.read_text(encoding="utf-8")).get("parity", {})


def main(out: Path) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check")
        return 1
    data, run = out / "data", out / "run"
    if not (run / "best.pt").is_file():
        write_dataset(data)
        proc = sh("main.py", "--model_name", "resnet10t", "--image_size", 32, "--epoch", 1, "--batch_size", 8, "--workers", 0,
                  "--device", 0, "--train_path", data / "train", "--val_path", data / "val", "--test_path", data / "test",
                  "--save_path", run)
        if proc.returncode:
            record("train on CUDA", False)
            return 1
    exp = run / "export"

    proc = sh("export.py", "--save_path", run, "--export", "torchscript", "onnx", "--half", "--device", 0)
    for name in ("best_fp16.torchscript", "best_fp16.onnx"):
        p = parity_of(exp / f"{name}.json") if (exp / f"{name}.json").exists() else {}
        record(f"export --half: {name}", proc.returncode == 0 and p.get("ok") is True,
               f"(max |dp| {p.get('max_abs_diff')}, top-1 {p.get('top1_agreement')}, on {p.get('device')})")

    proc = sh("export.py", "--save_path", run, "--export", "onnx", "torchscript", "--device", 0)
    for name in ("best.torchscript", "best.onnx"):
        p = parity_of(exp / f"{name}.json") if (exp / f"{name}.json").exists() else {}
        record(f"export fp32 on CUDA: {name}", proc.returncode == 0 and p.get("ok") is True,
               f"(max |dp| {p.get('max_abs_diff')}, on {p.get('device')})")

    files = sorted((data / "test").rglob("*.png"))
    fp32 = load_backend(run, "torch", "cuda:0")
    images = torch.from_numpy(preprocess_images(fp32.meta, [load_image(f) for f in files]))  # torch in, torch out
    ref = predict_probs(fp32, images)
    half = predict_probs(load_backend(run, "torch", "cuda:0", half=True), images)
    diff = (half - ref).abs().max().item()
    record("torch backend --half vs fp32", diff <= 1e-2, f"(max |dp| {diff:.2e})")
    ts_half = predict_probs(load_backend(exp / "best_fp16.torchscript", "torchscript", "cuda:0"), images)
    diff = (ts_half - ref).abs().max().item()
    record("torchscript fp16 backend on CUDA", diff <= 1e-2, f"(max |dp| {diff:.2e})")

    onnx_backend = load_backend(run, "onnx", "cuda:0")
    diff = (predict_probs(onnx_backend, images) - ref).abs().max().item()
    record("onnx backend on --device 0", diff <= 1e-3, f"(providers {onnx_backend.providers}, max |dp| {diff:.2e}; "
                                                        "TF32 in the CUDA provider may add ~1e-4)")

    if importlib.util.find_spec("tensorrt") is None:
        record("tensorrt export", None, "(pip install tensorrt to check it)")
    else:
        for extra, name in (([], "best.engine"), (["--half"], "best_fp16.engine")):
            proc = sh("export.py", "--save_path", run, "--export", "tensorrt", "--device", 0, *extra)
            p = parity_of(exp / f"{name}.json") if (exp / f"{name}.json").exists() else {}
            record(f"tensorrt {name}", proc.returncode == 0 and p.get("ok") is True, f"(max |dp| {p.get('max_abs_diff')})")
        trt = load_backend(run, "tensorrt", "cuda:0")
        diff = (predict_probs(trt, images) - ref).abs().max().item()
        record("tensorrt backend", diff <= 1e-4, f"(max |dp| {diff:.2e})")

    print("\n".join(f"{v:8s} {n}" for n, v in RESULTS))
    return 1 if any(v == "FAILED" for _, v in RESULTS) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/export_cuda_check", help="work folder")
    sys.exit(main(Path(parser.parse_args().out)))
