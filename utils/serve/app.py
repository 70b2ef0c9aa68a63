"""The HTTP tier of serve.py: a FastAPI app over a utils.serve.service Service.

    app = create_app(EmbeddedService(ModelRunner(load_backend("runs/exp"))), Settings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET / (the web page of utils/web/, offline), POST /predict (multipart field `file`,
repeatable; `?cam=GradCAM` adds overlays), GET /health, /ready, /info, /metrics (Prometheus text)
and /docs (Swagger UI from the swagger-ui-bundle package when installed, so it works offline).
The body is read here, in memory, never past `max_bytes` nor `body_timeout` (408); multipart
parts are parsed in memory (nothing a client sends touches the disk), at most `max_images` of
them. The images are decoded under a memory budget shared by all requests
(utils.serve.service.decode_uploads), and a request is answered within `timeout` of its body's
arrival. Every error is JSON {"error", "status"}; a client that disconnects is logged in one line.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from utils.explain.cam import CAM_TYPES
from utils.serve.service import Job, DecodeBudget, ServeError, Service, Upload, decode_uploads
from utils.serve.settings import HTTP

LOGGER = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
FIELD = "file"  # the multipart form field that carries images (repeatable)
MAX_NAME = 255
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/", "/health", "/ready", "/info", "/metrics", "/predict", "/docs", "/openapi.json")


@dataclass
class Settings:
    """What the HTTP tier enforces.

    Args:
        api_key: bearer token required on /predict, /info and /metrics (None = open).
        max_bytes: request body limit.
        max_images: most images in one request (then 413).
        max_pixels: per-image pixel limit (width x height, checked before decoding).
        max_decode_mb: most MiB of images decoded at once, all requests together (0 = no bound).
        timeout: seconds from a /predict request's complete body to its results (then 504, or 503
            with Retry-After if it is still waiting for its turn to decode).
        body_timeout: seconds for a request's body to arrive (then 408).
    """

    api_key: str | None = None
    max_bytes: int = HTTP.max_bytes
    max_images: int = HTTP.max_images
    max_pixels: int = HTTP.max_pixels
    max_decode_mb: int = HTTP.max_decode_mb
    timeout: float = HTTP.timeout
    body_timeout: float = HTTP.body_timeout


# ------------------------------------------------------------------------------ request body
async def read_body(request: Any, max_bytes: int, body_timeout: float = HTTP.body_timeout) -> bytes:
    """The request body, in memory.

    Args:
        request: the Starlette request.
        max_bytes: refused (413) as soon as the body passes this, from Content-Length or as it arrives.
        body_timeout: seconds for the whole body to arrive (then 408).

    Returns:
        The body.

    Raises:
        ServeError: 400 (a bad Content-Length), 408, 413, or 499 when the client disconnected
            (logged in one line; nobody reads the answer); each closes the connection, whose
            unread body would otherwise hold it open.
    """
    close = {"Connection": "close"}
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ServeError(400, f"invalid Content-Length header: {length[:40]!r}", close)
        if int(length) > max_bytes:
            raise ServeError(413, f"request body of {int(length)} bytes is over the limit of {max_bytes} bytes (--max_bytes)",
                             close)
    chunks: list[bytes] = []
    size = 0
    of = f"of {length} " if length is not None else ""
    try:
        async with asyncio.timeout(body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise ServeError(413, f"request body is over the limit of {max_bytes} bytes (--max_bytes)", close)
                chunks.append(chunk)
    except TimeoutError:
        raise ServeError(408, f"the request body did not arrive within {body_timeout:g}s (--body_timeout): "
                              f"{size} {of}bytes came", close) from None
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        LOGGER.warning("%s disconnected after %d %sbytes of its %s %s body", client, size, of, request.method,
                       request.url.path)
        raise ServeError(499, "the client disconnected before its body arrived", close) from None
    return b"".join(chunks)


def parse_multipart(content_type: str, body: bytes, field_name: str = FIELD,
                    max_images: int = HTTP.max_images) -> list[Upload]:
    """The files of a multipart/form-data body, all in field `field_name`, kept in memory.

    Args:
        content_type: the request's Content-Type header.
        body: the request body.
        field_name: the form field of the images.
        max_images: most parts (images) accepted.

    Returns:
        The uploads, in the order sent.

    Raises:
        ServeError: an empty body (400), another content type (415), a malformed or cut-off body
            (400), another form field (400), no file at all (400), more than max_images (413).
    """
    from python_multipart import MultipartParser
    from python_multipart.multipart import parse_options_header

    how = f"send images as multipart/form-data in the field '{field_name}' (curl -F {field_name}=@cat.jpg)"
    if not body:
        raise ServeError(400, f"empty request body: {how}")
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise ServeError(415, f"content type '{(content_type or 'none')[:80]}' is not multipart/form-data: {how}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServeError(400, "multipart/form-data without a boundary in the Content-Type header")
    parts: list[dict[str, Any]] = []
    state: dict[str, Any] = {"part": None, "field": b"", "value": b""}

    def on_part_begin() -> None:
        if len(parts) >= max_images:
            raise ServeError(413, f"more than {max_images} images in one request (--max_images): "
                                  "send them in several requests")
        state["part"] = {"headers": {}, "data": []}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["part"]["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["part"]["data"].append(data[start:end])

    def on_part_end() -> None:
        parts.append(state["part"])
        state["part"] = None

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except ServeError:
        raise
    except Exception as err:  # noqa: BLE001 - python-multipart raises its own error types
        raise ServeError(400, f"malformed multipart body ({err})") from None
    if state["part"] is not None or not parts:
        raise ServeError(400, f"the multipart body is cut off or holds no part: {how}")
    uploads = []
    for n, part in enumerate(parts):
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if name != field_name:
            raise ServeError(400, f"unexpected form field '{name[:60]}': {how}")
        filename = disposition.get(b"filename", f"image{n + 1}".encode()).decode("utf-8", "replace")
        uploads.append(Upload(filename[-MAX_NAME:] or f"image{n + 1}", b"".join(part["data"])))
    return uploads


# ------------------------------------------------------------------------------ metrics
@dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float, times: int = 1) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += times
        self.total += value * times
        self.count += times

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Request counts and /predict latency of the HTTP tier (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.images = 0

    def request(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            if path == "/predict":
                self.latency.observe(seconds)

    def predicted(self, images: int) -> None:
        with self.lock:
            self.images += images

    def render(self, stats: dict[str, Any]) -> str:
        """Prometheus text format: these counts plus the service's batch sizes and gauges."""
        with self.lock:
            lines = ["# HELP serve_requests_total HTTP requests by path and status.", "# TYPE serve_requests_total counter"]
            lines += [f'serve_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(self.requests.items())]
            lines += self.latency.lines("serve_request_duration_seconds", "Time to answer POST /predict.")
            lines += ["# HELP serve_images_total Images predicted.", "# TYPE serve_images_total counter",
                      f"serve_images_total {self.images}"]
        sizes: Counter[int] = stats.get("batch_sizes", Counter())
        batches = Histogram(BATCH_BUCKETS)
        for size, n in sorted(sizes.items()):
            batches.observe(size, n)
        lines += ["# HELP serve_batches_total Batches the model ran.", "# TYPE serve_batches_total counter",
                  f"serve_batches_total {batches.count}"]
        lines += batches.lines("serve_batch_size", "Images per batch the model ran.")
        for name, value in stats.get("gauges", {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def route_label(path: str) -> str:
    """A bounded label for a request path (unknown paths share one)."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") or path.startswith("/docs-static/") else "other"


class CountRequests:
    """ASGI middleware: every HTTP request counted by path and status, /predict timed."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(route_label(scope.get("path", "")), status[0], time.perf_counter() - start)


# ------------------------------------------------------------------------------ the app
def check_cam(cam: str, info: dict[str, Any]) -> str | None:
    """The ?cam= value checked against the CAM methods and the model's format."""
    if not cam:
        return None
    if cam not in CAM_TYPES:
        raise ServeError(400, f"unknown cam '{cam[:40]}'; choose one of {', '.join(CAM_TYPES)}")
    if not info.get("cam_types"):
        raise ServeError(400, f"cam={cam} needs gradients through a PyTorch model; this one is "
                              f"{info.get('model_type', 'not torch')} (serve --model_type torch)")
    return cam


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error as JSON {"error", "status"} (401 asks for a bearer token)."""
    headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers or None)


def check_key(request: Request, api_key: str | None) -> None:
    """Raise 401 unless the request carries 'Authorization: Bearer <api_key>' (constant-time compare)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ServeError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ServeError(401, "wrong API key")


PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "one or more images (repeat the field)"}}}}}}}


