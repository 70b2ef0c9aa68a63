"""One-shot check of the CUDA paths on a GPU machine (not a test: CI has no GPU).

    python benchmarks/cuda_check.py --out /tmp/cuda_check

It writes the digits sample, then:
  1. --batch_size -1 (autobatch) on CUDA; trains resnet18 with --amp (float16 + GradScaler), --ema, cutmix, RandAugment,
  2. resumes that run for more epochs on CUDA (--resume --epoch N), then metrice.py --half (test report, fps),
  3. runs best.pt in float32 and float16 on the test split and compares the predictions,
  4. measures inference images/second (CUDA-synchronised, after warm-up) at batch 1 and 256, fp32 and fp16,
  5. measures training images/second of one step (fp32 vs AMP) on in-memory tensors.
Prints one line per check and a PrettyTable of the speeds.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.core.checkpoint import load_checkpoint
from utils.data.loaders import EpochSampler, ImageDataset, build_loader
from utils.data.sources import scan_split
from utils.data.transforms import Normalize, eval_transform
from utils.models.registry import create_model
from utils.models.weights import model_from_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/cuda_check", help="work folder")
    parser.add_argument("--epoch", type=int, default=4)
    return parser


def sh(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "it/s]" not in ln and "s/it]" not in ln]
    print("\n".join(lines[-25:]), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def timed(fn, iters: int) -> float:
    """Median seconds of fn() over iters calls, CUDA-synchronised."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    out = Path(args.out)
    data = out / "split"
    sh([sys.executable, "processing.py", "--sample", "digits", "--data_path", str(out / "digits"), "--output_path", str(data), "--force"])
    common = ["--train_path", f"{data}/train", "--val_path", f"{data}/val", "--test_path", f"{data}/test",
              "--label_path", f"{data}/label.txt", "--image_size", "32", "--workers", "4"]
    sh([sys.executable, "main.py", "--model_name", "resnet18", "--amp", "--batch_size", "-1", "--epoch", "1",
        "--save_path", str(out / "runs" / "autobatch"), *common])
    print(f"CHECK autobatch: batch {load_checkpoint(out / 'runs' / 'autobatch' / 'last.pt')['args']['batch_size']}", flush=True)
    run = out / "runs" / "amp"
    sh([sys.executable, "main.py", "--model_name", "resnet18", "--amp", "--ema", "--mixup", "cutmix", "--Augment", "RandAugment",
        "--batch_size", "128", "--epoch", str(args.epoch // 2), "--save_path", str(run), *common])
    sh([sys.executable, "main.py", "--save_path", str(run), "--resume", "--epoch", str(args.epoch)])
    last = load_checkpoint(run / "last.pt")
    state = last.train_state
    print(f"CHECK amp+ema+cutmix+resume: last.pt epoch {last.epoch} batch {last.args['batch_size']} "
          f"scaler state {'present' if state.get('scaler') else 'MISSING'}, ema updates {state['ema']['updates']}", flush=True)
    sh([sys.executable, "metrice.py", "--save_path", str(run), "--task", "test", "--half", "--device", "0"])
    sh([sys.executable, "metrice.py", "--save_path", str(run), "--task", "fps", "--half", "--device", "0"])

    # fp32 vs fp16 inference on the test split
    ckpt = load_checkpoint(run / "best.pt")
    device = torch.device("cuda:0")
    model = model_from_checkpoint(ckpt).to(device)
    test = scan_split(f"{data}/test", class_names=ckpt.meta.class_names)
    loader = build_loader(ImageDataset(test.samples, eval_transform(ckpt.meta.preprocess), 3), 256,
                          EpochSampler(len(test.samples), shuffle=False), 2)
    norm = Normalize(ckpt.meta.preprocess.mean, ckpt.meta.preprocess.std).to(device)
    preds = {"fp32": [], "fp16": []}
    targets = []
    half = model_from_checkpoint(ckpt).to(device).half()
    with torch.inference_mode():
        for batch in loader:
            x = norm(batch["images"].to(device))
            preds["fp32"].append(model(x).float().softmax(1).cpu())
            preds["fp16"].append(half(x.half()).float().softmax(1).cpu())
            targets.append(batch["targets"])
    y = torch.cat(targets)
    p32, p16 = torch.cat(preds["fp32"]), torch.cat(preds["fp16"])
    print(f"CHECK fp16 inference: acc fp32 {(p32.argmax(1) == y).float().mean():.4f} fp16 {(p16.argmax(1) == y).float().mean():.4f} "
          f"top-1 agreement {(p32.argmax(1) == p16.argmax(1)).float().mean():.4f} max |dp| {(p32 - p16).abs().max():.2e}", flush=True)

    # speed
    rows = []
    for size in (32, 224):
        for bs in (1, 256):
            x = torch.randn(bs, 3, size, size, device=device)
            for name, m, xin in (("fp32", model, x), ("fp16", half, x.half())):
                with torch.inference_mode():
                    for _ in range(10):
                        m(xin)
                    sec = timed(lambda: m(xin), 30)
                rows.append((f"infer {name}", size, bs, bs / sec))
        net = create_model("resnet18", 10).to(device).train()
        opt = torch.optim.AdamW(net.parameters())
        scaler = torch.amp.GradScaler("cuda")
        x = torch.randn(128, 3, size, size, device=device)
        t = torch.randint(0, 10, (128,), device=device)

        def step(amp: bool) -> None:
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(net(x), t)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward() if amp else loss.backward()
            if amp:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        for amp in (False, True):
            for _ in range(5):
                step(amp)
            sec = timed(lambda: step(amp), 20)
            rows.append((f"train {'amp' if amp else 'fp32'}", size, 128, 128 / sec))
    print(f"{'what':<12} {'px':>4} {'batch':>6} {'images/s':>12}")
    for what, size, bs, ips in rows:
        print(f"{what:<12} {size:>4} {bs:>6} {ips:>12.0f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
