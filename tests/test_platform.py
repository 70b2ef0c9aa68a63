"""Platform and install: the online probe of --pretrained (through huggingface_hub: HF_ENDPOINT,
HF_HUB_OFFLINE, proxies), --device mps, the optional packages (grad-cam, albumentations, tensorboard)
and the README's quick-start tour."""
from __future__ import annotations

import http.server
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
