"""Helpers of the serve.py tests: real servers in subprocesses, on free loopback ports, always stopped.

    with Served(["--save_path", run, "--max_batch", 8]) as server:      # uvicorn via serve.py
        server.post(files)                                               # httpx, bounded timeouts
    with RedisServer(tmp_path) as redis_url: ...                         # redis-server on a free port
    with chromium(download_dir) as driver: ...                           # headless Debian Chromium

Every wait is bounded; a server that does not come up fails the test with the tail of its log.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CLASSES, assert_ok, run_script

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg"}
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
TOL = 1e-5  # API probabilities vs predict.py's CSV (written with 6 decimals)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


class Proc:
    """A subprocess of this repository with its output in a log file."""

    def __init__(self, args: Sequence[Any], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self.log = log.open("w")
        cmd = [sys.executable, *[str(a) for a in args]]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ) | ENV | (env or {}))

    def tail(self, chars: int = 3000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 10.0) -> None:
        stop_process(self.proc, grace)
        self.log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Served:
    """`python serve.py ARGS --port <free>` on 127.0.0.1, ready (or failed) within `start_timeout`."""

    def __init__(self, args: Sequence[Any], log: Path, api_key: str | None = None, start_timeout: float = 90.0,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.api_key = api_key
        extra = ["--api_key", api_key] if api_key else []
        self.proc = Proc(["serve.py", *args, "--port", self.port, *extra], log, env)
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(60.0, connect=5.0),
                                   headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None:
                raise AssertionError(f"serve.py exited {self.proc.proc.returncode}:\n{self.proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.close()
        raise AssertionError(f"serve.py not ready within {timeout:.0f}s:\n{self.proc.tail()}")

    def post(self, files: Sequence[tuple[str, bytes]], params: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        """POST /predict with each (name, data) in the multipart field 'file'."""
        return self.client.post("/predict", files=[("file", (n, d, "application/octet-stream")) for n, d in files],
                                params=params, **kw)

    def metric(self, name: str) -> float:
        """One unlabelled value of /metrics."""
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def close(self) -> None:
        self.client.close()
        self.proc.stop()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------ shared fixtures
# (imported by the test modules that use them; each module computes its own)
@pytest.fixture(scope="module")
def serve_run(trained_runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a copy of the best.pt of conftest's FocalLoss + AdamW run (it tells red
    from blue, so top-1 classes differ between images); nothing is written beside the original."""
    folder = tmp_path_factory.mktemp("serve_run") / "run"
    folder.mkdir()
    shutil.copy(trained_runs["FocalLoss"].path / "best.pt", folder / "best.pt")
    return folder


