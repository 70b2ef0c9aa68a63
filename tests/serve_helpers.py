"""Helpers of the serve.py tests: real servers in subprocesses, on free loopback ports, always stopped.

    with Served(["--save_path", run, "--max_batch", 8]) as server:      # uvicorn via serve.py
        server.post(files)                                               # httpx, bounded timeouts
    with RedisServer(tmp_path) as redis_url: ...                         # redis-server on a free port
    with chromium(download_dir) as driver: ...                           # headless Debian Chromium

Every wait is bounded; a server that does not come up fails the test with the tail of its log.
"""
from __future__ import annotations

import contextlib
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
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg"}
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)


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


# ------------------------------------------------------------------------------ Redis
def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """redis-server on a free loopback port, in-memory only, its files in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        folder.mkdir(parents=True, exist_ok=True)
        self.log = (folder / "redis.log").open("w")
        self.proc = subprocess.Popen([redis_server_binary() or "redis-server", "--bind", HOST, "--port", str(self.port),
                                      "--save", "", "--appendonly", "no", "--dir", str(folder), "--protected-mode", "yes"],
                                     cwd=folder, stdout=self.log, stderr=subprocess.STDOUT)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_timeout=2).ping():
                    return
            time.sleep(0.1)
        self.close()
        raise AssertionError("redis-server did not answer within 20s")

    def close(self) -> None:
        stop_process(self.proc)
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
