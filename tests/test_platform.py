"""Platform and install: the online probe of --pretrained (through huggingface_hub: HF_ENDPOINT,
HF_HUB_OFFLINE, proxies), --device mps, the optional packages (grad-cam, albumentations, tensorboard)
and the README's quick-start tour."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


# ------------------------------------------------------------------------------ online probe
class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every HEAD/GET with 200 (a server, or a forward proxy for http:// URLs) and refuses
    CONNECT (an https:// URL through a proxy) with 502, recording each request line."""

    seen: list[str]

    def _answer(self, code: int) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
        self._answer(200)

    do_GET = do_HEAD

    def do_CONNECT(self) -> None:  # noqa: N802
        self._answer(502)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server on a free port: (its URL, the request lines it saw)."""
    seen: list[str] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


def _probe(env: dict[str, str], *args: str) -> bool:
    """weights_server_online(*args) in a fresh process (huggingface_hub reads its variables at import)."""
    base = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and not k.startswith("HF_")}
    code = "import sys; from utils.models.online import weights_server_online as w; print(w(*sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=base | env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() in ("True", "False"), proc.stderr
    return proc.stdout.strip() == "True"


def test_probe_goes_to_hf_endpoint(recorder: tuple[str, list[str]]) -> None:
    url, seen = recorder
    assert _probe({"HF_ENDPOINT": url}) is True
    assert seen == ["HEAD /"]  # the mirror was asked, once


def test_hf_hub_offline_is_offline_without_a_request(recorder: tuple[str, list[str]]) -> None:
    url, seen = recorder
    assert _probe({"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "1"}) is False
    assert _probe({"HF_HUB_OFFLINE": "1"}, url + "/models/") is False  # torchvision's server too
    assert seen == []


def test_unreachable_endpoint_is_offline() -> None:
    assert _probe({"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}) is False


def test_proxy_variables_are_honoured(recorder: tuple[str, list[str]]) -> None:
    proxy, seen = recorder
    # http:// through HTTP_PROXY: the proxy gets the whole URL and its answer means online
    assert _probe({"HF_ENDPOINT": "http://hub.mirror.invalid", "HTTP_PROXY": proxy}) is True
    assert seen == ["HEAD http://hub.mirror.invalid/"]
    # https:// through HTTPS_PROXY: a CONNECT tunnel, which this proxy refuses: offline, but asked
    assert _probe({"HTTPS_PROXY": proxy}, "https://download.pytorch.org/models/") is False
    assert seen[1:] == ["CONNECT download.pytorch.org:443"]


def test_probe_is_one_request_with_a_short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants
    import huggingface_hub.utils

    from utils.models import online

    calls: list[tuple[str, dict]] = []

    class Session:
        def head(self, url: str, **kwargs: Any) -> None:
            calls.append((url, kwargs))
            raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Session)
    assert online.weights_server_online(online.TORCHVISION_WEIGHTS) is False
    assert calls == [(online.TORCHVISION_WEIGHTS, {"timeout": online.PROBE_TIMEOUT})]
    assert online.PROBE_TIMEOUT <= 5  # fails fast: timm's own download retries for about 45 s
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert online.weights_server_online() is False and len(calls) == 1


# ------------------------------------------------------------------------------- --device mps
def _fake_mps(monkeypatch: pytest.MonkeyPatch, available: bool, built: bool = True) -> None:
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)


def test_device_mps_where_apple_gpu_is_available(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from utils.core.device import MPS_FALLBACK, amp_settings, select_device

    _fake_mps(monkeypatch, available=True)
    monkeypatch.setenv(MPS_FALLBACK, "1")
    with caplog.at_level("WARNING", logger="utils.core.device"):
        assert select_device("mps") == torch.device("mps") and select_device(" MPS ") == torch.device("mps")
    assert not caplog.records  # the fallback is on: nothing to say
    monkeypatch.setenv(MPS_FALLBACK, "0")  # the user turned it off
    with caplog.at_level("WARNING", logger="utils.core.device"):
        select_device("mps")
    assert len(caplog.records) == 1 and f"{MPS_FALLBACK}=1" in caplog.records[0].getMessage()
    assert amp_settings(torch.device("mps"), True)[0] == torch.float16  # float16 autocast + GradScaler, as on CUDA
    assert amp_settings(torch.device("mps"), False) == (None, "off")
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: device_type != "mps")
    dtype, note = amp_settings(torch.device("mps"), True)
    assert dtype is None and "no autocast on MPS" in note


@pytest.mark.parametrize("built, needle", [(True, "Apple silicon"), (False, "no MPS support")])
def test_device_mps_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, built: bool, needle: str) -> None:
    from utils.core.device import select_device
    from utils.core.log import UserError

    _fake_mps(monkeypatch, available=False, built=built)
    with pytest.raises(UserError, match=needle) as err:
        select_device("mps")
    assert "--device cpu" in str(err.value) and "\n" not in str(err.value)


def test_cli_device_mps_is_one_line_where_there_is_none(tiny_data: Path, tmp_path: Path) -> None:
    import torch

    from conftest import assert_user_error, run_inprocess, train_args

    if torch.backends.mps.is_available():
        pytest.skip("this machine has Apple's GPU: --device mps is valid here")
    proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "run", "--device", "mps"))
    assert_user_error(proc, "--device mps", "--device cpu")
    assert not (tmp_path / "run").exists()  # refused before a run folder


def test_mps_fallback_is_set_on_macos_before_torch_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.core import device

    monkeypatch.delenv(device.MPS_FALLBACK, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    device._mps_fallback_before_torch()
    assert device.MPS_FALLBACK not in os.environ  # nothing changes off macOS
    monkeypatch.setattr(sys, "platform", "darwin")
    device._mps_fallback_before_torch()
    assert os.environ[device.MPS_FALLBACK] == "1"
    monkeypatch.setenv(device.MPS_FALLBACK, "0")
    device._mps_fallback_before_torch()
    assert os.environ[device.MPS_FALLBACK] == "0"  # the user's choice is kept
    # PyTorch reads the variable when it loads: each script with --device sets it (imports utils.core.device) before torch
    code = ("import importlib, sys\nfor s in sys.argv[1:]:\n    importlib.import_module(s)\n"
            "    assert 'utils.core.device' in sys.modules and 'torch' not in sys.modules, s\n")
    proc = subprocess.run([sys.executable, "-c", code, "main", "metrice", "predict", "export", "serve"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------- installs
def _pins(path: Path) -> dict[str, str]:
    """name -> the version spec of each requirement line (comments and -r/-c lines left out)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = line.replace(">", "=").replace("<", "=").split("=", 1)[0].strip()
            out[name.lower().replace("_", "-")] = line[len(name):].strip()
    return out


