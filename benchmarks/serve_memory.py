"""Memory of serve.py under large images: peak RSS and images/s with the decoding bound off and on (not a test).

    python benchmarks/serve_memory.py                          # resnet18 at 64 px, trained here for 1 epoch
    python benchmarks/serve_memory.py --save_path runs/exp --clients 16 --rounds 3
    python benchmarks/serve_memory.py --modes                  # the bytes a pixel takes to decode, per mode

The load it measures: --clients concurrent requests, each of two large PNGs (by default
6300 x 6286 = 39.6 megapixels, under --max_pixels 40,000,000, about a hundred KB each: a flat
picture compresses well), sent --rounds times. For each setting of --max_decode_mb (0 = no bound,
then --bound: serve.py's default unless given) it starts one serve.py (embedded, --threads 1,
--timeout 300 so that no request is refused and both runs do the same work), sends one small
warm-up request, then the load, and reads from /proc the server's resident memory before the
load, its peak (VmHWM: the kernel's high-water mark, exact) and after it. One row per setting:
images/s (images answered / wall time of the load), the memory figures, the most memory the
decoding images took at once by serve.py's estimate (/metrics' serve_decode_bytes_peak), and the
non-200 answers; then whether the stated bound held: peak RSS <= RSS before the load +
--max_decode_mb.

--modes measures instead, in a fresh process per mode and channel count, the memory that decoding
a 4000 x 4000 image of each Pillow mode and converting it to the model's RGB or L takes at its
peak, per pixel: the table utils.serve.service.DECODE_BYTES must not be under. Nothing leaves
loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prettytable import PrettyTable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import HOST, Procs, free_port, train_run, wait_ready  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.serve.settings import HTTP  # noqa: E402

MIB = 1024 * 1024


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p = parser.add_argument
    p("--save_path", default="", help="run folder to serve; '' = train --model_name for 1 epoch into --out first")
    p("--model_name", default="resnet18", help="model trained when --save_path is not given")
    p("--image_size", type=int, default=64, help="its input size")
    p("--out", default="", help="work folder (run, logs); '' = a temporary folder")
    p("--clients", type=int, default=16, help="concurrent requests per round")
    p("--rounds", type=int, default=2, help="rounds of --clients requests")
    p("--width", type=int, default=6300, help="width of the uploaded images")
    p("--height", type=int, default=6286, help="height of the uploaded images")
    p("--bound", type=int, default=HTTP.max_decode_mb, help="--max_decode_mb of the 'on' run")
    p("--modes", action="store_true", help="measure the bytes a pixel of each mode takes to decode, then stop")
    return parser


def big_pngs(width: int, height: int) -> list[bytes]:
    """Two different large PNGs: flat colours with a few rectangles (they compress to tens of KB)."""
    out = []
    for k, colour in enumerate(((200, 40, 40), (40, 60, 210))):
        img = Image.new("RGB", (width, height), colour)
        rng = np.random.default_rng(k)
        for _ in range(6):
            x, y = int(rng.integers(0, width - 500)), int(rng.integers(0, height - 500))
            img.paste(tuple(int(c) for c in rng.integers(0, 255, 3)), (x, y, x + 500, y + 500))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=9)
        out.append(buf.getvalue())
    return out


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


async def load(url: str, pngs: list[bytes], clients: int, rounds: int) -> tuple[float, int, int]:
    """`rounds` rounds of `clients` concurrent requests of the two images: (seconds, images answered, errors)."""
    answered = errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def one(i: int) -> None:
            nonlocal answered, errors
            files = [("file", (f"{i}_{k}.png", png, "image/png")) for k, png in enumerate(pngs)]
            response = await client.post("/predict", files=files)
            if response.status_code == 200:
                answered += len(response.json()["results"])
            else:
                errors += 1

        t0 = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*(one(r * clients + i) for i in range(clients)))
        return time.perf_counter() - t0, answered, errors


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)", httpx.get(url + "/metrics", timeout=30).text, re.M)
    return float(match.group(1)) if match else float("nan")


def measure(bound: int, run: Path, pngs: list[bytes], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One serve.py with --max_decode_mb bound under the load."""
    folder.mkdir(parents=True, exist_ok=True)
    procs = Procs(folder)
    port = free_port()
    url = f"http://{HOST}:{port}"
    try:
        server = procs.start("server", [sys.executable, "serve.py", "--save_path", run, "--device", "cpu", "--port", port,
                                        "--threads", 1, "--timeout", 300, "--max_decode_mb", bound])
        wait_ready(url, procs)
        small = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(small, format="PNG")
        httpx.post(url + "/predict", files=[("file", ("warm.png", small.getvalue()))], timeout=60)
        time.sleep(1.0)
        before = memory_mib(server.pid)["VmRSS"]
        seconds, images, errors = asyncio.run(load(url, pngs, args.clients, args.rounds))
        peak = memory_mib(server.pid)["VmHWM"]
        decoded_peak = metric(url, "serve_decode_bytes_peak")
        time.sleep(2.0)
        after = memory_mib(server.pid)["VmRSS"]
    finally:
        procs.close()
    row = {"max_decode_mb": bound, "images": images, "seconds": seconds, "images_per_s": images / seconds,
           "rss_before_mib": before, "peak_rss_mib": peak, "rss_after_mib": after, "decoded_peak_mib": decoded_peak / MIB,
           "errors": errors}
    print(f"--max_decode_mb {bound:>5}: {row['images_per_s']:.2f} images/s, RSS {before:.0f} MiB before, "
          f"peak {peak:.0f} MiB, {after:.0f} MiB after; at most {row['decoded_peak_mib']:.0f} MiB decoding at once; "
          f"{errors} error(s)", flush=True)
    return row


