"""serve.py in one process: the API against predict.py, bad inputs, batching (each concurrent
request gets its own image's result), the limits (body size, chunked too; images per request;
the time for a body to arrive; a client that goes away; the pixels decoded at once; --timeout
while decoding), the API key, CAM overlays, /info /metrics /docs, the access log, the ONNX
backend, a multi-label model, the CLI's user errors, and the web page in a real headless Chromium
(its probabilities and bars against the API's).

One real server (uvicorn in a subprocess on a free 127.0.0.1 port) serves the module; it runs a
copy of conftest's 2-epoch tiny run, with an API key, small limits, the access log, and a long
batching window so concurrent requests group reliably. The in-process tests run the same app
(utils.serve.app.create_app) under Starlette's TestClient. The browser test skips, saying why,
only when Debian's chromium and chromium-driver are not installed (`make test` installs them when
apt-get is there).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLASSES, assert_ok, assert_user_error, make_truncated_jpeg, run_script
from serve_helpers import (  # noqa: F401
    HOST,
    TOL,
    Served,
    check_labels,
    check_result,
    chromium,
    chromium_paths,
    expected,
    images,
    multilabel_served,
    noise_image,
    png_bytes,
    read,
    serve_run,
)

KEY = "test-key-0123456789"
MAX_BYTES = 3_000_000
MAX_PIXELS = 1_000_000
MAX_IMAGES = 16
BODY_TIMEOUT = 3.0


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """serve.py on a free loopback port with an API key; TMPDIR is an empty folder of its own."""
    logs = tmp_path_factory.mktemp("serve_logs")
    tmpdir = logs / "tmp"
    tmpdir.mkdir()
    with Served(["--save_path", serve_run, "--device", "cpu", "--max_batch", 8, "--max_wait_ms", 150,
                 "--max_bytes", MAX_BYTES, "--max_pixels", MAX_PIXELS, "--max_images", MAX_IMAGES, "--timeout", 60,
                 "--body_timeout", BODY_TIMEOUT, "--access_log"],
                logs / "server.log", api_key=KEY, env={"TMPDIR": str(tmpdir)}) as served:
        served.tmpdir = tmpdir
        yield served


@pytest.fixture(scope="module")
def runner(serve_run: Path) -> Any:
    """The module's model in this process, for the in-process apps."""
    from utils.infer.backends import load_backend
    from utils.serve.service import ModelRunner

    return ModelRunner(load_backend(serve_run, "torch", "cpu"))


def raw_request(port: int, data: bytes, read_timeout: float, close_after_send: bool = False) -> tuple[bytes, float]:
    """Send bytes on a new connection, then read until the server closes it: (what came, seconds)."""
    with socket.create_connection((HOST, port), timeout=read_timeout) as sock:
        t0 = time.monotonic()

        def send() -> None:  # in a thread: the server may answer (and close) before it has read everything
            try:
                sock.sendall(data)
            except OSError:
                pass

        sender = threading.Thread(target=send)
        sender.start()
        if close_after_send:
            sender.join(10)
            return b"", time.monotonic() - t0
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except OSError:  # a reset after the answer
            pass
        sender.join(10)
        return got, time.monotonic() - t0


def http_head(path: str, headers: dict[str, str]) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


