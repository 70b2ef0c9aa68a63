"""One-shot check of predict.py and Grad-CAM on CUDA (not a test: CI has no GPU).

    python benchmarks/cam_cuda_check.py --out /tmp/cam_cuda_check
    python benchmarks/cam_cuda_check.py --device cpu --epoch_size 32     # dry run of the script itself, no GPU

Writes the digits sample, trains resnet18 for one epoch at 64 px on the GPU, then:
  1. predict.py on the test split on CUDA in float32 and with --half: images/second, and whether
     the two agree on the top-1 class;
  2. predict.py --cam_visual --device 0 on 8 images for every --cam_type: ok/fail, seconds, PNGs written;
  3. in-process: the GradCAM map of a few images on CUDA equals the one on CPU, and GradCAM works on
     timm's test_vit on CUDA.
Prints one line per check; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.explain.cam import CAM_TYPES, cam_maps, find_cam_layer


def sh(*cmd: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *[str(c) for c in cmd]]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def folder_of(proc: subprocess.CompletedProcess) -> Path:
    return Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("predict folder: ")).split(": ", 1)[1])


def classes(folder: Path) -> list[str]:
    with (folder / "predictions.csv").open(newline="") as fh:
        return [row["class"] for row in csv.DictReader(fh)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/cam_cuda_check", help="work folder")
    parser.add_argument("--device", default="0", help="0 (CUDA); cpu = a dry run without the float16 and CUDA checks")
    parser.add_argument("--epoch_size", type=int, default=64, help="image size of the trained run")
    args = parser.parse_args()
    cuda = args.device != "cpu"
    if cuda and not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    device, size = args.device, args.epoch_size
    out = Path(args.out)
    results: list[tuple[str, bool, str]] = []
    split, run = out / "split", out / "runs" / "r18"
    if not (split / "test").is_dir():
        sh("processing.py", "--sample", "digits", "--data_path", out / "digits", "--output_path", split, "--force")
    if not (run / "best.pt").is_file():
        proc = sh("main.py", "--model_name", "resnet18", "--image_size", size, "--epoch", 1, "--batch_size", 64, "--device", device,
                  "--train_path", split / "train", "--val_path", split / "val", "--test_path", split / "test",
                  "--label_path", split / "label.txt", "--save_path", run)
        if proc.returncode:
            print(proc.stderr[-2000:])
            return 1

    # 1. plain prediction, fp32 and fp16
    tops = {}
    for name, extra in (("fp32", []), ("fp16", ["--half"]))[: 2 if cuda else 1]:
        t0 = time.perf_counter()
        proc = sh("predict.py", "--source", split / "test", "--save_path", run, "--device", device, "--batch_size", 256, *extra)
        ok = proc.returncode == 0
        rate = next((ln for ln in proc.stdout.splitlines() if "images/s" in ln), proc.stderr[-300:])
        results.append((f"predict {name}", ok, f"{rate} (whole command {time.perf_counter() - t0:.1f}s)"))
        if ok:
            tops[name] = classes(folder_of(proc))
    if len(tops) == 2:
        agree = sum(a == b for a, b in zip(tops["fp32"], tops["fp16"])) / max(1, len(tops["fp32"]))
        results.append(("fp16 top-1 agrees with fp32", agree >= 0.99, f"{agree:.2%}"))

    # 2. every CAM type through the CLI on CUDA
    for cam_type in CAM_TYPES:
        t0 = time.perf_counter()
        half = ["--half"] if cam_type == "GradCAM" and cuda else []  # float16 model: the CAM runs on a float32 copy
        proc = sh("predict.py", "--source", str(split / "test" / "3" / "*.png"), "--save_path", run, "--device", device,
                  "--cam_visual", "--cam_type", cam_type, "--batch_size", 32, *half)
        pngs = len(list((folder_of(proc) / "cam").glob("*.png"))) if proc.returncode == 0 else 0
        rows = len(classes(folder_of(proc))) if proc.returncode == 0 else -1
        detail = f"{pngs} PNGs for {rows} images, {time.perf_counter() - t0:.1f}s" if proc.returncode == 0 else proc.stderr[-400:]
        results.append((f"cam {cam_type} {' '.join(half)}", proc.returncode == 0 and pngs == rows > 0, detail))

    # 3. CUDA maps equal CPU maps; a ViT on CUDA
    import timm

    if not cuda:
        return report(results)

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    cpu = cam_maps(model, x, find_cam_layer(model, 64, 3), "GradCAM", [0, 1, 2, 3])
    gpu_model = model.cuda()
    gpu = cam_maps(gpu_model, x.cuda(), find_cam_layer(gpu_model, 64, 3), "GradCAM", [0, 1, 2, 3])
    diff = float(abs(cpu - gpu).max())
    results.append(("GradCAM CUDA == CPU", diff < 1e-2, f"max difference {diff:.2e}"))
    vit = timm.create_model("test_vit", num_classes=3).eval().cuda()
    maps = cam_maps(vit, torch.randn(2, 3, 160, 160, device="cuda"), find_cam_layer(vit, 160, 3), "GradCAM", [0, 1])
    results.append(("GradCAM test_vit on CUDA", maps.shape == (2, 160, 160) and bool((maps >= 0).all() and (maps <= 1).all()),
                    f"shape {maps.shape}"))

    return report(results)


def report(results: list[tuple[str, bool, str]]) -> int:
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