MODE_PROBE = """
import io, sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, {root!r})
from utils.data.decode import load_image
from utils.serve.service import map_large_allocations
def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
map_large_allocations()  # as serve.py runs
mode, channels, side = {mode!r}, {channels}, 4000
if mode.startswith("I;16"):
    img = Image.fromarray(np.full((side, side), 30000, dtype=np.uint16))
elif mode in ("I", "F"):
    img = Image.fromarray(np.full((side, side), 3, dtype=np.int32 if mode == "I" else np.float32))
else:
    img = Image.new(mode, (side, side))
buf = io.BytesIO()
img.save(buf, "TIFF" if mode in ("I", "F", "CMYK", "YCbCr", "LAB", "RGBX") else "PNG")
del img
data = buf.getvalue()
Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
before = status("VmRSS")
load_image(io.BytesIO(data), channels).resize((73, 73))
print((status("VmHWM") - before) / side ** 2)
"""


def measure_modes() -> None:
    """The bytes a pixel of each mode takes at the peak of decoding, against DECODE_BYTES."""
    import subprocess

    from utils.serve.service import DECODE_BYTES

    table = PrettyTable(["mode", "to RGB", "to L", "DECODE_BYTES"])
    table.title = "bytes per pixel at the peak of decoding a 4000 x 4000 image (load_image + resize)"
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F"):
        got = []
        for channels in (3, 1):
            code = MODE_PROBE.format(root=str(Path(__file__).resolve().parent.parent), mode=mode, channels=channels)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            got.append(float(proc.stdout.split()[-1]) if proc.returncode == 0 else float("nan"))
        table.add_row([mode, f"{got[0]:.1f}", f"{got[1]:.1f}", DECODE_BYTES[mode]])
        if max(got) > DECODE_BYTES[mode] + 0.5:
            print(f"{mode}: {max(got):.1f} bytes a pixel, over DECODE_BYTES' {DECODE_BYTES[mode]}", flush=True)
    print(table, flush=True)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.modes:
        measure_modes()
        return []
    if args.width * args.height > HTTP.max_pixels:
        raise SystemExit(f"--width x --height is over serve.py's --max_pixels {HTTP.max_pixels}")
    with ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve_mem_")))
        out.mkdir(parents=True, exist_ok=True)
        run = Path(args.save_path) if args.save_path else train_run(args, out)
        pngs = big_pngs(args.width, args.height)
        print(f"{args.rounds} round(s) of {args.clients} concurrent requests, each of two {args.width}x{args.height} PNGs "
              f"({args.width * args.height / 1e6:.1f} MP; {len(pngs[0]) // 1024} and {len(pngs[1]) // 1024} KB)", flush=True)
        rows = [measure(bound, run, pngs, args, out / f"bound-{bound}") for bound in (0, args.bound)]
    report(rows, args)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = PrettyTable(["--max_decode_mb", "images/s", "RSS before MiB", "peak RSS MiB", "RSS after MiB",
                         "most MiB decoding at once", "errors"])
    table.title = (f"serve.py ({os.cpu_count()} CPUs): {args.rounds} x {args.clients} concurrent requests of two "
                   f"{args.width * args.height / 1e6:.1f} MP PNGs")
    for r in rows:
        table.add_row([r["max_decode_mb"] or "0 (off)", f"{r['images_per_s']:.2f}", f"{r['rss_before_mib']:.0f}",
                       f"{r['peak_rss_mib']:.0f}", f"{r['rss_after_mib']:.0f}", f"{r['decoded_peak_mib']:.0f}", r["errors"]])
    print(table, flush=True)
    on = rows[-1]
    limit = on["rss_before_mib"] + on["max_decode_mb"]
    verdict = "holds" if on["peak_rss_mib"] <= limit else "DOES NOT HOLD"
    print(f"bound on: peak RSS {on['peak_rss_mib']:.0f} MiB <= RSS before {on['rss_before_mib']:.0f} MiB + --max_decode_mb "
          f"{on['max_decode_mb']} = {limit:.0f} MiB: {verdict}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