def json_of(answer: bytes) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a raw HTTP/1.1 answer."""
    assert answer.startswith(b"HTTP/1.1 "), f"no answer before the connection closed or the read timed out: {answer[:200]!r}"
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# ------------------------------------------------------------------------------ the API
def test_results_equal_predict_py(server: Served, images: Path, expected: dict[str, dict[str, str]]) -> None:
    files = sorted(images.iterdir())
    # all in one request, in the order sent
    response = server.post([(f.name, read(f)) for f in files])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "resnet10t" and body["model_type"] == "torch" and body["time_ms"] > 0
    assert [r["file"] for r in body["results"]] == [f.name for f in files]
    for result in body["results"]:
        check_result(result, expected[result["file"]])
    # and one at a time
    for f in files[:3]:
        single = server.post([(f.name, read(f))]).json()["results"]
        assert len(single) == 1
        check_result(single[0], expected[f.name])


BAD_INPUTS = [  # (what, request kwargs or a builder, status, words of the error)
    ("not an image", lambda d: {"files": [("file", ("notes.txt", b"just text\n"))]}, 415, ["notes.txt", "not an image"]),
    ("empty body", lambda d: {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400,
     ["empty request body"]),
    ("empty file", lambda d: {"files": [("file", ("empty.png", b""))]}, 400, ["empty.png", "empty file"]),
    ("truncated image", lambda d: {"files": [("file", ("cut.jpg", d["truncated"]))]}, 422, ["cut.jpg", "truncated"]),
    ("body over --max_bytes", lambda d: {"files": [("file", ("big.png", b"\0" * (MAX_BYTES + 1)))]}, 413, ["--max_bytes"]),
    ("image over --max_pixels", lambda d: {"files": [("file", ("huge.png", d["huge"]))]}, 413,
     ["huge.png", "1100x1000", "--max_pixels"]),
    ("not multipart", lambda d: {"content": d["good"], "headers": {"content-type": "image/png"}}, 415, ["multipart/form-data"]),
    ("another form field", lambda d: {"files": [("image", ("a.png", d["good"]))]}, 400, ["unexpected form field 'image'"]),
    ("cut-off multipart", lambda d: {"content": d["cut_body"], "headers": {"content-type": d["cut_type"]}}, 400, ["cut off"]),
    ("one bad image of two", lambda d: {"files": [("file", ("ok.png", d["good"])), ("file", ("bad.gif", b"GIF89a-not"))]},
     415, ["bad.gif"]),
    ("unknown cam", lambda d: {"files": [("file", ("a.png", d["good"]))], "params": {"cam": "NoSuchCAM"}}, 400,
     ["NoSuchCAM", "GradCAM"]),
]


def test_bad_inputs_get_4xx_and_the_next_request_succeeds(server: Served, images: Path, tmp_path: Path,
                                                         expected: dict[str, dict[str, str]]) -> None:
    good_file = sorted(images.glob("red_*.png"))[0]
    import httpx

    request = httpx.Request("POST", server.url + "/predict", files=[("file", ("a.png", read(good_file)))])
    body = request.read()
    data = {"good": read(good_file), "truncated": read(make_truncated_jpeg(tmp_path / "cut.jpg")),
            "huge": png_bytes(Image.new("RGB", (1100, 1000), (10, 20, 30))),
            "cut_body": body[:-40], "cut_type": request.headers["content-type"]}
    for what, build, status, needles in BAD_INPUTS:
        response = server.client.post("/predict", **build(data))
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()
        assert error["status"] == status and all(n in error["error"] for n in needles), (what, error)
        after = server.post([(good_file.name, data["good"])])
        assert after.status_code == 200, (what, after.text)
        check_result(after.json()["results"][0], expected[good_file.name])
    assert server.proc.proc.poll() is None


def test_uploads_never_touch_the_disk(server: Served) -> None:
    """An upload over Starlette's 1 MiB spooling threshold: no file appears in the server's TMPDIR."""
    big = png_bytes(noise_image((700, 700)))
    assert 1_100_000 < len(big) < MAX_BYTES
    response = server.post([("noise.png", big)])
    assert response.status_code == 200, response.text
    written = [p for p in server.tmpdir.rglob("*") if p.is_file()]  # (torch makes an empty cache folder there)
    assert written == []


def test_chunked_body_over_max_bytes_is_refused(server: Served) -> None:
    """Transfer-Encoding: chunked, no Content-Length: refused as soon as the body passes --max_bytes."""
    head = http_head("/predict", {"Content-Type": "multipart/form-data; boundary=b", "Transfer-Encoding": "chunked"})
    chunk = b"\0" * 65536
    body = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(MAX_BYTES // len(chunk) + 16)) + b"0\r\n\r\n"
    answer, waited = raw_request(server.port, head + body, read_timeout=30)
    status, error = json_of(answer)
    assert status == 413 and f"over the limit of {MAX_BYTES} bytes (--max_bytes)" in error["error"], answer[:300]
    assert waited < 10  # answered and closed at once, not left open for the rest of the body
    assert server.post([("x.png", png_bytes(Image.new("RGB", (20, 20))))]).status_code == 200


def test_more_images_than_max_images_are_refused(server: Served, images: Path) -> None:
    f = sorted(images.glob("red_*.png"))[0]
    refused = server.post([(f"{i}.png", read(f)) for i in range(MAX_IMAGES + 1)])
    assert refused.status_code == 413, refused.text
    assert f"more than {MAX_IMAGES} images in one request (--max_images)" in refused.json()["error"]
    assert len(server.post([(f"{i}.png", read(f)) for i in range(MAX_IMAGES)]).json()["results"]) == MAX_IMAGES


def test_a_slow_body_gets_408_and_a_client_that_leaves_one_log_line(server: Served) -> None:
    head = http_head("/predict", {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": "1000"})
    # headers and 8 of 1,000 body bytes, then nothing: a clear 408 at --body_timeout, and the connection closed
    answer, waited = raw_request(server.port, head + b"--b\r\nCon", read_timeout=BODY_TIMEOUT + 30)
    status, error = json_of(answer)
    assert status == 408 and "--body_timeout" in error["error"] and "8 of 1000 bytes came" in error["error"], answer
    assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 5
    # the same 8 bytes, then the client goes away: one line in the log, no traceback
    gone = re.compile(r"^127\.0\.0\.1:\d+ disconnected after [08] of 1000 bytes of its POST /predict body$", re.M)
    raw_request(server.port, head + b"--b\r\nCon", read_timeout=5, close_after_send=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not gone.search(server.proc.tail(100_000)):
        time.sleep(0.1)
    log = server.proc.tail(1_000_000)
    assert len(gone.findall(log)) == 1, log[-3000:]  # (uvicorn drops what came once it knows the client left)
    assert "Traceback" not in log and "ClientDisconnect" not in log


def test_access_log_has_each_request(server: Served) -> None:
    before = server.proc.tail(1_000_000).count('"GET /health HTTP/1.1" 200')
    for _ in range(3):
        assert server.client.get("/health").status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.proc.tail(1_000_000).count('"GET /health HTTP/1.1" 200') < before + 3:
        time.sleep(0.1)
    log = server.proc.tail(1_000_000)
    assert log.count('"GET /health HTTP/1.1" 200') == before + 3
    assert re.search(r'127\.0\.0\.1:\d+ - "POST /predict HTTP/1\.1" 200', log)  # the requests of the tests before


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(server: Served, images: Path,
                                                                     expected: dict[str, dict[str, str]]) -> None:
    files = sorted(images.glob("*_img*.png"))[:8]
    assert len({expected[f.name]["class"] for f in files}) >= 2  # results given to the wrong request would show
    batches0, images0 = server.metric("serve_batches_total"), server.metric("serve_images_total")
    barrier = threading.Barrier(len(files))

    def one(path: Path) -> dict[str, Any]:
        barrier.wait(10)
        response = server.post([(path.name, read(path))])
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    with ThreadPoolExecutor(len(files)) as pool:
        results = list(pool.map(one, files))
    for path, result in zip(files, results):
        assert result["file"] == path.name
        check_result(result, expected[path.name])  # its own image's probabilities, not a neighbour's in the batch
    batches = server.metric("serve_batches_total") - batches0
    assert server.metric("serve_images_total") - images0 == len(files)
    assert 1 <= batches < len(files), f"{len(files)} concurrent requests ran in {batches} batches"
    assert max(r["batch_size"] for r in results) > 1
    assert sum(1 / r["batch_size"] for r in results) == pytest.approx(batches)


def test_api_key(server: Served, images: Path) -> None:
    import httpx

    f = sorted(images.iterdir())[0]
    files = [("file", (f.name, read(f)))]
    for headers, why in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "wrong API key"),
                         ({"Authorization": f"Basic {KEY}"}, "missing API key")):
        for method, path in (("POST", "/predict"), ("GET", "/info"), ("GET", "/metrics")):
            response = httpx.request(method, server.url + path, headers=headers, files=files if method == "POST" else None)
            assert response.status_code == 401, (path, headers, response.text)
            assert why in response.json()["error"] and response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(server.url + "/predict", headers={"Authorization": f"Bearer {KEY}"}, files=files).status_code == 200
    for open_path in ("/health", "/ready", "/"):  # probes and the page itself need no key
        assert httpx.get(server.url + open_path).status_code == 200


def test_cam_overlay_is_the_gradcam_of_the_top1_class(server: Served, serve_run: Path, images: Path,
                                                      expected: dict[str, dict[str, str]]) -> None:
    from utils.data.decode import load_image
    from utils.data.transforms import eval_transform
    from utils.explain.cam import cam_maps, find_cam_layer, overlay, to_hwc_rgb
    from utils.infer.backends import load_backend

    # an image whose top-1 is not class 0, so a map of the wrong class cannot pass for the right one
    f = next(p for p in sorted(images.glob("*_img*.png")) if expected[p.name]["class"] != TINY_CLASSES[0])
    response = server.post([(f.name, read(f))], params={"cam": "GradCAM"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["cam"]["type"] == "GradCAM" and result["cam"]["class"] == result["class"]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["cam"]["png"]))).convert("RGB"))
    backend = load_backend(serve_run, "torch", "cpu")
    view = eval_transform(backend.meta.preprocess)(load_image(f, 3))
    layer = find_cam_layer(backend.model, 32, 3)
    cam = cam_maps(backend.model, backend.normalize(view[None]), layer, "GradCAM", [result["index"]])[0]
    want = np.asarray(Image.fromarray(overlay(to_hwc_rgb(view), cam)).resize((224, 224), Image.BILINEAR))
    assert got.shape == (224, 224, 3)
    worst = int(np.abs(got.astype(int) - want.astype(int)).max())
    assert worst <= 2, f"the overlay differs from the GradCAM of class {result['index']} by up to {worst} levels"
    plain = np.asarray(Image.fromarray(to_hwc_rgb(view)).resize((224, 224), Image.BILINEAR))
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 5  # the heatmap is really there
    no_cam = server.post([(f.name, read(f))]).json()["results"][0]
    assert "cam" not in no_cam


def test_info_metrics_and_docs(server: Served) -> None:
    info = server.client.get("/info").json()
    assert info["class_names"] == TINY_CLASSES and info["image_size"] == 32 and info["model_type"] == "torch"
    assert info["mode"] == "embedded" and info["max_batch"] == 8 and info["max_pixels"] == MAX_PIXELS
    assert "GradCAM" in info["cam_types"] and len(info["cam_types"]) == 8
    assert server.client.get("/health").json() == {"status": "ok"}
    assert server.client.get("/ready").json()["ready"] is True
    text = server.client.get("/metrics").text
    for needle in ('serve_requests_total{path="/predict",code="200"}', "serve_request_duration_seconds_bucket{le=",
                   "serve_batch_size_bucket{le=", "# TYPE serve_batches_total counter", "serve_queue_depth 0"):
        assert needle in text, needle
    requests_before, images_before = server.metric("serve_request_duration_seconds_count"), server.metric("serve_images_total")
    run_before = server.metric("serve_batch_size_sum")
    three = [(f"x{i}.png", png_bytes(Image.new("RGB", (20, 20), (80 * i, 10, 10)))) for i in range(3)]
    assert server.post(three).status_code == 200  # one request of three images
    assert server.metric("serve_request_duration_seconds_count") == requests_before + 1
    assert server.metric("serve_images_total") == images_before + 3  # images, not requests
    assert server.metric("serve_batch_size_sum") == run_before + 3
    assert info["max_images"] == MAX_IMAGES and info["body_timeout"] == BODY_TIMEOUT
    spec = server.client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.0")
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    docs = server.client.get("/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert server.client.get("/docs-static/swagger-ui-bundle.js").status_code == 200


def test_small_requests_are_decoded_on_the_event_loop_with_the_same_answers(server: Served) -> None:
    """A request of up to 256x256 pixels in all is decoded on the event loop, a larger one in the
    thread pool (/metrics counts both), and an image gets the same answer either way."""
    from utils.serve.service import INLINE_DECODE_PIXELS

    def decoded() -> tuple[float, float]:
        return tuple(server.metric(f'serve_decoded_images_total{{where="{w}"}}') for w in ("event_loop", "thread"))

    side = 200  # one image under the bound, two over it
    assert side * side <= INLINE_DECODE_PIXELS < 2 * side * side
    a = ("a.png", png_bytes(noise_image((side, side), seed=1)))
    b = ("b.png", png_bytes(noise_image((side, side), seed=2)))
    before = decoded()
    alone = server.post([a])
    assert alone.status_code == 200, alone.text
    assert decoded() == (before[0] + 1, before[1])
    pair = server.post([a, b])
    assert pair.status_code == 200, pair.text
    assert decoded() == (before[0] + 1, before[1] + 2)
    strip = ("batch_ms", "batch_size")
    first = {k: v for k, v in alone.json()["results"][0].items() if k not in strip}
    assert first == {k: v for k, v in pair.json()["results"][0].items() if k not in strip}


# ------------------------------------------------------------------------------ in-process
def test_onnx_backend_serves_the_same_predictions(serve_run: Path, images: Path, tmp_path: Path,
                                                  expected: dict[str, dict[str, str]]) -> None:
    from fastapi.testclient import TestClient

    from utils.infer.backends import load_backend
    from utils.serve.app import Settings, create_app
    from utils.serve.service import EmbeddedService, ModelRunner

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(serve_run / "best.pt", run / "best.pt")
    assert_ok(run_script("export.py", "--save_path", run, "--export", "onnx", "--device", "cpu"))
    service = EmbeddedService(ModelRunner(load_backend(run, "onnx", "cpu")), max_batch=4, max_wait_ms=0)
    files = sorted(images.iterdir())
    with TestClient(create_app(service, Settings())) as client:
        info = client.get("/info").json()
        assert info["model_type"] == "onnx" and info["cam_types"] == []
        response = client.post("/predict", files=[("file", (f.name, read(f))) for f in files])
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            check_result(result, expected[result["file"]])
        refused = client.post("/predict", params={"cam": "GradCAM"}, files=[("file", (files[0].name, read(files[0])))])
        assert refused.status_code == 400 and "PyTorch model" in refused.json()["error"]


def test_decoding_waits_its_turn_under_max_decode_mb(runner: Any, images: Path,
                                                    expected: dict[str, dict[str, str]]) -> None:
    """The memory of the images decoded at once is bounded: an image that would pass the bound waits
    for its turn (decoded once memory is given back), a request still waiting at --timeout gets a 503
    with Retry-After, having taken nothing, and an image that needs more than the whole bound on its
    own (by its mode: transparency costs 4x) is refused. Other requests' decoding is held here
    through the app's budget."""
    from fastapi.testclient import TestClient

    from utils.serve.app import Settings, create_app
    from utils.serve.service import EmbeddedService, decode_bytes

    f = sorted(images.glob("green_*.png"))[0]
    with Image.open(f) as img:
        cost = decode_bytes(img.width * img.height, img.mode)
    for timeout in (0.5, 60.0):
        settings = Settings(max_decode_mb=1, timeout=timeout)
        with TestClient(create_app(EmbeddedService(runner, max_wait_ms=0), settings)) as client:
            budget = client.app.state.decode_budget
            others = budget.limit - cost + 1  # other requests' images being decoded: room for all but this one
            client.portal.call(budget.acquire, others)
            if timeout < 1:  # it waits, then gives up: 503, Retry-After, the budget as it was
                refused = client.post("/predict", files=[("file", (f.name, read(f)))])
                assert refused.status_code == 503 and refused.headers["retry-after"] == "2", refused.text
                assert "--max_decode_mb 1" in refused.json()["error"] and f.name in refused.json()["error"]
                assert (budget.used, budget.waiting(), budget.peak) == (others, 0, others)
                continue
            with ThreadPoolExecutor(1) as pool:  # it waits its turn, then is decoded and answered
                answer = pool.submit(client.post, "/predict", files=[("file", (f.name, read(f)))])
                deadline = time.monotonic() + 30
                while budget.waiting() == 0 and time.monotonic() < deadline and not answer.done():
                    time.sleep(0.01)
                assert budget.waiting() == 1 and not answer.done()
                client.portal.call(budget.release, others)
                response = answer.result(30)
            assert response.status_code == 200, response.text
            check_result(response.json()["results"][0], expected[f.name])
            assert budget.peak == others and budget.used == 0  # never both at once
            # 300 x 300: as RGB it fits in 1 MiB, with an alpha channel it never would
            rgb = png_bytes(Image.new("RGB", (300, 300), (30, 200, 40)))
            assert client.post("/predict", files=[("file", ("rgb.png", rgb))]).status_code == 200
            rgba = png_bytes(Image.new("RGBA", (300, 300), (30, 200, 40, 128)))
            refused = client.post("/predict", files=[("file", ("rgba.png", rgba))])
            assert refused.status_code == 413 and "300x300 RGBA" in refused.json()["error"], refused.text
            assert "--max_decode_mb" in refused.json()["error"] and budget.used == 0


