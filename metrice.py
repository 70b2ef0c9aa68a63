"""Evaluate a trained run: metrics, reports, plots, mistakes, t-SNE, speed, ensembles.

    python metrice.py --save_path runs/exp --task test                   # best.pt on the run's test split
    python metrice.py --save_path runs/exp --task val --visual --tsne    # + correct/incorrect CSVs, gallery, t-SNE
    python metrice.py --save_path runs/exp --task fps                    # images/second at batch 1 and the run's batch
    python metrice.py --save_path runs/exp runs/exp2 --ensemble vote     # an ensemble, side by side with its members

Data paths, image size, preprocessing and class names come from the run (best.pt); flags
override them. Everything goes into <first run>/<task>/, a new folder per call (test, test2 ...).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from prettytable import PrettyTable
from tqdm import tqdm

from utils.backends import MODEL_TYPES, load_backend, predict_probs
from utils.checkpoint import Run, increment_path, load_checkpoint
from utils.config import ArgumentParser, args_to_dict
from utils.data import (EpochSampler, ImageDataset, build_loader, eval_transform, load_image, read_label_file,
                        report_skipped, run_with_tta, scan_split, tta_transform)
from utils.device import select_device
from utils.ensemble import ENSEMBLE_METHODS, check_same_classes, combine_probs
from utils.features import penultimate_features
from utils.log import UserError, run_cli
from utils.metrics import (METRIC_LABELS, PER_CLASS_FIELDS, calibration_bins, confusion_matrix_from,
                           most_confused_pairs, overall_metrics, per_class_metrics, pycm_matrix)
from utils.plots import plot_confusion_matrix, plot_embedding, plot_gallery, plot_reliability

LOGGER = logging.getLogger("metrice")

TASKS = ("train", "val", "test", "fps")
GALLERY_IMAGES = 32        # most confident mistakes drawn by --visual
CONFUSED_PAIRS = 20        # rows of confused_pairs.csv
TSNE_MAX_POINTS = 10_000   # t-SNE is quadratic-ish: a seeded sample beyond this
TOPK = 5                   # classes listed per image by --visual
# speed: warm up, then time single batches until both minimums are met (or the cap)
FPS_WARMUP_SECONDS, FPS_MIN_ITERS, FPS_MIN_SECONDS, FPS_MAX_SECONDS = 0.5, 20, 1.5, 20.0


def default_workers() -> int:
    """Loader processes: leave the compute threads a core of their own on small machines."""
    cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Evaluate a run of main.py (pytorch-classifier's metrice.py flags).")
    p = parser.add_argument
    p("--save_path", nargs="+", default=["runs/exp"],
      help="run folder(s), default runs/exp; several = an ensemble (same classes)")
    p("--task", default="test", choices=TASKS, help="split to evaluate, or fps to measure speed (default test)")
    p("--train_path", default=None, help="train split (default: the run's)")
    p("--val_path", default=None, help="val split (default: the run's)")
    p("--test_path", default=None, help="test split (default: the run's)")
    p("--label_path", default=None, help="class names to show, one per line (default: the run's class names)")
    p("--image_size", type=int, default=None, help="input size in pixels (default: the run's)")
    p("--batch_size", type=int, default=None, help="images per batch (default: the run's; fps: 1 and the run's)")
    p("--workers", type=int, default=default_workers(),
      help="data loader processes, 0 = main process (default: CPUs - 1, at most 4)")
    p("--device", default="", help="'' (GPU if any, the default), cpu, or a GPU index such as 0")
    p("--model_type", default="torch", choices=list(MODEL_TYPES),
      help="which model file of the run to evaluate (default torch: best.pt)")
    p("--half", action="store_true", help="float16 inference (CUDA only)")
    p("--test_tta", action="store_true", help="TenCrop test-time augmentation (probabilities averaged)")
    p("--visual", action="store_true", help="correct.csv, incorrect.csv and a gallery of the most confident mistakes")
    p("--tsne", action="store_true", help="t-SNE of the penultimate features (torch models)")
    p("--ensemble", default=None, choices=list(ENSEMBLE_METHODS),  # None: mean, or weighted with weights
      help="how several runs are combined (default mean; weighted with --ensemble_weights)")
    p("--ensemble_weights", type=float, nargs="+", default=None,
      help="one weight per run for --ensemble weighted (default: each run's best validation accuracy)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options."""
    args = get_args_parser().parse_args(argv)
    for name in ("image_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be a positive number, got {value}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if len(set(args.save_path)) != len(args.save_path):
        raise UserError(f"--save_path names a run twice: {' '.join(args.save_path)}")
    if args.ensemble_weights is not None:
        if args.ensemble not in (None, "weighted"):
            raise UserError(f"--ensemble_weights go with --ensemble weighted, not --ensemble {args.ensemble}")
        args.ensemble = "weighted"
        if len(args.ensemble_weights) != len(args.save_path):
            raise UserError(f"--ensemble_weights: {len(args.ensemble_weights)} weight(s) for {len(args.save_path)} run(s); "
                            "give one per --save_path")
    args.ensemble = args.ensemble or "mean"
    if args.tsne and args.model_type != "torch":
        raise UserError("--tsne reads the penultimate features inside the network: it needs --model_type torch")
    return args


# ------------------------------------------------------------------------------------ runs
@dataclass
class Member:
    """One run of the evaluation: its folder, best.pt's description, and the loaded backend."""

    path: Path
    label: str
    ckpt: dict[str, Any]
    backend: Any
    spec: dict[str, Any]


def open_run(path: str | Path) -> dict[str, Any]:
    """best.pt of a run folder without its weights (the backend loads those itself)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--save_path {path} is not a folder: pass the run folder main.py printed (runs/exp ...)")
    best = path / "best.pt"
    if not best.is_file():
        raise UserError(f"no best.pt in {path}: is it a run folder of main.py? (pass the folder --save_path named when training)")
    ckpt = load_checkpoint(best, what="best checkpoint")
    ckpt.pop("model", None)
    return ckpt


def member_spec(ckpt: dict[str, Any], meta: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The run's test-time preprocessing, at --image_size if given."""
    spec = dict(meta.get("preprocess") or ckpt["preprocess"])
    if image_size:
        spec["resize"] = spec["crop"] = int(image_size)
    return spec


def ensemble_weights(members: Sequence[Member], given: Sequence[float] | None) -> list[float]:
    """--ensemble_weights, or each run's best validation accuracy (training accuracy without a val set)."""
    if given is not None:
        return [float(w) for w in given]
    weights = []
    for m in members:
        metrics = m.ckpt.get("metrics") or {}
        split = "val" if metrics.get("val") else "train"
        if split == "train":
            LOGGER.warning("%s has no validation metrics: its weight is its training accuracy", m.path)
        acc = (metrics.get(split) or {}).get("acc")
        if acc is None:
            raise UserError(f"{m.path}/best.pt stores no accuracy to weight it by: pass --ensemble_weights")
        weights.append(float(acc))
    return weights


# --------------------------------------------------------------------------------- helpers
def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def fmt(value: Any) -> Any:
    """A table cell: floats to 4 decimals, nan as '-'."""
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.4f}"
    return value