def test_torch_is_a_range_and_make_installs_the_tested_pin() -> None:
    import huggingface_hub
    import torch
    import torchvision
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    training, pinned = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements" / "constraints.txt")
    extras = _pins(REPO / "requirements" / "extras.txt")
    assert set(pinned) == {"torch", "torchvision"} and all(spec.startswith("==") for spec in pinned.values())
    for name, module in (("torch", torch), ("torchvision", torchvision)):
        tested = Version(module.__version__.split("+")[0])
        assert str(tested) == pinned[name][2:]  # the pin is what the tests run on
        assert tested in SpecifierSet(training[name]) and "<" in training[name] and ">=" in training[name]
    assert Version("2.4.1") not in SpecifierSet(training["torch"])  # torch.onnx.export(dynamo=) needs 2.5
    assert Version("0.33.5") not in SpecifierSet(training["huggingface-hub"])  # the `hf` command the README names
    assert Version(huggingface_hub.__version__) in SpecifierSet(training["huggingface-hub"])
    assert set(extras) == {"grad-cam", "albumentations", "tensorboard", "datasets", "pyarrow"} and not set(extras) & set(training)
    assert "-r extras.txt" in (REPO / "requirements" / "dev.txt").read_text(encoding="utf-8")  # the tests have them
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "CONSTRAINTS := requirements/constraints.txt" in makefile and "-c $(CONSTRAINTS)" in makefile