def test_timeout_holds_while_decoding(runner: Any) -> None:
    """A request whose images take longer to decode than --timeout is answered 504 at --timeout,
    not after decoding them all; the image being decoded then gives its pixels back."""
    from fastapi.testclient import TestClient

    from utils.serve.app import Settings, create_app
    from utils.serve.service import EmbeddedService

    big = png_bytes(Image.new("RGB", (4000, 4000), (200, 30, 30)))  # 16 MP in 56 KB: 0.2-0.4 s each to decode here
    timeout, count = 1.0, 40
    settings = Settings(max_decode_mb=100, timeout=timeout)  # one 16 MP RGB image at a time
    with TestClient(create_app(EmbeddedService(runner, max_wait_ms=0), settings)) as client:
        t0 = time.monotonic()
        response = client.post("/predict", files=[("file", (f"big{i}.png", big)) for i in range(count)])
        waited = time.monotonic() - t0
        error = response.json()["error"]
        assert response.status_code == 504 and f"decoding {count} image(s) took over 1s (--timeout" in error, error
        assert int(re.search(r"; (\d+) done\)", error).group(1)) < count  # it gave up mid-way
        assert waited < timeout + 2.0, f"answered after {waited:.1f}s against --timeout {timeout}"
        budget = client.app.state.decode_budget
        deadline = time.monotonic() + 20
        while budget.used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert budget.used == 0 and budget.waiting() == 0


