"""The model side of serving: upload decoding, the model behind one call, dynamic batching.

    backend = load_backend("runs/exp")                                  # any format (utils.infer.backends)
    runner = ModelRunner(backend)                                       # jobs -> one result dict each
    service = EmbeddedService(runner, max_batch=16, max_wait_ms=2)      # a batching thread in this process
    app = utils.serve.app.create_app(service, Settings())               # the HTTP tier (serve.py runs it)

The HTTP tier and the model meet at the `Service` interface (`preprocessor`, `info`, `ready`,
`predict`, `stats`): `EmbeddedService` runs the model in this process on one batching thread;
`utils.serve.redis_queue.RedisService` sends every image through a Redis stream to `serve.py --worker`
processes on any machine. Either way the HTTP tier decodes each image with the loader used for
training (`decode_image` -> utils.data.decode.load_image: EXIF orientation, every mode, the bomb limit)
under a pixel limit, and hands on only the model's uint8 input (`Preprocessor`, from the model's
meta alone). `decode_uploads` decodes a request's images one after another, each waiting its
turn (first come, first served) until the memory it takes to decode (estimated from its header:
`decode_bytes`) fits in a budget shared by all requests (`DecodeBudget`, --max_decode_mb), so
that the memory of decoding is bounded whatever the number of requests, and gives up at --timeout. `ModelRunner` is predict.py's code path: `InputPlan` -> `Ensemble.predict` ->
`prediction_rows` (top-5, entropy, uncertain: the PredictionRow predict.py writes, as JSON), plus CAM overlays (utils.explain.cam) as base64 PNGs.
"""
from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import io
import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from utils.core.names import CAM_TYPES
from utils.core.schema import PreprocessSpec
from utils.data.decode import Header, HeaderError, load_image, read_header
from utils.infer.ensemble import Ensemble, InputPlan, Member
from utils.infer.ood import Rejector, predict_maybe_rejecting
from utils.infer.rows import prediction_rows
from utils.serve.settings import BATCH, HTTP, MODEL

if TYPE_CHECKING:  # torch only for CAM overlays: an exported model is served without it
    import torch

LOGGER = logging.getLogger(__name__)
RETRY_AFTER_S = 2  # the Retry-After of a request that waited --timeout for its turn to decode
MIB = 1024 * 1024
# A request this small (all its images together) is decoded on the event loop rather than in the
# thread pool: about 1.4 ms for a 256 x 256 PNG here, less than what two trips through the pool
# cost the process in the GIL handoffs they take from the model's thread (benchmarks/serve_load.py
# at 32 clients of one 96 px image each). Larger requests keep the loop free for others.
INLINE_DECODE_PIXELS = 256 * 256
INLINE_DECODE_BYTES = 256 * 1024
# Bytes a pixel takes at the peak of decoding an image of this mode and converting it to the
# model's 8-bit RGB or L (utils.data.decode.load_image), the larger of the two; measured with
# Pillow 12 by benchmarks/serve_memory.py --modes. Modes not listed count as the largest.
DECODE_BYTES = {"1": 6, "L": 5, "P": 6, "RGB": 5, "RGBA": 20, "RGBa": 20, "LA": 20, "La": 20, "PA": 20,
                "CMYK": 9, "YCbCr": 9, "LAB": 9, "HSV": 9, "RGBX": 9, "I;16": 26, "I;16B": 26, "I;16L": 26,
                "I;16N": 26, "I": 28, "F": 28}