def test_without_tensorboard_a_run_says_so_once_and_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from utils.core.run import Run

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = Run(tmp_path / "exp")
    with caplog.at_level("WARNING", logger="utils.core.run"):
        assert run.tensorboard() is None and run.tensorboard() is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "tensorboard is not installed" in lines[0] and "pip install" in lines[0]
    run.close()
    assert not list(run.path.glob("events.out.tfevents.*"))


def test_without_grad_cam_the_cam_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.core.log import UserError
    from utils.explain.cam import import_grad_cam

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(UserError, match=r"pip install 'grad-cam>=1\.5'") as err:
        import_grad_cam()
    assert "\n" not in str(err.value)


def test_without_albumentations_only_its_names_need_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.transforms import v2

    from utils.core.log import UserError
    from utils.data.augment import build_custom_augment

    monkeypatch.setitem(sys.modules, "albumentations", None)
    flip, cut = build_custom_augment([{"name": "RandomHorizontalFlip", "params": {"p": 1.0}}, "CutOut"])
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 1.0 and type(cut).__name__ == "CutOut"
    with pytest.raises(UserError, match=r"custom_augment\[1\]: 'RandomGridShuffle'.*pip install 'albumentations>=1\.4\.21'"):
        build_custom_augment(["CutOut", "RandomGridShuffle"])


# ------------------------------------------------------------------------- quick-start tour
TOUR_MARK = "<!-- quick-start tour -->"


def tour_commands(readme: Path) -> list[list[str]]:
    """The README's quick-start tour: the fenced block after TOUR_MARK, one command a line, comments dropped."""
    import shlex

    block = readme.read_text(encoding="utf-8").split(TOUR_MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_tour_is_the_five_steps_in_both_languages() -> None:
    import importlib

    commands = tour_commands(REPO / "README.md")
    assert commands == tour_commands(REPO / "README.zh-CN.md")
    assert [c[1] for c in commands] == ["processing.py", "main.py", "metrice.py", "predict.py", "export.py"]
    for python, script, *args in commands:
        assert python == "python"
        importlib.import_module(script[:-3]).parse_args(args)  # every flag exists and every value parses


def test_readme_tour_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tour's commands, verbatim, on a small stand-in for make demo's sample/digits (3 classes of
    10 images instead of 10 of ~180: the same commands, seconds instead of minutes)."""
    import csv

    import numpy as np
    import torch
    from PIL import Image

    from conftest import assert_ok, load_ckpt, make_class_folders, run_inprocess

    make_class_folders(tmp_path / "sample" / "digits", {"1": 10, "7": 10, "9": 10}, size=32)
    monkeypatch.chdir(tmp_path)
    procs = {}
    for _, script, *args in tour_commands(REPO / "README.md"):
        procs[script] = proc = run_inprocess(script, *args)
        assert_ok(proc)
    split = {s: sorted(p.name for p in (tmp_path / "sample" / s / "7").iterdir()) for s in ("train", "val", "test")}
    assert [len(split[s]) for s in ("train", "val", "test")] == [6, 2, 2]  # 6:2:2 of each class's 10
    run = tmp_path / "runs" / "tour"
    best = load_ckpt(run / "best.pt")
    assert best["class_names"] == ["1", "7", "9"] and best["image_size"] == 32
    assert len((run / "train.log").read_text().splitlines()) == 1 + 3  # header + --epoch 3
    metrics = json.loads((run / "test" / "results.json").read_text())["metrics"]["runs/tour"]
    correct = len((run / "test" / "correct.csv").read_text().splitlines()) - 1
    assert metrics["images"] == 6 and metrics["acc"] == pytest.approx(correct / 6)  # the accuracy is its correct.csv
    with open(run / "predict" / "exp" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == split["test"]  # one row per image of sample/test/7
    # the exported file decides as predict.py did (temperature scaling keeps the argmax)
    scripted = torch.jit.load(str(run / "export" / "best.torchscript"))
    mean, std = torch.tensor(best["mean"]).view(3, 1, 1), torch.tensor(best["std"]).view(3, 1, 1)
    for row in rows:
        with Image.open(tmp_path / row["path"]) as img:  # 32 px already: resizing and cropping change nothing
            x = (torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1).float() / 255 - mean) / std
        assert best["class_names"][int(scripted(x[None]).argmax())] == row["class"], row
