"""Load test of serve.py on loopback: requests/s and latency percentiles per deployment (not a test).

    python benchmarks/serve_load.py                                  # resnet18 at 64 px, trained here for 1 epoch
    python benchmarks/serve_load.py --save_path runs/exp --requests 300 --concurrency 1 8 32
    python benchmarks/serve_load.py --deployments embedded redis-2 --batching on

For each deployment (embedded: one serve.py process; redis-1 / redis-2: a redis-server, the API
tier and 1 or 2 `serve.py --worker` processes) and each batching setting (on: --max_batch
--max_wait_ms as given; off: --max_batch 1), it starts the processes on 127.0.0.1 (free ports),
sends --warmup untimed requests, then, for each --concurrency, --requests timed POST /predict
requests of one image each from that many concurrent clients (asyncio in this process, images
cycled from a small in-memory set; --client raw: keep-alive HTTP/1.1 on plain sockets, each
request's bytes built once, so that the generator takes little of the CPU it shares with the
server; --client httpx: an httpx.AsyncClient, about ten times the CPU per request). It prints one
row per cell: requests/s and images/s (per wall time of the cell), p50/p95/p99 latency in ms, the
mean batch size the model ran (from /metrics), the errors (any non-200), the CPU time per request
of the load generator and of the deployment's processes, and the ratio of the images/s to the
bare batched forward of the same model: predict_probs on uint8 batches in memory, at the
server's batch (--max_batch with batching on, 1 off) and compute threads, in a process of its
own, timed before the deployment starts and after it stops (both shown: their drift is the
machine's). It writes serve_load.csv into --out and ends with the figure of issue 28:

    embedded, batching on, concurrency 32: 70.9 images/s = 0.64 of the bare forward (111.0 images/s, batch 16, 1 thread)

The load generator shares the machine with the servers, and every figure is for this machine as
a whole. The processes that run the model share all cores but one (left to the HTTP tier and
the load generator): --threads (cores - 1) / model processes, at least 1 (--threads overrides).
Nothing leaves loopback.
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

import resource

import httpx
import numpy as np
from PIL import Image
from prettytable import PrettyTable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the bare forward's process imports utils
    sys.path.insert(0, str(ROOT))
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
    p("--client", default="raw", choices=["raw", "httpx"], help="load generator: raw sockets (cheap) or httpx")
    p("--bare_seconds", type=float, default=2.0, help="timed seconds of each bare forward measurement")
    p("--bare", nargs=2, type=int, metavar=("THREADS", "BATCH"), help=argparse.SUPPRESS)  # the bare forward's process
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

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the running processes have taken so far (Linux /proc)."""
        total = 0.0
        for proc, _ in self.procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

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
def deployment(kind: str, batching: str, run: Path, args: argparse.Namespace, folder: Path) -> Iterator[tuple[str, Procs]]:
    """Start one deployment; yields its base URL and its processes."""
    folder.mkdir(parents=True, exist_ok=True)
    procs = Procs(folder)
    batch = ["--max_batch", args.max_batch, "--max_wait_ms", args.max_wait_ms] if batching == "on" else ["--max_batch", 1]
    threads = model_threads(kind, args)
    workers = 0 if kind == "embedded" else int(kind.split("-")[1])
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
        yield url, procs
    finally:
        procs.close()


def model_threads(kind: str, args: argparse.Namespace) -> int:
    """The compute threads of each model process of a deployment."""
    workers = 0 if kind == "embedded" else int(kind.split("-")[1])
    return args.threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, workers))


# ------------------------------------------------------------------------------ the bare forward
def bare_forward(run: Path, threads: int, batch: int, seconds: float) -> float:
    """images/s of the model's forward pass and softmax on uint8 batches in memory (predict_probs,
    as the server runs it), `batch` images at a time on `threads` threads: the median call.
    Called in a process of its own (--bare), so that the load generator never imports torch."""
    import torch

    from utils.core.device import set_threads
    from utils.infer.backends import load_backend, predict_probs
    from utils.infer.speed import time_batches

    set_threads(threads)
    backend = load_backend(run, "torch", torch.device("cpu"))
    spec = backend.meta.preprocess
    x = np.random.default_rng(0).integers(0, 256, (batch, spec.channels, spec.crop, spec.crop), dtype=np.uint8)
    times = time_batches(lambda: predict_probs(backend, x), min_seconds=seconds, max_seconds=4 * seconds)
    return batch / float(np.median(times))


def measure_bare(run: Path, threads: int, batch: int, args: argparse.Namespace) -> float:
    """bare_forward in a subprocess (the threads set as serve.py sets them)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--save_path", str(run), "--bare", str(threads), str(batch),
           "--bare_seconds", str(args.bare_seconds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ) | {"HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"the bare forward failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


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


def request_bytes(url: str, png: bytes, name: str) -> bytes:
    """One whole POST /predict of one image, as the raw client sends it (HTTP/1.1, keep-alive)."""
    boundary = "serve-load-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {url.split('//', 1)[1]}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def raw_load(url: str, images: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float], int]:
    """As load(), with one socket per client and each answer's status line and Content-Length parsed
    (the JSON is not): the same requests for a small part of httpx's CPU."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    payloads = [request_bytes(url, png, f"{i}.png") for i, png in enumerate(images)]
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def one_client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                t0 = time.perf_counter()
                writer.write(payloads[i % len(payloads)])
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                length = re.search(rb"\r\ncontent-length: *(\d+)", head)
                if length is None:
                    raise SystemExit(f"an answer without Content-Length: {head[:200]!r}")
                await reader.readexactly(int(length.group(1)))
                latencies.append(time.perf_counter() - t0)
                errors += not head.startswith(b"http/1.1 200 ")
                if b"\r\nconnection: close" in head:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

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