class ServeError(Exception):
    """A request that cannot be served: answered as {"error": message, "status": status}.

    Args:
        status: the HTTP status.
        message: one line: what, where, how to fix.
        headers: HTTP headers of the answer (Retry-After).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class Upload:
    """One image of a request, as sent."""

    name: str
    data: bytes


@dataclass
class Job:
    """One image for the model: its name, its uint8 model input (C, H, W), numpy, and the CAM asked for."""

    name: str
    tensor: np.ndarray
    cam: str | None = None


# What each kind of bad header is answered with (utils.data.decode.HeaderError.kind); otherwise 415.
HEADER_STATUS = {"empty": 400, "bomb": 413}


def check_header(data: bytes, name: str, max_pixels: int) -> Header:
    """An uploaded image's format and pixel count, from its header (nothing is decoded).

    Args:
        data: the file as uploaded.
        name: its name, for the messages.
        max_pixels: the per-image pixel limit.

    Returns:
        The header.

    Raises:
        ServeError: an empty file (400), not an image (415), too many pixels (413).
    """
    try:
        header = read_header(io.BytesIO(data))
    except HeaderError as err:
        raise ServeError(HEADER_STATUS.get(err.kind, 415), f"{name}: {err}") from None
    if header.width * header.height > max_pixels:
        raise ServeError(413, f"{name}: {header.width}x{header.height} = {header.width * header.height} pixels is over the "
                              f"limit of {max_pixels} pixels (--max_pixels)")
    return header


def decode_bytes(pixels: int, mode: str) -> int:
    """The memory decoding an image takes at its peak (DECODE_BYTES), from its header's size and mode.

    Args:
        pixels: width x height.
        mode: the Pillow mode of the file (its header's).

    Returns:
        Bytes.
    """
    return pixels * DECODE_BYTES.get(mode, max(DECODE_BYTES.values()))


def map_large_allocations(threshold: int = 4 * MIB) -> bool:
    """Have glibc's malloc take blocks of `threshold` bytes or more straight from the system (mmap),
    so that the memory of a decoded image goes back to it when the image is freed.

    glibc raises that threshold by itself, up to 32 MiB, after the first such block is freed; from
    then on Pillow's 16 MiB image blocks come from the arena of the thread that decodes, which keeps
    them. Here two 39.6 MP PNGs decoded at a time by 16 threads took the process to 1.65 GB, and
    1.9 GB stayed; with the threshold fixed, 0.34 GB, and nothing stayed.

    Args:
        threshold: the size from which a block is mapped.

    Returns:
        Whether it was set (glibc only; elsewhere nothing changes).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def decode_image(data: bytes, name: str, channels: Sequence[int], max_pixels: int) -> dict[int, Image.Image]:
    """Decode one uploaded image as training does (utils.data.decode.load_image), per channel count.

    Raises:
        ServeError: as check_header, or an image that fails to decode, such as a truncated one (422).
    """
    fmt = check_header(data, name, max_pixels).format
    try:
        return {c: load_image(io.BytesIO(data), c) for c in channels}  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - any decoder failure is the client's file
        raise ServeError(422, f"{name}: the {fmt} image cannot be decoded, it is truncated or corrupt "
                              f"({type(err).__name__}: {str(err)[:160]})") from None


class Preprocessor:
    """Upload -> the model's uint8 input, from the model's meta alone (no model needed).

    Args:
        spec: the model's preprocessing (backend.meta.preprocess).
        max_pixels: the per-image pixel limit.
    """

    def __init__(self, spec: PreprocessSpec, max_pixels: int) -> None:
        self.plan = InputPlan([spec])
        self.channels = sorted(set(self.plan.channels))
        self.max_pixels = max_pixels

    def cost(self, upload: Upload) -> tuple[int, Header]:
        """The memory decoding the upload takes (decode_bytes), and its header (raises as check_header)."""
        head = check_header(upload.data, upload.name, self.max_pixels)
        return decode_bytes(head.width * head.height, head.mode), head

    def __call__(self, upload: Upload) -> np.ndarray:
        images = decode_image(upload.data, upload.name, self.channels, self.max_pixels)
        return self.plan.inputs(images)[0]


# ------------------------------------------------------------------------------ decoding, bounded
class DecodeBudget:
    """The memory of the images being decoded at once, all requests together (--max_decode_mb): an
    image waits, first come first served, until its decode_bytes fit. Used from the event loop only.

    Args:
        max_decode_mb: most MiB decoded at once; 0 = no bound (decode_uploads refuses an image
            that needs more on its own).
    """

    def __init__(self, max_decode_mb: int = HTTP.max_decode_mb) -> None:
        self.limit = max_decode_mb * MIB
        self.used = 0
        self.peak = 0  # the most bytes taken at once so far
        self.decoded: Counter[str] = Counter()  # images decoded, by where: "event_loop" or "thread"
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def waiting(self) -> int:
        """Images waiting for their turn."""
        return sum(not future.done() for _, future in self._waiters)

    def _fits(self, size: int) -> bool:
        return self.limit <= 0 or self.used + size <= self.limit

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():  # its request gave up
                self._waiters.popleft()
            elif self._fits(size):
                self._waiters.popleft()
                self._take(size)
                future.set_result(None)
            else:
                break  # first come, first served: a large image is not overtaken for ever by small ones

    async def acquire(self, size: int) -> None:
        """Wait until `size` more bytes fit; a wait that is cancelled takes nothing."""
        if not self._waiters and self._fits(size):
            self._take(size)
            return
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():  # granted just as it was cancelled
                self.release(size)
            else:
                self._grant()  # the head of the line may have left
            raise

    def release(self, size: int) -> None:
        """Give back the bytes of an image decoded (or failed)."""
        self.used -= size
        self._grant()


def _decoded(budget: DecodeBudget, size: int, work: asyncio.Future) -> None:
    """The decoding thread is done: its bytes go back to the budget (even if its request gave up)."""
    budget.release(size)
    if not work.cancelled():
        work.exception()  # retrieved: a failure of a request that gave up is not logged as unhandled


async def decode_uploads(uploads: Sequence[Upload], pre: Preprocessor, budget: DecodeBudget,
                         timeout: float) -> list[np.ndarray]:
    """The model inputs of a request's uploads: headers first (a bad image is refused before anything
    is decoded), then one image after another, each once the memory it takes fits in the budget.
    A small request (INLINE_DECODE_BYTES, INLINE_DECODE_PIXELS) is read and decoded right here on
    the event loop, a larger one in the thread pool.

    Args:
        uploads: the request's images.
        pre: the model's preprocessor.
        budget: the memory decoded at once, shared by all requests.
        timeout: seconds for all of it.

    Returns:
        One uint8 model input per upload, in order.

    Raises:
        ServeError: a bad image (4xx), or one that needs more than the whole budget (413); 503 with
            Retry-After when `timeout` passes while an image waits for its turn; 504 when it passes
            while this request's images are decoded.
    """
    inputs: list[np.ndarray] = []
    waiting: list[tuple[Upload, int]] = []  # the image waiting for its turn, if any
    try:
        async with asyncio.timeout(timeout):
            await _decode_all(uploads, pre, budget, inputs, waiting)
    except TimeoutError:
        if waiting:
            raise ServeError(503, f"{waiting[0][0].name} waited {timeout:g}s (--timeout) for its turn to be decoded: "
                                  f"{budget.used / MIB:.0f} MiB of other images are being decoded (--max_decode_mb "
                                  f"{budget.limit // MIB}); retry after {RETRY_AFTER_S} s",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        raise ServeError(504, f"decoding {len(uploads)} image(s) took over {timeout:g}s (--timeout; {len(inputs)} done): "
                              "send fewer or smaller images per request") from None
    return inputs


async def _decode_all(uploads: Sequence[Upload], pre: Preprocessor, budget: DecodeBudget, inputs: list[np.ndarray],
                      waiting: list[tuple[Upload, int]]) -> None:
    """decode_uploads' work: appends to `inputs`; `waiting` holds the image waiting for its turn."""
    from starlette.concurrency import run_in_threadpool  # (the HTTP tier's threads, as for any blocking call)

    small = sum(len(u.data) for u in uploads) <= INLINE_DECODE_BYTES
    costs = [pre.cost(u) for u in uploads] if small else await run_in_threadpool(lambda: [pre.cost(u) for u in uploads])
    for upload, (size, head) in zip(uploads, costs):
        if budget.limit and size > budget.limit:
            raise ServeError(413, f"{upload.name}: decoding this {head} image takes about {size / MIB:.0f} MiB, "
                                  f"over the {budget.limit // MIB} MiB decoded at once (--max_decode_mb): send "
                                  "it smaller, or as 8-bit RGB")
    inline = small and sum(head.width * head.height for _, head in costs) <= INLINE_DECODE_PIXELS
    for upload, (size, _) in zip(uploads, costs):
        waiting.append((upload, size))
        await budget.acquire(size)
        waiting.clear()
        budget.decoded["event_loop" if inline else "thread"] += 1
        if inline:
            try:
                inputs.append(pre(upload))
            finally:
                budget.release(size)
            continue
        work = asyncio.ensure_future(run_in_threadpool(pre, upload))
        work.add_done_callback(partial(_decoded, budget, size))
        inputs.append(await asyncio.shield(work))  # a request that gives up leaves the thread its bytes


# ------------------------------------------------------------------------------ the model side
class CamRenderer:
    """CAM overlays of a torch backend's model, as base64 PNGs (the layer is found on first use).

    Args:
        backend: a torch backend (it has `.model` and `.normalize`).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        spec = backend.meta.preprocess
        self.crop, self.channels = spec.crop, spec.channels
        self.size = max(224, self.crop)
        self.layer: Any = None

    def __call__(self, views: torch.Tensor, targets: Sequence[int], cam_type: str) -> list[str]:
        from utils.explain.cam import cam_maps, find_cam_layer, import_grad_cam, overlay, to_hwc_rgb

        if self.layer is None:
            import_grad_cam()
            self.layer = find_cam_layer(self.backend.model, self.crop, self.channels)
        x = self.backend.normalize(views.to(self.backend.device))
        maps = cam_maps(self.backend.model, x, self.layer, cam_type, list(targets), batch_size=max(1, len(views)))
        out = []
        for view, cam in zip(views, maps):
            image = Image.fromarray(overlay(to_hwc_rgb(view), cam)).resize((self.size, self.size), Image.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out


class ModelRunner:
    """A loaded backend behind one call: jobs -> one result dict per job (predict.py's code path).

    Args:
        backend: from utils.infer.backends.load_backend (torch, torchscript, onnx, openvino, tensorrt).
        conf_threshold: a top-1 probability below this marks a result uncertain (as predict.py).
        reject: name images of no trained class unknown (as predict.py --reject: utils.infer.ood.Rejector).
    """

    def __init__(self, backend: Any, conf_threshold: float = MODEL.conf_threshold, reject: bool = False) -> None:
        self.backend = backend
        self.meta = backend.meta
        self.class_names = list(backend.meta.class_names)
        self.conf_threshold = conf_threshold
        self.ensemble = Ensemble([Member(backend.meta.model_name, backend, backend.meta.preprocess)])
        self.plan = self.ensemble.plan()
        self.rejector = Rejector(self.ensemble) if reject else None
        self.cam = CamRenderer(backend) if getattr(backend, "model_type", "") == "torch" else None

    def describe(self) -> dict[str, Any]:
        """What /info shows of the model."""
        described = self.meta.to_dict()
        return {**{k: described[k] for k in ("model_name", "num_classes", "class_names", "image_size", "image_channel",
                                             "preprocess")},
                "model_type": self.backend.model_type, "cam_types": list(CAM_TYPES) if self.cam else [],
                "conf_threshold": self.conf_threshold,
                "reject": {"score": self.rejector.score, "threshold": self.rejector.threshold} if self.rejector else None}

    def input_shape(self) -> tuple[int, ...]:
        spec = self.meta.preprocess
        return (spec.channels, spec.crop, spec.crop)

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any] | ServeError]:
        """Predict a batch of jobs together; CAM overlays for the jobs that ask for one.

        Returns:
            One result dict per job, or a ServeError for a job whose CAM failed (the others
            of the batch are not failed with it).
        """
        t0 = time.perf_counter()
        batch = np.stack([j.tensor for j in jobs])
        probs, ood = predict_maybe_rejecting(self.ensemble, self.rejector, [batch], self.plan)
        rows = prediction_rows([j.name for j in jobs], probs, self.class_names, self.meta.task_type, self.conf_threshold,
                               self.meta.thresholds, ood)
        results: list[dict[str, Any] | ServeError] = [row.to_json() | {"batch_size": len(jobs)} for row in rows]
        for cam_type in sorted({j.cam for j in jobs if j.cam}):
            idx = [i for i, j in enumerate(jobs) if j.cam == cam_type]
            try:
                if self.cam is None:
                    raise ServeError(400, f"cam={cam_type} needs gradients through a PyTorch model: serve --model_type torch")
                import torch

                pngs = self.cam(torch.from_numpy(batch[idx]), [rows[i].index for i in idx], cam_type)
            except Exception as err:  # noqa: BLE001 - a CAM failure fails the images that asked for it
                error = err if isinstance(err, ServeError) else ServeError(500, f"{cam_type} failed ({type(err).__name__}: "
                                                                                 f"{str(err).splitlines()[0][:200]})")
                for i in idx:
                    results[i] = error
                continue
            for i, png in zip(idx, pngs):
                results[i]["cam"] = {"type": cam_type, "class": rows[i].class_name, "png": png}  # type: ignore[index]
        ms = round(1000 * (time.perf_counter() - t0), 3)
        for r in results:
            if isinstance(r, dict):
                r["batch_ms"] = ms
        return results


# ------------------------------------------------------------------------------ batching
class Batcher:
    """Groups jobs submitted from any thread into batches run by one thread.

    A batch starts with the first waiting job and takes more until it holds `max_batch` or
    `max_wait_ms` have passed since it started; with max_wait_ms 0 it takes only those already
    waiting. Jobs whose future was cancelled (a request that timed out) are dropped.

    Args:
        fn: jobs -> one result per job (ModelRunner.run).
        max_batch: most jobs per batch (1 = no batching).
        max_wait_ms: how long a batch waits to fill.
    """

    def __init__(self, fn: Callable[[list[Job]], list[Any]], max_batch: int = BATCH.max_batch,
                 max_wait_ms: float = BATCH.max_wait_ms) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self.sizes: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout)
            self.thread = None

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self.queue.put((job, future))
        return future

    def depth(self) -> int:
        return self.queue.qsize()

    def _collect(self, first: tuple[Job, Future]) -> tuple[list[tuple[Job, Future]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            live = [(job, fut) for job, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            with self.lock:
                self.sizes[len(live)] += 1
            try:
                results = self.fn([job for job, _ in live])
            except Exception as err:  # noqa: BLE001 - a failed batch fails its requests, not the server
                if not isinstance(err, ServeError):
                    LOGGER.exception("batch of %d failed", len(live))
                for _, fut in live:
                    fut.set_exception(err)
                continue
            for (_, fut), result in zip(live, results):
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def batch_sizes(self) -> Counter[int]:
        with self.lock:
            return Counter(self.sizes)


# ------------------------------------------------------------------------------ services
class Service(Protocol):
    """What the HTTP tier needs of the model side."""

    mode: str

    def preprocessor(self) -> Preprocessor: ...
    def info(self) -> dict[str, Any]: ...
    def ready(self) -> tuple[bool, str]: ...
    async def predict(self, jobs: list[Job], timeout: float) -> list[dict[str, Any]]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class EmbeddedService:
    """The model in this process, on one batching thread.

    Args:
        runner: the loaded model.
        max_batch: most images per batch (1 = no batching).
        max_wait_ms: how long a batch waits to fill.
        max_pixels: the per-image pixel limit of the uploads.
    """

    mode = "embedded"

    def __init__(self, runner: ModelRunner, max_batch: int = BATCH.max_batch, max_wait_ms: float = BATCH.max_wait_ms,
                 max_pixels: int = HTTP.max_pixels) -> None:
        self.runner = runner
        self.batcher = Batcher(runner.run, max_batch, max_wait_ms)
        self._pre = Preprocessor(runner.meta.preprocess, max_pixels)
        self._ready = False

    async def start(self) -> None:
        # one untimed batch first, so the first request does not pay for the first forward pass
        blank = Job("warm-up", np.zeros(self.runner.input_shape(), dtype=np.uint8))
        await asyncio.get_running_loop().run_in_executor(None, self.runner.run, [blank])
        self.batcher.start()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)

    def preprocessor(self) -> Preprocessor:
        return self._pre

    def info(self) -> dict[str, Any]:
        return {**self.runner.describe(), "mode": self.mode, "max_batch": self.batcher.max_batch,
                "max_wait_ms": self.batcher.max_wait * 1000}

    def ready(self) -> tuple[bool, str]:
        return (True, "model loaded") if self._ready else (False, "warming up")

    async def predict(self, jobs: list[Job], timeout: float) -> list[dict[str, Any]]:
        futures = [asyncio.wrap_future(self.batcher.submit(job)) for job in jobs]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
        except asyncio.TimeoutError:
            for fut in futures:
                fut.cancel()
            raise ServeError(504, f"no result within {timeout:.1f}s (--timeout); the server is overloaded") from None

    async def stats(self) -> dict[str, Any]:
        return {"batch_sizes": self.batcher.batch_sizes(), "gauges": {"serve_queue_depth": self.batcher.depth()}}