def create_app(service: Service, settings: Settings) -> FastAPI:
    """The FastAPI app (see the module docstring); the service starts and stops with it."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    budget = DecodeBudget(settings.max_decode_mb)
    docs = offline_docs()
    app = FastAPI(title="pytorch-classifier-ng serve", version="1", lifespan=lifespan, redoc_url=None,
                  docs_url=None if docs else "/docs",
                  description="Predict images with a trained run: POST them to /predict as multipart field `file`.")
    app.state.decode_budget = budget  # shared by every request of this app
    app.openapi_version = "3.0.3"  # what the bundled Swagger UI 4 renders; the schema uses nothing of 3.1
    app.add_middleware(CountRequests, metrics=metrics)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    if docs:
        _mount_docs(app, docs)
    _add_status_routes(app, service, settings, metrics, budget)
    _add_predict_route(app, service, settings, metrics, budget)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return error_response(err.status, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        return error_response(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")


def _add_status_routes(app: FastAPI, service: Service, settings: Settings, metrics: Metrics, budget: DecodeBudget) -> None:
    async def auth(request: Request) -> None:  # async: FastAPI would run a def in its thread pool
        check_key(request, settings.api_key)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/health", summary="liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="readiness: the model is loaded (with Redis: a worker is alive)")
    async def ready() -> Any:
        ok, reason = service.ready()
        return {"ready": True, "reason": reason} if ok else error_response(503, f"not ready: {reason}")

    @app.get("/info", dependencies=[Depends(auth)], summary="the model: name, classes, image size, backend")
    async def info() -> dict[str, Any]:
        return {**service.info(), "max_bytes": settings.max_bytes, "max_images": settings.max_images,
                "max_pixels": settings.max_pixels, "max_decode_mb": settings.max_decode_mb,
                "timeout": settings.timeout, "body_timeout": settings.body_timeout, "auth": settings.api_key is not None}

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=PlainTextResponse,
             summary="request counts, latency and batch sizes (Prometheus text format)")
    async def prometheus() -> PlainTextResponse:
        stats = await service.stats()  # a ServeError (503) when its counts cannot be read
        stats["gauges"] = {**stats.get("gauges", {}), "serve_decode_bytes": budget.used,
                           "serve_decode_bytes_peak": budget.peak, "serve_decode_waiting": budget.waiting()}
        decoded = ["# HELP serve_decoded_images_total Images decoded, on the event loop (small requests) or in threads.",
                   "# TYPE serve_decoded_images_total counter"]
        decoded += [f'serve_decoded_images_total{{where="{where}"}} {budget.decoded[where]}' for where in ("event_loop", "thread")]
        return PlainTextResponse(metrics.render(stats) + "\n".join(decoded) + "\n", media_type="text/plain; version=0.0.4")


def _add_predict_route(app: FastAPI, service: Service, settings: Settings, metrics: Metrics, budget: DecodeBudget) -> None:
    async def auth(request: Request) -> None:  # async: FastAPI would run a def in its thread pool
        check_key(request, settings.api_key)

    @app.post("/predict", dependencies=[Depends(auth)], openapi_extra=PREDICT_BODY,
              summary="predict one or more images (multipart field 'file', repeatable)")
    async def predict(request: Request,
                      cam: str = Query("", description=f"add a CAM overlay (base64 PNG): {', '.join(CAM_TYPES)}")) -> Any:
        t0 = time.perf_counter()
        ok, reason = service.ready()
        if not ok:
            raise ServeError(503, f"not ready: {reason}")
        cam_type = check_cam(cam, service.info())
        body = await read_body(request, settings.max_bytes, settings.body_timeout)
        uploads = parse_multipart(request.headers.get("content-type", ""), body, max_images=settings.max_images)
        del body
        arrived = time.perf_counter()  # --timeout counts from here: a slow body is --body_timeout's
        tensors = await decode_uploads(uploads, service.preprocessor(), budget, settings.timeout)
        jobs = [Job(u.name, t, cam_type) for u, t in zip(uploads, tensors)]
        del uploads, tensors
        results = await service.predict(jobs, max(0.001, settings.timeout - (time.perf_counter() - arrived)))
        metrics.predicted(len(results))
        model = service.info()
        return {"model": model["model_name"], "model_type": model["model_type"],
                "time_ms": round(1000 * (time.perf_counter() - t0), 3), "results": results}


def offline_docs() -> Path | None:
    """Swagger UI's files from the swagger-ui-bundle package, if installed (else /docs uses a CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def _mount_docs(app: FastAPI, folder: Path) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-static", StaticFiles(directory=folder), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="serve.py API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon-32x32.png")