def test_multilabel_model_serves_its_labels(multilabel_served: dict[str, Any]) -> None:
    """A multi-label model in one process: each image's labels (every class at or above its tuned
    threshold) and their probabilities equal predict.py's."""
    from fastapi.testclient import TestClient

    from utils.infer.backends import load_backend
    from utils.serve.app import Settings, create_app
    from utils.serve.service import EmbeddedService, ModelRunner

    service = EmbeddedService(ModelRunner(load_backend(multilabel_served["run"], "torch", "cpu")), max_wait_ms=0)
    files = sorted(multilabel_served["images"].iterdir())
    with TestClient(create_app(service, Settings())) as client:
        response = client.post("/predict", files=[("file", (f.name, read(f))) for f in files])
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        check_labels(result, multilabel_served["rows"][result["file"]])


def test_batcher_groups_waiting_jobs_and_drops_cancelled_ones() -> None:
    from utils.serve.service import Batcher, Job

    gate = threading.Event()
    seen: list[list[str]] = []

    def fn(jobs: list[Job]) -> list[str]:
        seen.append([j.name for j in jobs])
        gate.wait(10)
        return [j.name.upper() for j in jobs]

    batcher = Batcher(fn, max_batch=4, max_wait_ms=0)
    batcher.start()
    try:
        first = batcher.submit(Job("a", torch.zeros(1)))
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:  # "a" is running, alone
            time.sleep(0.01)
        rest = [batcher.submit(Job(n, torch.zeros(1))) for n in "bcdefg"]
        rest[1].cancel()  # "c": its request gave up
        gate.set()
        assert first.result(10) == "A"
        assert [f.result(10) for i, f in enumerate(rest) if i != 1] == ["B", "D", "E", "F", "G"]
    finally:
        batcher.stop()
    assert seen == [["a"], ["b", "d", "e"], ["f", "g"]]  # max_batch 4 counts "c" before dropping it
    assert batcher.batch_sizes() == {1: 1, 3: 1, 2: 1}


