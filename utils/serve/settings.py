"""The defaults of serving, in one place: serve.py's flags (their values and the [default] of
their help) and the library's constructors (utils.serve.app.Settings, utils.serve.service's
EmbeddedService, Batcher and ModelRunner, utils.serve.redis_queue's RedisService and RedisWorker)
all read them here.

    BATCH.max_batch                     # 16
    flag_defaults(MODEL, BATCH)         # {"save_path": "runs/exp", ..., "max_wait_ms": 2.0}

One frozen dataclass per group of flags that a role of serve.py takes or refuses as a whole (a
worker takes MODEL, BATCH, QUEUE and WORKER; the API tier HTTP and QUEUE; one process MODEL,
BATCH and HTTP). No imports beyond the standard library: serve.py --help loads nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelDefaults:
    """The model a server or worker loads, and how its results are marked."""

    save_path: str = "runs/exp"
    model_type: str = "torch"
    device: str = ""  # a GPU if there is one
    conf_threshold: float = 0.5  # as predict.py's


@dataclass(frozen=True)
class BatchDefaults:
    """Dynamic batching (utils.serve.service.Batcher, the Redis worker's batches)."""

    max_batch: int = 16
    max_wait_ms: float = 2.0


@dataclass(frozen=True)
class HttpDefaults:
    """What the HTTP tier binds to and enforces."""

    host: str = "127.0.0.1"  # loopback: any other address needs an API key
    port: int = 8000
    max_bytes: int = 32 * 1024 * 1024
    max_images: int = 64  # per request
    max_pixels: int = 40_000_000  # under utils.data.decode.MAX_IMAGE_PIXELS, the loader's bomb limit
    # MiB of images being decoded at once, all requests together (0: no bound): five 8-bit RGB
    # images at --max_pixels (5 bytes a pixel at the peak, utils.serve.service.DECODE_BYTES)
    max_decode_mb: int = 1024
    timeout: float = 30.0  # from a request's complete body to its answer
    body_timeout: float = 30.0  # for the body to arrive


@dataclass(frozen=True)
class QueueDefaults:
    """The Redis queue between the API tier and its workers."""

    queue_name: str = "serve"  # the key prefix: one model per name


@dataclass(frozen=True)
class WorkerDefaults:
    """How workers notice each other's deaths."""

    heartbeat_s: float = 3.0
    max_deliveries: int = 3


MODEL = ModelDefaults()
BATCH = BatchDefaults()
HTTP = HttpDefaults()
QUEUE = QueueDefaults()
WORKER = WorkerDefaults()
GROUPS = (MODEL, BATCH, HTTP, QUEUE, WORKER)


def flag_defaults(*groups: Any) -> dict[str, Any]:
    """{flag name: default} of some groups (all of GROUPS when none are given).

    Args:
        groups: instances of the dataclasses above.

    Returns:
        The flags' defaults, in the groups' order.
    """
    return {name: value for group in groups or GROUPS for name, value in asdict(group).items()}


def shown(value: Any) -> str:
    """A default as --help shows it: 2.0 -> 2, '' -> '', a size in bytes with its MiB.

    Args:
        value: a default of flag_defaults().

    Returns:
        The text after "(default: " in the help.
    """
    if value == "":
        return "''"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value} = {value // (1024 * 1024)} MiB"
    return str(value)
