"""Load test of serve.py on loopback: requests/s and latency percentiles per deployment (not a test).

    python benchmarks/serve_load.py                                  # resnet18 at 64 px, trained here for 1 epoch
    python benchmarks/serve_load.py --save_path runs/exp --requests 300 --concurrency 1 8 32
    python benchmarks/serve_load.py --deployments embedded redis-2 --batching on

For each deployment (embedded: one serve.py process; redis-1 / redis-2: a redis-server, the API
tier and 1 or 2 `serve.py --worker` processes) and each batching setting (on: --max_batch
--max_wait_ms as given; off: --max_batch 1), it starts the processes on 127.0.0.1 (free ports),
sends --warmup untimed requests, then, for each --concurrency, --requests timed POST /predict
requests of one image each from that many concurrent clients (one asyncio httpx client in this
process, images cycled from a small in-memory set). It prints one row per cell: requests/s
(requests / wall time of the cell), p50/p95/p99 latency in ms, the mean batch size the model ran
(from /metrics) and the errors (any non-200), and writes serve_load.csv into --out.

The load generator shares the machine with the servers: on a small VM it takes a good part of a
core, and every figure is for this machine as a whole. The processes that run the model share
all cores but one (left to the HTTP tier and the load generator): --threads (cores - 1) / model
processes, at least 1 (--threads overrides). Nothing leaves loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
from PIL import Image
from prettytable import PrettyTable

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEPLOYMENTS = ("embedded", "redis-1", "redis-2")
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p = parser.add_argument
    p("--save_path", default="", help="run folder to serve; '' = train --model_name for 1 epoch into --out first")
    p("--model_name", default="resnet18", help="model trained when --save_path is not given")
    p("--image_size", type=int, default=64, help="its input size")
    p("--out", default="", help="work folder (run, logs, serve_load.csv); '' = a temporary folder")
    p("--requests", type=int, default=200, help="timed requests per cell (at most 2000)")
    p("--warmup", type=int, default=20, help="untimed requests after each start")
    p("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p("--deployments", nargs="+", default=list(DEPLOYMENTS), choices=DEPLOYMENTS)
    p("--batching", nargs="+", default=["on", "off"], choices=["on", "off"])
    p("--max_batch", type=int, default=16, help="--max_batch with batching on")
    p("--max_wait_ms", type=float, default=2.0, help="--max_wait_ms with batching on")
    p("--threads", type=int, default=0, help="torch threads per model process; 0 = cores / model processes")
    p("--image_px", type=int, default=96, help="side of the uploaded images")
    return parser


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Procs:
    """Subprocesses with logs, all stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[tuple[subprocess.Popen, Any]] = []

    def start(self, name: str, cmd: list[Any], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("w")
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ) | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"} | (env or {}))
        self.procs.append((proc, log))
        return proc

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


def wait_ready(url: str, procs: Procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in procs.procs:
            if proc.poll() is not None:
                raise SystemExit(f"a process exited ({proc.returncode}); see {log.name}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {timeout:.0f}s; logs in {procs.folder}")


@contextmanager
def deployment(kind: str, batching: str, run: Path, args: argparse.Namespace, folder: Path) -> Iterator[str]:
    """Start one deployment; yields its base URL."""
    folder.mkdir(parents=True, exist_ok=True)
    procs = Procs(folder)
    batch = ["--max_batch", args.max_batch, "--max_wait_ms", args.max_wait_ms] if batching == "on" else ["--max_batch", 1]
    workers = 0 if kind == "embedded" else int(kind.split("-")[1])
    threads = args.threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, workers))
    port = free_port()
    url = f"http://{HOST}:{port}"
    try:
        if kind == "embedded":
            procs.start("server", [sys.executable, "serve.py", "--save_path", run, "--device", "cpu", "--port", port,
                                   "--threads", threads, *batch])
        else:
            redis_port = free_port()
            procs.start("redis", ["redis-server", "--bind", HOST, "--port", redis_port, "--save", "", "--appendonly", "no",
                                  "--dir", folder])
            queue = f"redis://{HOST}:{redis_port}/0"
            time.sleep(0.5)
            for i in range(workers):
                procs.start(f"worker{i}", [sys.executable, "serve.py", "--worker", "--queue", queue, "--save_path", run,
                                           "--device", "cpu", "--threads", threads, *batch])
            procs.start("api", [sys.executable, "serve.py", "--queue", queue, "--port", port])
        wait_ready(url, procs)
        if workers:  # every worker registered (the API is ready with the first)
            deadline = time.monotonic() + 120
            while httpx.get(url + "/info", timeout=5).json().get("workers", 0) < workers and time.monotonic() < deadline:
                time.sleep(0.3)
        yield url
    finally:
        procs.close()