def test_cli_user_errors(serve_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serve

    # as a user sees it: one line, exit 2 (a case that can never start a server, even if the checks broke)
    assert_user_error(run_script("serve.py", "--worker", "--save_path", serve_run, timeout=120), "--worker", "--queue")
    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    cases = [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: set --api_key"),
        (["--host", "192.168.1.5", "--port", "9000"], "--api_key"),
        (["--worker"], "--queue"),
        (["--queue", "redis://127.0.0.1:1/0", "--max_batch", "4"], "--max_batch does not apply to the API tier"),
        (["--queue", "redis://127.0.0.1:1/0", "--save_path", "runs/exp"], "--save_path does not apply"),
        (["--queue", "redis://127.0.0.1:1/0", "--worker", "--port", "9000"], "--port does not apply to a --worker"),
        (["--heartbeat_s", "2"], "--heartbeat_s does not apply to a server without --queue"),
        (["--max_batch", "0"], "--max_batch must be at least 1"),
        (["--max_images", "0"], "--max_images must be at least 1"),
        (["--body_timeout", "0"], "--body_timeout must be positive"),
        (["--max_decode_mb", "-1"], "--max_decode_mb must be at least 0"),
        (["--max_decode_mb", "100"], "an 8-bit RGB image of --max_pixels 40000000 takes about 191 MiB to decode"),
        (["--queue", "redis://127.0.0.1:1/0", "--worker", "--max_images", "4"], "--max_images does not apply to a --worker"),
        (["--max_pixels", str(10**12)], "decompression-bomb"),
    ]
    for argv, needle in cases:
        with pytest.raises(serve.UserError, match=re.escape(needle)):
            serve.parse_args(argv)
    with socket.socket() as taken:  # a port in use: one line before the model is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(serve.UserError, match="cannot listen on 127.0.0.1"):
            serve.check_port("127.0.0.1", taken.getsockname()[1])
    args = serve.parse_args(["--host", "0.0.0.0", "--api_key", "k"])
    assert args.max_batch == 16 and args.port == 8000 and args.save_path == "runs/exp"
    assert serve.parse_args(["--host", "::1"]).api_key is None  # loopback needs no key


def test_serve_defaults_have_one_owner() -> None:
    """utils.serve.settings states every default once: serve.py's parsed flags (each role), its
    --help, and the defaults of the library's constructors are all its values."""
    import inspect

    import serve
    from utils.serve.app import Settings
    from utils.serve.redis_queue import RedisService, RedisWorker
    from utils.serve.service import Batcher, EmbeddedService, ModelRunner, DecodeBudget
    from utils.serve.settings import flag_defaults

    owner = flag_defaults()
    assert set(owner) == set(serve.ROLE_FLAGS) - {"threads"} and len(owner) == 17
    parsed: dict[str, Any] = {}
    for argv in ([], ["--queue", "redis://127.0.0.1:1/0"], ["--queue", "redis://127.0.0.1:1/0", "--worker"]):  # the roles
        parsed |= {k: v for k, v in serve.parse_args(argv).to_dict().items() if k in owner and v is not None}
    assert parsed == owner and all(type(parsed[k]) is type(v) for k, v in owner.items())

    usage, options = serve.get_args_parser().format_help().split("\n\n", 1)
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n  (?=-)", options) if e.startswith("-")}
    for name, value in owner.items():
        shown = re.search(r"\(default: ([^)]*)\)", entries.get(f"--{name}", ""))  # every group, unwrapped
        assert shown, name
        written = shown.group(1).split(" = ")[0]  # "33554432 = 32 MiB"
        assert ("" if written == "''" else type(value)(written)) == value, (name, shown.group(1))

    renamed = {"prefix": "queue_name"}  # the Redis classes' name for --queue_name
    checked = []
    for cls in (Settings, EmbeddedService, Batcher, ModelRunner, DecodeBudget, RedisService, RedisWorker):
        for param in inspect.signature(cls).parameters.values():
            flag = renamed.get(param.name, param.name)
            if flag in owner:
                assert param.default == owner[flag], f"{cls.__name__}({param.name}={param.default!r}): {owner[flag]!r}"
                checked.append(flag)
    assert len(checked) == 20 and set(checked) == set(owner) - {"save_path", "model_type", "device", "host", "port"}


# ------------------------------------------------------------------------------ the browser
@pytest.mark.system_deps
def test_web_page_in_headless_chromium(server: Served, images: Path, expected: dict[str, dict[str, str]],
                                       tmp_path: Path) -> None:
    if chromium_paths() is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver "
                    "(make test installs it when apt-get is available)")
    pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -r requirements.txt)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    picked = [sorted(images.glob("red_*.png"))[0], sorted(images.glob("blue_*.png"))[0]]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(downloads, tmp_path / "profile") as driver:
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        driver.get(server.url + "/")
        key_box = driver.find_element(By.ID, "key-box")
        wait.until(lambda d: key_box.is_displayed())  # /info answered 401: the page asks for the key
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait.until(lambda d: "resnet10t" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in picked))
        wait.until(lambda d: d.find_element(By.ID, "stat-done").text == "2")
        shown = {card.get_attribute("data-name"): card.find_element(By.CSS_SELECTOR, ".top1").text.split()[0]
                 for card in driver.find_elements(By.CSS_SELECTOR, "#grid .card")}
        assert shown == {p.name: expected[p.name]["class"] for p in picked}
        api = {p.name: server.post([(p.name, read(p))]).json()["results"][0] for p in picked}
        for card in driver.find_elements(By.CSS_SELECTOR, "#grid .card"):  # what the page shows is the API's answer
            want = api[card.get_attribute("data-name")]
            top1 = card.find_element(By.CSS_SELECTOR, ".top1")
            word, percent = re.match(r"(\S+) ([\d.]+)%", top1.text).groups()
            assert word == want["class"] and abs(float(percent) - 100 * want["prob"]) <= 0.05 + 1e-9, (top1.text, want)
            assert bool(top1.find_elements(By.CSS_SELECTOR, ".uncertain-mark")) == want["uncertain"]
            bars = card.find_elements(By.CSS_SELECTOR, ".bar")
            assert len(bars) == len(want["top"]) == len(TINY_CLASSES)
            for bar, top in zip(bars, want["top"]):
                assert bar.find_element(By.CSS_SELECTOR, ".cls").text == top["class"]
                shown = float(bar.find_element(By.CSS_SELECTOR, ".pct").text.rstrip("%"))
                assert abs(shown - 100 * top["prob"]) <= 0.05 + 1e-9, (top, shown)
                fill, track = driver.execute_script(
                    "const b = arguments[0]; return [b.querySelector('.fill').getBoundingClientRect().width, "
                    "b.querySelector('.track').getBoundingClientRect().width];", bar)
                assert track > 20 and abs(fill / track - top["prob"]) < 0.01 + 1 / track, (top, fill, track)
        counts = {row.get_attribute("data-class"): int(row.find_elements(By.TAG_NAME, "td")[1].text)
                  for row in driver.find_elements(By.CSS_SELECTOR, "#stat-classes tbody tr")}
        assert sum(counts.values()) == 2 and set(counts) == {expected[p.name]["class"] for p in picked}

        driver.find_element(By.ID, "download-csv").click()
        csv_path = downloads / "predictions.csv"
        wait.until(lambda d: csv_path.is_file() and csv_path.stat().st_size > 0)
        with csv_path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["path"] for r in rows] == [p.name for p in picked]
        for row in rows:
            want = expected[row["path"]]
            assert list(row) == list(want) and row["class"] == want["class"] and row["uncertain"] == want["uncertain"]
            for key in ("prob", "top1_prob", "top2_prob", "top3_prob", "entropy"):
                assert abs(float(row[key]) - float(want[key])) < TOL, key

        driver.find_element(By.ID, "cam-toggle").click()  # GradCAM overlays for the images already shown
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid img.pic.cam")) == 2)
        src = driver.find_element(By.CSS_SELECTOR, "#grid img.pic.cam").get_attribute("src")
        assert src.startswith("data:image/png;base64,")

        driver.find_element(By.ID, "view-slides").click()
        assert driver.find_element(By.ID, "slide-pos").text == "1 / 2"
        Select(driver.find_element(By.ID, "interval")).select_by_value("1000")
        driver.find_element(By.ID, "play").click()
        wait.until(lambda d: d.find_element(By.ID, "slide-pos").text == "2 / 2")
        driver.find_element(By.ID, "play").click()  # pause
        assert driver.find_element(By.ID, "play").text == "play"
        paused_at = driver.find_element(By.ID, "slide-pos").text
        time.sleep(1.3)
        assert driver.find_element(By.ID, "slide-pos").text == paused_at
        driver.find_element(By.ID, "play").click()  # resume
        wait.until(lambda d: d.find_element(By.ID, "slide-pos").text != paused_at)

        driver.get(server.url + "/docs")  # Swagger UI from the package, offline
        wait.until(lambda d: any("/predict" in e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")))