@pytest.fixture(scope="module")
def images(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test split's images, plus one each in grayscale, RGBA, 16-bit and EXIF-rotated JPEG."""
    folder = tmp_path_factory.mktemp("serve_images")
    for path in sorted((tiny_data / "test").rglob("*.png")):
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    red = Image.open(tiny_data / "test" / "red" / "img0.png").convert("RGB")
    red.convert("L").save(folder / "x_gray.png")
    rgba = Image.open(tiny_data / "test" / "green" / "img1.png").convert("RGBA")
    rgba.putalpha(180)
    rgba.save(folder / "x_rgba.png")
    Image.fromarray((np.random.default_rng(3).random((30, 30)) * 65535).astype(np.uint16)).save(folder / "x_deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(tiny_data / "test" / "blue" / "img2.png").convert("RGB").resize((36, 24)).save(
        folder / "x_rotated.jpg", exif=exif.tobytes(), quality=95)
    return folder


@pytest.fixture(scope="module")
def expected(serve_run: Path, images: Path) -> dict[str, dict[str, str]]:
    """predict.py's rows for every image of `images`, by file name."""
    proc = run_script("predict.py", "--source", images, "--save_path", serve_run, "--device", "cpu", "--workers", 0,
                      "--batch_size", 4)
    assert_ok(proc)
    with (serve_run / "predict" / "exp" / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert len(rows) == len(list(images.iterdir()))
    assert len({r["class"] for r in rows.values()}) >= 2, "the model predicts one class for everything"
    return rows


@pytest.fixture(scope="module")
def multilabel_served(multilabel_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """conftest's multi-label run (its best.pt copied: nothing is written beside the original), 12 of
    its test images, and predict.py's rows for them by file name: {"run", "images", "rows"}."""
    folder = tmp_path_factory.mktemp("serve_multilabel")
    run, pictures = folder / "run", folder / "images"
    run.mkdir()
    pictures.mkdir()
    shutil.copy(multilabel_run["run"] / "best.pt", run / "best.pt")
    for path in sorted((multilabel_run["root"] / "test").glob("*.png"), key=lambda p: int(p.stem))[:12]:
        shutil.copy(path, pictures / path.name)
    assert_ok(run_script("predict.py", "--source", pictures, "--save_path", run, "--device", "cpu", "--workers", 0))
    with (run / "predict" / "exp" / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    counts = [len(r["labels"].split("|")) if r["labels"] else 0 for r in rows.values()]
    assert len(rows) == 12 and max(counts) >= 2, counts  # images with several labels: a labels list to check
    return {"run": run, "images": pictures, "rows": rows}


def check_labels(result: dict[str, Any], row: dict[str, str]) -> None:
    """A multi-label API result equals predict.py's row: its labels in order, their probabilities,
    the top-1, uncertain (no label given)."""
    want = row["labels"].split("|") if row["labels"] else []
    assert [label["class"] for label in result["labels"]] == want, (result["file"], result["labels"], row["labels"])
    probs = [float(v) for v in row["label_probs"].split("|")] if row["label_probs"] else []
    assert all(abs(label["prob"] - p) < TOL for label, p in zip(result["labels"], probs))
    assert result["class"] == row["class"] and abs(result["prob"] - float(row["prob"])) < TOL
    assert int(result["uncertain"]) == int(row["uncertain"])


def read(path: Path) -> bytes:
    return path.read_bytes()


def check_result(result: dict[str, Any], row: dict[str, str]) -> None:
    """One API result equals predict.py's CSV row: class, probabilities, entropy, uncertain."""
    assert result["class"] == row["class"], (result["file"], result["class"], row["class"])
    assert abs(result["prob"] - float(row["prob"])) < TOL
    for j, top in enumerate(result["top"], start=1):
        assert top["class"] == row[f"top{j}_class"]
        assert abs(top["prob"] - float(row[f"top{j}_prob"])) < TOL
    assert len(result["top"]) == min(5, len(TINY_CLASSES))
    assert abs(result["entropy"] - float(row["entropy"])) < TOL
    assert int(result["uncertain"]) == int(row["uncertain"])


# ------------------------------------------------------------------------------ Redis
def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """redis-server on a free loopback port, in-memory only (no persistence, as the README starts
    it), its files in `folder`; stop() and start() again on the same port: a restart that loses
    every key."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log = (folder / "redis.log").open("a")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start redis-server (again) on self.port and wait until it answers."""
        import redis

        self.proc = subprocess.Popen([redis_server_binary() or "redis-server", "--bind", HOST, "--port", str(self.port),
                                      "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                                      "--protected-mode", "yes"], cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_timeout=2).ping():
                    return
            time.sleep(0.1)
        self.close()
        raise AssertionError("redis-server did not answer within 20s")

    def stop(self) -> None:
        """Stop redis-server (SIGTERM; without persistence it keeps nothing)."""
        if self.proc is not None:
            stop_process(self.proc)

    def close(self) -> None:
        self.stop()
        self.log.close()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------ Chromium
def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) of Debian's chromium and chromium-driver packages, or None."""
    browser = next((p for p in CHROMIUM if Path(p).is_file()), None)
    driver = next((p for p in CHROMEDRIVER if Path(p).is_file()), shutil.which("chromedriver"))
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(download_dir: Path, profile_dir: Path) -> Iterator[Any]:
    """Headless Chromium driven by selenium, downloads going to download_dir; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    assert paths is not None
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False,
                                              "safebrowsing.enabled": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
        yield driver
    finally:
        driver.quit()