def split_path(args: argparse.Namespace, run_args: dict[str, Any]) -> Path:
    """The folder of --task: the flag, else the run's own path for that split."""
    key = f"{args.task}_path"
    given = getattr(args, key)
    value = given if given is not None else run_args.get(key)
    if not value:
        raise UserError(f"--task {args.task}: the run has no {key}; pass --{key} DIR")
    path = Path(value)
    if not path.is_dir():
        origin = f"--{key}" if given is not None else f"the run's {key}"
        raise UserError(f"--task {args.task}: the {args.task} folder {path} ({origin}) does not exist or is not a folder; "
                        f"pass --{key} DIR")
    return path


def geometry(spec: dict[str, Any]) -> tuple[Any, ...]:
    """What decides the pixels a model gets (mean/std are applied inside each backend)."""
    return spec["resize"], spec["crop"], spec.get("resize_mode", "crop"), spec.get("interpolation"), spec["channels"]


# ------------------------------------------------------------------------------- prediction
def torch_features(backend: Any, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features of a TorchBackend's model for a uint8 batch."""
    x = backend.normalize(images.to(backend.device))
    return penultimate_features(backend.model, x.half() if backend.half else x)


def predict_split(members: Sequence[Member], samples: list[tuple[str, int]], batch_size: int, workers: int,
                  tta: bool, device: torch.device, tsne: bool, desc: str
                  ) -> tuple[list[int], np.ndarray, list[np.ndarray], np.ndarray | None]:
    """Probabilities of every member on every image; members with the same geometry share a pass.

    Returns:
        (indices of the images that decoded, targets, one (N, C) probability array per member,
        penultimate features of the first member or None).
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(geometry(m.spec), []).append(i)
    index_of = {path: i for i, (path, _) in enumerate(samples)}
    per_member: list[dict[int, np.ndarray]] = [{} for _ in members]
    features: dict[int, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    for group in groups.values():
        spec = members[group[0]].spec
        transform = tta_transform(spec) if tta else eval_transform(spec)
        loader = build_loader(ImageDataset(samples, transform, spec["channels"]), batch_size,
                              EpochSampler(len(samples), shuffle=False), workers, device.type == "cuda")
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
            if group[0] == 0:
                failed.extend(batch["failed"])
            if not len(batch["paths"]):
                continue
            rows = [index_of[p] for p in batch["paths"]]
            for i in group:
                probs = predict_probs(members[i].backend, batch["images"]).float().numpy()
                per_member[i].update(zip(rows, probs))
            if tsne and group[0] == 0:
                feats = run_with_tta(lambda x: torch_features(members[0].backend, x), batch["images"]).numpy()
                features.update(zip(rows, feats))
    report_skipped(failed, "images that failed to decode (left out of the evaluation)")
    keep = sorted(set.intersection(*(set(d) for d in per_member)))
    if not keep:
        raise UserError("no image of the split could be decoded")
    targets = np.array([samples[i][1] for i in keep], dtype=np.int64)
    probs = [np.stack([d[i] for i in keep]) for d in per_member]
    feats = np.stack([features[i] for i in keep]) if tsne else None
    return keep, targets, probs, feats


# ------------------------------------------------------------------------------------ speed
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(step: Callable[[], Any], device: torch.device) -> list[float]:
    """Seconds per call of step: after a warm-up, at least FPS_MIN_ITERS calls and FPS_MIN_SECONDS
    (at most FPS_MAX_SECONDS, and never fewer than 3 calls)."""
    start = time.perf_counter()
    warm = 0
    while warm < 3 or (time.perf_counter() - start < FPS_WARMUP_SECONDS and warm < 50):
        step()
        warm += 1
    _sync(device)
    times: list[float] = []
    total = 0.0
    while len(times) < 3 or ((len(times) < FPS_MIN_ITERS or total < FPS_MIN_SECONDS) and total < FPS_MAX_SECONDS):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return times


def measure_speed(member: Member, batch_size: int, tta: bool) -> list[dict[str, Any]]:
    """images/second of one backend on random uint8 batches already on its device (decoding
    and resizing excluded); for a PyTorch model in both memory formats."""
    spec = member.spec
    backend = member.backend
    device = getattr(backend, "device", torch.device("cpu"))
    shape = (batch_size, 10) if tta else (batch_size,)
    x = torch.randint(0, 256, (*shape, spec["channels"], spec["crop"], spec["crop"]), dtype=torch.uint8, device=device)
    model = getattr(backend, "model", None)
    # channels_last only where the model is a PyTorch module; exported runtimes choose their own layout
    formats = ["contiguous", "channels_last"] if isinstance(model, torch.nn.Module) else ["-"]
    rows = []
    for memory_format in formats:
        if memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
            inp = x.contiguous(memory_format=torch.channels_last) if not tta else x
        else:
            inp = x
        times = time_batches(lambda: predict_probs(backend, inp), device)
        if memory_format == "channels_last":
            model.to(memory_format=torch.contiguous_format)
        median = statistics.median(times)
        rows.append({"run": member.label, "batch_size": batch_size, "memory_format": memory_format,
                     "images_per_s": batch_size / median, "ms_per_image": median * 1000 / batch_size,
                     "batch_ms_median": median * 1000, "batch_ms_p10": float(np.percentile(times, 10)) * 1000,
                     "batch_ms_p90": float(np.percentile(times, 90)) * 1000, "iterations": len(times)})
    best = max(rows, key=lambda r: r["images_per_s"])
    for r in rows:
        r["fastest"] = r is best
    return rows


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the compute threads in use."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}"


def run_speed(args: argparse.Namespace, members: Sequence[Member], device: torch.device, out: Run) -> list[dict[str, Any]]:
    rows = []
    for m in members:
        sizes = [args.batch_size] if args.batch_size else sorted({1, int(m.ckpt["args"].get("batch_size") or 1)})
        for bs in sizes:
            rows.extend(measure_speed(m, bs, args.test_tta))
    table = PrettyTable(["run", "batch", "memory format", "images/s", "ms/image", "batch ms (median)", "p10-p90 ms", "iterations"])
    table.title = (f"speed: {args.model_type} on {device_name(device)}{', float16' if args.half else ''}"
                   f"{', TenCrop TTA' if args.test_tta else ''}")
    for r in rows:
        table.add_row([r["run"], r["batch_size"], r["memory_format"] + (" *" if r["fastest"] and r["memory_format"] != "-" else ""),
                       f"{r['images_per_s']:.1f}", f"{r['ms_per_image']:.3f}", f"{r['batch_ms_median']:.3f}",
                       f"{r['batch_ms_p10']:.2f}-{r['batch_ms_p90']:.2f}", r["iterations"]])
    print(table, flush=True)
    print("the model alone: random uint8 batches already on the device (no decoding or resizing), the median batch "
          "time after a warm-up; * = the faster memory format", flush=True)
    for m in members:
        best = {}
        for r in rows:
            if r["run"] == m.label and r["fastest"]:
                best[r["batch_size"]] = r
        for bs, r in sorted(best.items()):
            layout = f" ({r['memory_format']})" if r["memory_format"] != "-" else ""
            print(f"{m.label}: batch {bs}: {r['images_per_s']:.1f} images/s, {r['ms_per_image']:.3f} ms/image{layout}",
                  flush=True)
    fields = ["run", "batch_size", "memory_format", "fastest", "images_per_s", "ms_per_image", "batch_ms_median",
              "batch_ms_p10", "batch_ms_p90", "iterations", "device", "half", "test_tta"]
    write_csv(out / "fps.csv", fields, [[r.get(f) for f in fields[:10]] + [device_name(device), args.half, args.test_tta]
                                        for r in rows])
    return rows


# --------------------------------------------------------------------------------- reports
def print_overall(results: dict[str, dict[str, float]]) -> None:
    table = PrettyTable(["metric", *results])
    table.title = "overall"
    keys = [k for k in METRIC_LABELS if any(k in r for r in results.values())]
    for key in keys:
        cells = [int(r[key]) if key == "images" else fmt(r.get(key, float("nan"))) for r in results.values()]
        table.add_row([METRIC_LABELS[key], *cells])
    table.align["metric"] = "l"
    print(table, flush=True)


def print_per_class(rows: list[dict[str, Any]], title: str) -> None:
    table = PrettyTable(PER_CLASS_FIELDS)
    table.title = title
    for row in rows:
        table.add_row([fmt(row[f]) if f != "class" else str(row[f]) for f in PER_CLASS_FIELDS])
    table.align["class"] = "l"
    print(table, flush=True)


def topk_columns(probs: np.ndarray, class_names: list[str]) -> tuple[list[str], list[list[Any]]]:
    k = min(TOPK, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    header = [h for j in range(1, k + 1) for h in (f"top{j}_class", f"top{j}_probability")]
    cells = [[v for c in row_order for v in (class_names[c], f"{probs[r, c]:.6f}")] for r, row_order in enumerate(order)]
    return header, cells


def write_visual(out: Run, samples: list[tuple[str, int]], keep: list[int], targets: np.ndarray, probs: np.ndarray,
                 class_names: list[str], spec: dict[str, Any]) -> tuple[int, int]:
    """correct.csv and incorrect.csv (most confident first) and a gallery of the worst mistakes."""
    preds = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    top_header, top_cells = topk_columns(probs, class_names)
    header = ["path", "true_class", "predicted_class", "probability", "true_class_probability", *top_header]
    counts = []
    for name, wanted in (("correct.csv", True), ("incorrect.csv", False)):
        idx = [r for r in np.argsort(-confidence, kind="stable") if (preds[r] == targets[r]) == wanted]
        write_csv(out / name, header, [[samples[keep[r]][0], class_names[targets[r]], class_names[preds[r]],
                                        f"{confidence[r]:.6f}", f"{probs[r, targets[r]]:.6f}", *top_cells[r]] for r in idx])
        counts.append(len(idx))
    mistakes = [r for r in np.argsort(-confidence, kind="stable") if preds[r] != targets[r]][:GALLERY_IMAGES]
    if mistakes:
        transform = eval_transform(spec)
        images = [transform(load_image(samples[keep[r]][0], spec["channels"])) for r in mistakes]
        titles = [f"{Path(samples[keep[r]][0]).name[:22]}\ntrue {class_names[targets[r]][:16]}\n"
                  f"pred {class_names[preds[r]][:16]} {confidence[r]:.2f}" for r in mistakes]
        out.savefig(plot_gallery(images, titles, f"the {len(mistakes)} most confident mistakes"), "incorrect.png")
    return counts[0], counts[1]


def write_tsne(out: Run, samples: list[tuple[str, int]], keep: list[int], targets: np.ndarray, feats: np.ndarray,
               class_names: list[str], label: str) -> None:
    from sklearn.manifold import TSNE

    n = len(feats)
    if n < 4:
        LOGGER.warning("--tsne: %d image(s) are too few for a t-SNE; skipped", n)
        return
    rows = np.arange(n)
    if n > TSNE_MAX_POINTS:
        rows = np.sort(np.random.default_rng(0).choice(n, TSNE_MAX_POINTS, replace=False))
        LOGGER.info("--tsne: a random sample of %d of the %d images", TSNE_MAX_POINTS, n)
    perplexity = float(min(30.0, max(1.0, (len(rows) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=0).fit_transform(
        feats[rows].astype(np.float64))
    write_csv(out / "tsne.csv", ["path", "class", "x", "y"],
              [[samples[keep[r]][0], class_names[targets[r]], f"{x:.6f}", f"{y:.6f}"] for r, (x, y) in zip(rows, points)])
    out.savefig(plot_embedding(points, targets[rows], class_names,
                               f"t-SNE of the penultimate features ({label}, {len(rows)} images, {feats.shape[1]}-d)"),
                "tsne.png")


def write_reports(out: Run, targets: np.ndarray, probs: np.ndarray, class_names: list[str],
                  results: dict[str, dict[str, float]], title: str) -> list[dict[str, Any]]:
    """Every file of the final prediction (the ensemble's, or the single run's); returns the per-class rows."""
    confusion = confusion_matrix_from(targets, probs.argmax(axis=1), len(class_names))
    cm = pycm_matrix(confusion, class_names)
    per_class = per_class_metrics(targets, probs, class_names, cm)

    labels = list(results)
    write_csv(out / "metrics.csv", ["metric", *(["value"] if len(labels) == 1 else labels)],
              [[key, *[(int(r[key]) if key == "images" else r.get(key, float("nan"))) for r in results.values()]]
               for key in METRIC_LABELS if any(key in r for r in results.values())])
    write_csv(out / "per_class.csv", PER_CLASS_FIELDS, [[row[f] for f in PER_CLASS_FIELDS] for row in per_class])
    write_csv(out / "confusion_matrix.csv", ["true \\ predicted", *class_names],
              [[name, *confusion[i].tolist()] for i, name in enumerate(class_names)])
    totals = confusion.sum(axis=1, keepdims=True)
    normalized = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    write_csv(out / "confusion_matrix_normalized.csv", ["true \\ predicted", *class_names],
              [[name, *[f"{v:.6f}" for v in normalized[i]]] for i, name in enumerate(class_names)])
    pairs = most_confused_pairs(confusion, class_names, CONFUSED_PAIRS)
    write_csv(out / "confused_pairs.csv", ["true_class", "predicted_class", "count", "fraction_of_true_class"],
              [[p["true"], p["predicted"], p["count"], f"{p['fraction_of_true']:.6f}"] for p in pairs])
    out.savefig(plot_confusion_matrix(confusion, class_names, False, f"confusion matrix: {title}"), "confusion_matrix.png")
    out.savefig(plot_confusion_matrix(confusion, class_names, True, f"confusion matrix, rows normalised: {title}"),
                "confusion_matrix_normalized.png")
    out.savefig(plot_reliability(calibration_bins(targets, probs), title), "calibration.png")
    status = cm.save_html(str(out / "pycm_report"))  # pycm adds .html
    if not status.get("Status", False):
        LOGGER.warning("pycm report not written: %s", status.get("Message"))
    if pairs:
        shown = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in pairs[:5])
        print(f"most confused: {shown}", flush=True)
    return per_class


# ------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate (or time) the runs in --save_path; returns the output folder and the metrics."""
    device = select_device(args.device)
    paths = [Path(p) for p in args.save_path]
    ckpts = [open_run(p) for p in paths]
    # the class list and the split are checked before any model is built: mistakes fail fast
    model_classes = check_same_classes(ckpts, [str(p) for p in paths])
    class_names = list(model_classes)
    if args.label_path is not None:
        if not Path(args.label_path).is_file():
            raise UserError(f"--label_path {args.label_path} not found")
        class_names = read_label_file(args.label_path)
        if len(class_names) != len(model_classes):
            raise UserError(f"--label_path {args.label_path} lists {len(class_names)} names; the model has "
                            f"{len(model_classes)} classes")
    run_args = dict(ckpts[0].get("args") or {})
    image_set = None
    if args.task != "fps":
        folder = split_path(args, run_args)
        image_set = scan_split(folder, class_names=model_classes, what=f"{args.task} set")
        report_skipped(image_set.skipped, f"{args.task} set {folder}")

    members = []
    for path, ckpt in zip(paths, ckpts):
        backend = load_backend(path, args.model_type, device, args.half)
        if list(backend.meta["class_names"]) != list(model_classes):
            raise UserError(f"the {args.model_type} model of {path} has other classes than its best.pt: export it again")
        members.append(Member(path, str(path), ckpt, backend, member_spec(ckpt, backend.meta, args.image_size)))
    first = members[0]

    if args.task == "fps":
        for flag in ("visual", "tsne"):
            if getattr(args, flag):
                LOGGER.warning("--%s does nothing with --task fps", flag)
        out = Run(increment_path(first.path / "fps"))
        out.write_yaml("args.yaml", args_to_dict(args) | {"class_names": class_names})
        rows = run_speed(args, members, device, out)
        print(f"results: {out.path}", flush=True)
        return {"output": out.path, "speed": rows}

    batch_size = args.batch_size or int(run_args.get("batch_size") or 32)
    if batch_size <= 0:
        batch_size = 32
    weights = ensemble_weights(members, args.ensemble_weights) if len(members) > 1 and args.ensemble == "weighted" else None

    out = Run(increment_path(first.path / args.task))
    out.write_yaml("args.yaml", args_to_dict(args) | {"split": str(folder), "images": len(image_set.samples),
                                                      "class_names": class_names, "members": [m.label for m in members],
                                                      "ensemble_weights": weights})
    what = f"{args.task} set {folder} ({len(image_set.samples)} images, {len(class_names)} classes)"
    print(f"evaluating {', '.join(m.label for m in members)} ({args.model_type}) on {what}, device {device}"
          + (", TenCrop TTA" if args.test_tta else ""), flush=True)
    keep, targets, probs, feats = predict_split(members, image_set.samples, batch_size, args.workers, args.test_tta,
                                                device, args.tsne, args.task)

    results: dict[str, dict[str, float]] = {}
    if len(members) > 1:
        final = combine_probs([torch.from_numpy(p) for p in probs], args.ensemble, weights).numpy()
        name = f"ensemble ({args.ensemble})"
        results[name] = overall_metrics(targets, final, class_names)
        for m, p in zip(members, probs):
            results[m.label] = overall_metrics(targets, p, class_names)
        if weights:
            print("ensemble weights: " + ", ".join(f"{m.label} {w:.4f}" for m, w in zip(members, weights)), flush=True)
    else:
        final = probs[0]
        name = first.label
        results[name] = overall_metrics(targets, final, class_names)

    print_overall(results)
    per_class = write_reports(out, targets, final, class_names, results, f"{name}, {args.task}")
    print_per_class(per_class, f"per class: {name}, {args.task}")
    visual = None
    if args.visual:
        visual = write_visual(out, image_set.samples, keep, targets, final, class_names, first.spec)
        print(f"--visual: {visual[0]} correct, {visual[1]} incorrect", flush=True)
    if args.tsne and feats is not None:
        write_tsne(out, image_set.samples, keep, targets, feats, class_names, first.label)
    print(f"results: {out.path}", flush=True)
    return {"output": out.path, "metrics": results, "per_class": per_class, "visual": visual}


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