def run_cell(url: str, procs: Procs, images: list[bytes], conc: int, args: argparse.Namespace) -> dict[str, Any]:
    """One cell: --requests from `conc` clients, with the CPU the generator and the servers took."""
    generate = raw_load if args.client == "raw" else load
    before, cpu0, own0 = batch_stats(url), procs.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    seconds, lat, errors = asyncio.run(generate(url, images, args.requests, conc))
    after, cpu1, own1 = batch_stats(url), procs.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    own = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    batches = after[1] - before[1]
    return {"concurrency": conc, "requests": args.requests, "req_per_s": args.requests / seconds,
            "img_per_s": (after[0] - before[0]) / seconds, "p50_ms": 1000 * percentile(lat, 50),
            "p95_ms": 1000 * percentile(lat, 95), "p99_ms": 1000 * percentile(lat, 99),
            "mean_batch": (after[0] - before[0]) / batches if batches else float("nan"), "errors": errors,
            "client_cpu_ms": 1000 * own / args.requests, "server_cpu_ms": 1000 * (cpu1 - cpu0) / args.requests}


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.bare:
        print(f"{bare_forward(Path(args.save_path), args.bare[0], args.bare[1], args.bare_seconds):.3f}")
        return []
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
                threads, batch = model_threads(kind, args), args.max_batch if batching == "on" else 1
                bare_before = measure_bare(run, threads, batch, args)
                cells = []
                with deployment(kind, batching, run, args, out / f"{kind}-{batching}") as (url, procs):
                    asyncio.run(load(url, images, args.warmup, 4))
                    for conc in args.concurrency:
                        cells.append({"deployment": kind, "batching": batching} | run_cell(url, procs, images, conc, args))
                bare_after = measure_bare(run, threads, batch, args)
                for row in cells:
                    row |= {"threads": threads, "bare_batch": batch, "bare_before": bare_before, "bare_after": bare_after,
                            "ratio": row["img_per_s"] / ((bare_before + bare_after) / 2)}
                    print(f"{kind:9s} batching {batching:3s} c={row['concurrency']:<3d} {row['req_per_s']:7.1f} req/s "
                          f"{row['img_per_s']:7.1f} img/s  p50 {row['p50_ms']:6.1f}  p95 {row['p95_ms']:6.1f}  "
                          f"p99 {row['p99_ms']:6.1f} ms  batch {row['mean_batch']:.2f}  errors {row['errors']}  "
                          f"cpu/request: client {row['client_cpu_ms']:.2f} ms, servers {row['server_cpu_ms']:.2f} ms  "
                          f"bare {bare_before:.1f}/{bare_after:.1f} img/s  ratio {row['ratio']:.2f}", flush=True)
                rows += cells
        report(rows, out, args, run)
        return rows


def report(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace, run: Path) -> None:
    table = PrettyTable(["deployment", "batching", "concurrency", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms",
                         "mean batch", "errors", "client CPU ms/req", "server CPU ms/req", "bare img/s", "ratio"])
    table.title = (f"serve.py on {run} ({os.cpu_count()} CPUs), {args.requests} requests of one {args.image_px}px PNG per cell "
                   f"({args.client} client), batching on = --max_batch {args.max_batch} --max_wait_ms {args.max_wait_ms:g}")
    for r in rows:
        table.add_row([r["deployment"], r["batching"], r["concurrency"], f"{r['req_per_s']:.1f}", f"{r['img_per_s']:.1f}",
                       f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}",
                       r["errors"], f"{r['client_cpu_ms']:.2f}", f"{r['server_cpu_ms']:.2f}",
                       f"{r['bare_before']:.1f}/{r['bare_after']:.1f}", f"{r['ratio']:.2f}"])
    print(table, flush=True)
    with (out / "serve_load.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.out:
        print(f"written: {out / 'serve_load.csv'}")
    for on in rows:
        off = next((r for r in rows if r["deployment"] == on["deployment"] and r["concurrency"] == 8
                    and r["batching"] == "off"), None)
        if on["batching"] == "on" and on["concurrency"] == 8 and off:
            print(f"{on['deployment']}, concurrency 8: batching on {on['req_per_s']:.1f} vs off {off['req_per_s']:.1f} req/s "
                  f"({on['req_per_s'] / off['req_per_s']:.2f}x)")
    for r in rows:
        if r["batching"] == "on" and r["concurrency"] == 32:
            bare = (r["bare_before"] + r["bare_after"]) / 2
            print(f"{r['deployment']}, batching on, concurrency 32: {r['img_per_s']:.1f} images/s = {r['ratio']:.2f} of the "
                  f"bare forward ({bare:.1f} images/s, batch {r['bare_batch']}, {r['threads']} thread"
                  f"{'s' if r['threads'] > 1 else ''})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