# ------------------------------------------------------------------------------ load
def make_images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = np.tile(np.array(COLOURS[i % len(COLOURS)], dtype=np.float64), (size, size, 1)) + rng.normal(0, 12, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def load(url: str, images: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float], int]:
    """`requests` POSTs from `concurrency` clients: (wall seconds, latencies in s, non-200 answers)."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one_client() -> None:
            nonlocal errors
            for i in counter:
                t0 = time.perf_counter()
                response = await client.post("/predict", files=[("file", (f"{i}.png", images[i % len(images)], "image/png"))])
                latencies.append(time.perf_counter() - t0)
                errors += response.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, errors


def batch_stats(url: str) -> tuple[float, float]:
    """(images, batches) the model has run so far, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    images = float(re.search(r"^serve_batch_size_sum (\S+)", text, re.M).group(1))
    batches = float(re.search(r"^serve_batches_total (\S+)", text, re.M).group(1))
    return images, batches


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ------------------------------------------------------------------------------ main
def train_run(args: argparse.Namespace, out: Path) -> Path:
    run = out / "run"
    if (run / "best.pt").is_file():
        return run
    data = out / "data"
    for split, n in (("train", 16), ("val", 4)):
        for k, colour in enumerate(COLOURS):
            folder = data / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, png in enumerate(make_images(n, args.image_size)):
                if i % len(COLOURS) == k:
                    (folder / f"{i}.png").write_bytes(png)
    cmd = [sys.executable, "main.py", "--model_name", args.model_name, "--image_size", args.image_size, "--epoch", 1,
           "--batch_size", 16, "--workers", 0, "--device", "cpu", "--train_path", data / "train", "--val_path", data / "val",
           "--test_path", data / "none", "--label_path", data / "label.txt", "--save_path", run]
    print("$ main.py ... (1 epoch of", args.model_name, "at", args.image_size, "px)", flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return run


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not 1 <= args.requests <= 2000:
        raise SystemExit("--requests must be 1..2000 (a bounded load test)")
    if any(d.startswith("redis") for d in args.deployments) and not shutil.which("redis-server"):
        raise SystemExit("the redis deployments need redis-server: apt-get install -y redis-server")
    with ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve_load_")))
        out.mkdir(parents=True, exist_ok=True)
        run = Path(args.save_path) if args.save_path else train_run(args, out)
        images = make_images(16, args.image_px)
        rows: list[dict[str, Any]] = []
        for kind in args.deployments:
            for batching in args.batching:
                with deployment(kind, batching, run, args, out / f"{kind}-{batching}") as url:
                    asyncio.run(load(url, images, args.warmup, 4))
                    for conc in args.concurrency:
                        before = batch_stats(url)
                        seconds, lat, errors = asyncio.run(load(url, images, args.requests, conc))
                        after = batch_stats(url)
                        batches = after[1] - before[1]
                        row = {"deployment": kind, "batching": batching, "concurrency": conc, "requests": args.requests,
                               "req_per_s": args.requests / seconds, "p50_ms": 1000 * percentile(lat, 50),
                               "p95_ms": 1000 * percentile(lat, 95), "p99_ms": 1000 * percentile(lat, 99),
                               "mean_batch": (after[0] - before[0]) / batches if batches else float("nan"), "errors": errors}
                        rows.append(row)
                        print(f"{kind:9s} batching {batching:3s} c={conc:<3d} {row['req_per_s']:7.1f} req/s  "
                              f"p50 {row['p50_ms']:6.1f}  p95 {row['p95_ms']:6.1f}  p99 {row['p99_ms']:6.1f} ms  "
                              f"batch {row['mean_batch']:.2f}  errors {errors}", flush=True)
        report(rows, out, args, run)
        return rows


def report(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace, run: Path) -> None:
    table = PrettyTable(["deployment", "batching", "concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "errors"])
    table.title = (f"serve.py on {run} ({os.cpu_count()} CPUs), {args.requests} requests of one {args.image_px}px PNG per cell, "
                   f"batching on = --max_batch {args.max_batch} --max_wait_ms {args.max_wait_ms:g}")
    for r in rows:
        table.add_row([r["deployment"], r["batching"], r["concurrency"], f"{r['req_per_s']:.1f}", f"{r['p50_ms']:.1f}",
                       f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}", r["errors"]])
    print(table, flush=True)
    with (out / "serve_load.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.out:
        print(f"written: {out / 'serve_load.csv'}")
    stats = {(r["deployment"], r["concurrency"]): r for r in rows if r["batching"] == "on"}
    for (kind, conc), on in stats.items():
        off = next((r for r in rows if r["deployment"] == kind and r["concurrency"] == conc and r["batching"] == "off"), None)
        if off and conc == 8:
            print(f"{kind}, concurrency 8: batching on {on['req_per_s']:.1f} vs off {off['req_per_s']:.1f} req/s "
                  f"({on['req_per_s'] / off['req_per_s']:.2f}x)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
