"""How well each unknown-image score tells trained classes from others (not a test): the figures
behind utils.infer.ood.DEFAULT_SCORE and the README's "Unknown images (--reject)".

    python benchmarks/ood_digits.py                              # resnet18, 32 px, 12 epochs, seeds 0 1 2
    python benchmarks/ood_digits.py --model_name resnet10t --seeds 0 --knn 1 5 10

scikit-learn's digits: a model is trained (main.py) on the digits 0-4 only, then metrice.py --task test
--ood_path compares its test images (in) with two folders of images of no trained class: near, every
digit 5-9, and far, noise (uniform colour noise and blurred grey noise) and tiles of scikit-learn's two
sample photos. Each row is one score, the mean and the range over the seeds of AUROC and of the false-
positive rate at 95% true-positive rate (what the score lets through when 95% of the trained digits are
kept); and at the thresholds main.py fitted on the val split (--reject_tpr 0.95), the share of the test
images --reject keeps known and the share of out images it calls unknown.
--knn also measures the k-nearest-neighbour distance of the normalised penultimate features (Sun et al.,
ICML 2022) to the training images', which would need every training feature in the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from prettytable import PrettyTable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IN_CLASSES = ("0", "1", "2", "3", "4")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--epoch", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--knn", type=int, nargs="*", default=[], help="also the kNN distance with these k")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".cache" / "ood"), help="work folder")
    return parser


def write_data(work: Path) -> None:
    """work/split (digits 0-4: train/val/test), work/near (digits 5-9), work/far (noise and photo tiles)."""
    if (work / "split" / "train").is_dir():
        return
    from processing import write_digits

    write_digits(work / "digits")
    for digit in sorted(p.name for p in (work / "digits").iterdir() if p.is_dir()):
        target = work / "in" / digit if digit in IN_CLASSES else work / "near"
        target.mkdir(parents=True, exist_ok=True)
        for image in (work / "digits" / digit).glob("*.png"):
            shutil.copy(image, target / image.name)
    run([sys.executable, "processing.py", "--data_path", str(work / "in"), "--output_path", str(work / "split"), "--force"])
    far = work / "far"
    far.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(far / f"noise_rgb_{i}.png")
        grey = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
        grey.save(far / f"noise_grey_{i}.png")
    from sklearn.datasets import load_sample_images

    for n, photo in enumerate(load_sample_images().images):
        for y in range(0, photo.shape[0] - 63, 64):
            for x in range(0, photo.shape[1] - 63, 64):
                Image.fromarray(photo[y:y + 64, x:x + 64]).save(far / f"photo{n}_{y}_{x}.png")


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:3])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def knn_scores(run_folder: Path, work: Path, ks: list[int], device: str) -> dict[str, dict[str, dict[str, float]]]:
    """{f"knn{k}": {"near": metrics, "far": metrics}}: the k-th smallest cosine-normalised feature distance to
    the training images (Sun et al., ICML 2022), scored as utils.evaluate.ood_report scores the others."""
    from utils.data.sources import scan_split
    from utils.evaluate.ood_report import ood_metrics
    from utils.evaluate.split import predict_split
    from utils.infer.ensemble import load_ensemble
    from utils.infer.sources import find_images

    ensemble = load_ensemble([run_folder], "torch", device)

    def features(samples: list[tuple[str, int]]) -> np.ndarray:
        feats = predict_split(ensemble, samples, 64, 0, features=True).features
        return feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)

    split = {s: scan_split(work / "split" / s, class_names=ensemble.class_names).samples for s in ("train", "test")}
    train, test = features(split["train"]), features(split["test"])
    outs = {name: features([(str(f), 0) for f in find_images(work / name).files]) for name in ("near", "far")}

    def kth(feats: np.ndarray, k: int) -> np.ndarray:
        distances = np.sqrt(np.maximum(2.0 - 2.0 * feats @ train.T, 0.0))
        return np.sort(distances, axis=1)[:, k - 1]

    return {f"knn{k}": {name: ood_metrics(kth(test, k), kth(feats, k)) for name, feats in outs.items()} for k in ks}


def measure(args: argparse.Namespace, work: Path, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """{score: {"near": {auroc, fpr95, out_unknown}, "far": ...}} of one seed's run."""
    runs = work / "runs" / f"{args.model_name}_{args.image_size}_{args.epoch}_seed{seed}"
    if not (runs / "best.pt").is_file():
        shutil.rmtree(runs, ignore_errors=True)
        data = work / "split"
        run([sys.executable, "main.py", "--model_name", args.model_name, "--image_size", str(args.image_size),
             "--epoch", str(args.epoch), "--batch_size", str(args.batch_size), "--workers", "0", "--seed", str(seed),
             "--device", args.device, "--train_path", f"{data}/train", "--val_path", f"{data}/val",
             "--test_path", f"{data}/test", "--save_path", str(runs)])
    found: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("near", "far"):
        out = run([sys.executable, "metrice.py", "--save_path", str(runs), "--task", "test", "--workers", "0",
                   "--device", args.device, "--ood_path", str(work / name)])
        folder = Path(next(line for line in out.splitlines() if line.startswith("results: ")).split(": ", 1)[1])
        section = json.loads((folder / "results.json").read_text())["ood"]
        for score, values in section.items():
            if isinstance(values, dict) and "auroc" in values:
                found.setdefault(score, {})[name] = values
    if args.knn:
        found |= knn_scores(runs, work, args.knn, args.device)
    return found


def main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    write_data(work)
    results = [measure(args, work, seed) for seed in args.seeds]
    table = PrettyTable(["score", "AUROC near", "AUROC far", "FPR95 near", "FPR95 far", "test known", "unknown near",
                         "unknown far"])
    table.title = (f"{args.model_name} {args.image_size}px {args.epoch} epochs on digits 0-4; near: 5-9, far: noise and "
                   f"photos; mean [min, max] of seeds {' '.join(map(str, args.seeds))}")

    def cell(score: str, where: str, key: str) -> str:
        values = [r[score][where][key] for r in results if key in r[score][where]]
        return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else "-"

    for score in results[0]:
        table.add_row([score, *(cell(score, w, k) for k in ("auroc", "fpr95") for w in ("near", "far")),
                       cell(score, "near", "in_known"), cell(score, "near", "out_unknown"), cell(score, "far", "out_unknown")])
    print(table)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
