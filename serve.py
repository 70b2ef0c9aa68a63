"""Serve a trained run over HTTP: a REST API, a web page, dynamic batching, and Redis for many workers.

    python serve.py --save_path runs/exp --port 8000                     # one process (embedded)
    python serve.py --save_path runs/exp --model_type onnx               # any backend of utils.infer.backends
    python serve.py --queue redis://127.0.0.1:6379/0 --port 8000         # API tier: queues images in Redis
    python serve.py --queue redis://127.0.0.1:6379/0 --worker --save_path runs/exp   # a model worker (any number)

Then open http://127.0.0.1:8000/ (the web page), http://127.0.0.1:8000/docs (the API), or
    curl -F file=@cat.jpg -F file=@dog.png 'http://127.0.0.1:8000/predict?cam=GradCAM'

The server binds 127.0.0.1 unless --host says otherwise, and then it needs --api_key (or
$SERVE_API_KEY): requests to /predict, /info and /metrics must carry 'Authorization: Bearer KEY'.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
from typing import Any, Sequence

from utils.core.config import ArgumentParser, group_flags
from utils.core.device import compute_threads, set_threads
from utils.core.log import UserError, script_main, settle_heap
from utils.core.options import Options
from utils.core.run import check_model_paths
from utils.data.decode import MAX_IMAGE_PIXELS
from utils.deploy.formats import MODEL_TYPES
from utils.infer.backends import load_backend, model_device
from utils.serve.settings import BATCH, HTTP, MODEL, QUEUE, WORKER, flag_defaults, shown

LOGGER = logging.getLogger("serve")
API_KEY_ENV = "SERVE_API_KEY"
# The flags that only some roles use, with their defaults (utils.serve.settings); None in the
# parser, so that a flag given to a role that ignores it is an error rather than silently unused.
ROLE_FLAGS = {**flag_defaults(), "threads": None}


def role_flag(parser: argparse.ArgumentParser, name: str, help: str, **kwargs: Any) -> None:
    """Add --name with default None, its default (utils.serve.settings) shown at the end of its help.

    Args:
        parser: serve.py's parser.
        name: a flag of ROLE_FLAGS.
        help: what it does, without its default.
        kwargs: more of add_argument (type, choices).
    """
    parser.add_argument(f"--{name}", default=None, help=f"{help} (default: {shown(ROLE_FLAGS[name])})", **kwargs)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Serve a trained run: REST API, web page, dynamic batching, Redis workers.")
    p = parser.add_argument
    role_flag(parser, "save_path", "run folder (its best.pt or export/) or model file; "
              "not for the API tier of --queue (its workers load the model)")
    role_flag(parser, "model_type", "format of the model in --save_path", choices=list(MODEL_TYPES))
    role_flag(parser, "device", "'' (GPU if any), cpu, a GPU index such as 0, or mps (Apple silicon)")
    p("--half", action="store_true", help="float16 inference (CUDA; torch and torchscript)")
    p("--threads", type=int, default=None, help="compute threads of the model (torch, onnxruntime, OpenVINO) (default: a server, CPU cores - 1; a --worker, "
      "PyTorch's default; $OMP_NUM_THREADS wins over both)")
    role_flag(parser, "conf_threshold", "a top-1 probability below this marks an image uncertain", type=float)
    p("--reject", action="store_true", help="answer unknown (with unknown and ood_score) for images of no trained class")
    role_flag(parser, "max_batch", "most images run together; 1 = no batching", type=int)
    role_flag(parser, "max_wait_ms", "how long a batch waits for more images once it has one", type=float)
    role_flag(parser, "host", "address to bind; any but loopback needs --api_key")
    role_flag(parser, "port", "port", type=int)
    p("--api_key", default=None, help=f"bearer token required on /predict, /info, /metrics (default: ${API_KEY_ENV})")
    role_flag(parser, "max_bytes", "request body limit in bytes", type=int)
    role_flag(parser, "max_images", "most images in one request (more: 413)", type=int)
    role_flag(parser, "max_pixels", "per-image pixel limit, checked before decoding", type=int)
    role_flag(parser, "max_decode_mb", "most memory (MiB) of images decoded at once, all requests together: an image "
              "waits its turn (503 with Retry-After at --timeout); 0 = no bound", type=int)
    role_flag(parser, "timeout", "seconds from a request's complete body to its results (then 504)", type=float)
    role_flag(parser, "body_timeout", "seconds for a request's body to arrive (then 408)", type=float)
    p("--access_log", action="store_true", help="log every request (uvicorn's access log)")
    p("--queue", default=None, help="redis://HOST:6379/0: the API tier queues images there for --worker processes")
    role_flag(parser, "queue_name", "prefix of the Redis keys (one model per name)")
    p("--worker", action="store_true", help="run a model worker of --queue instead of the HTTP server")
    role_flag(parser, "heartbeat_s", "a worker silent this long counts as dead: others take over its images", type=float)
    role_flag(parser, "max_deliveries", "an image whose workers died this many times is answered with an error", type=int)
    return group_flags(parser, "serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_role(args: argparse.Namespace, role: str, allowed: dict[str, Any]) -> None:
    """Fill the defaults of the flags this role uses; refuse the flags it would ignore."""
    for name in ROLE_FLAGS:
        if name not in allowed and getattr(args, name) is not None:
            raise UserError(f"--{name} does not apply to {role}")
    for name, default in allowed.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for flag in ("half", "reject"):  # switches of the model
        if getattr(args, flag) and "save_path" not in allowed:
            raise UserError(f"--{flag} does not apply to {role}")
    if args.access_log and "host" not in allowed:
        raise UserError(f"--access_log does not apply to {role}")


def check_decode_budget(args: argparse.Namespace) -> None:
    """Refuse a --max_decode_mb in which an 8-bit RGB image at --max_pixels could never be decoded."""
    if args.max_pixels is None or not args.max_decode_mb:
        return
    from utils.serve.service import MIB, decode_bytes

    need = decode_bytes(args.max_pixels, "RGB")
    if args.max_decode_mb * MIB < need:
        raise UserError(f"--max_decode_mb {args.max_decode_mb}: an 8-bit RGB image of --max_pixels {args.max_pixels} takes "
                        f"about {need / MIB:.0f} MiB to decode, so it could never be; raise it (0: no bound) or lower "
                        "--max_pixels")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and validate the options of the role (embedded server, API tier or worker)."""
    args = get_args_parser().parse_args(argv)
    if args.worker and not args.queue:
        raise UserError("--worker takes images from a queue: pass --queue redis://HOST:6379/0")
    model = {**flag_defaults(MODEL), "threads": None}
    if args.worker:
        _check_role(args, "a --worker (it serves no HTTP)", {**model, **flag_defaults(BATCH, QUEUE, WORKER)})
        if args.api_key:
            raise UserError("--api_key does not apply to a --worker (it serves no HTTP)")
    elif args.queue:
        _check_role(args, "the API tier of --queue (its workers load the model and batch: pass it to serve.py --worker)",
                    flag_defaults(HTTP, QUEUE))
    else:
        _check_role(args, "a server without --queue", {**model, **flag_defaults(BATCH, HTTP)})
    checks = [("max_batch", 1), ("max_bytes", 1), ("max_images", 1), ("max_pixels", 1), ("max_decode_mb", 0),
              ("max_deliveries", 1), ("threads", 1)]
    for name, low in checks:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    for name in ("max_wait_ms", "timeout", "body_timeout", "heartbeat_s"):
        value = getattr(args, name, None)
        if value is not None and not (value >= 0 and (name == "max_wait_ms" or value > 0)):
            raise UserError(f"--{name} must be {'0 or more' if name == 'max_wait_ms' else 'positive'}, got {value}")
    if args.conf_threshold is not None and not 0.0 <= args.conf_threshold <= 1.0:
        raise UserError(f"--conf_threshold must be in [0, 1], got {args.conf_threshold}")
    if args.max_pixels is not None and args.max_pixels > MAX_IMAGE_PIXELS:
        raise UserError(f"--max_pixels {args.max_pixels} is over the loader's decompression-bomb limit of {MAX_IMAGE_PIXELS}")
    check_decode_budget(args)
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    if not args.worker:
        args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        if not is_loopback(args.host) and not args.api_key:
            raise UserError(f"--host {args.host} is reachable from other machines: set --api_key KEY (or ${API_KEY_ENV}) "
                            "so that only clients with the key are served")
    return Options.of(args)


def build_runner(args: Options) -> Any:
    """Load the model of --save_path behind a utils.serve.service.ModelRunner."""
    from utils.serve.service import ModelRunner

    if args.threads:
        set_threads(args.threads)
    elif not args.worker and "OMP_NUM_THREADS" not in os.environ:
        # leave a core to the HTTP tier (decoding, the event loop): on 2 cores, 2 compute threads
        # next to it served 52 requests/s at 8 clients where 1 served 78 (benchmarks/serve_load.py)
        set_threads(max(1, min(compute_threads(), (os.cpu_count() or 1) - 1)))
    backend = load_backend(args.save_path, args.model_type, model_device(args.device, args.model_type), args.half)
    runner = ModelRunner(backend, args.conf_threshold, args.reject)
    if runner.rejector is not None:
        print(runner.rejector.describe, flush=True)
    return runner


def check_port(host: str, port: int) -> None:
    """Fail now, in one line, if host:port cannot be listened on (before the model is loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): another server may be using it; "
                            "pass another --port") from None


def serve_http(args: Options, service: Any, what: str) -> None:
    """Run the FastAPI app on uvicorn until interrupted."""
    import uvicorn

    from utils.serve.app import Settings, create_app
    from utils.serve.service import map_large_allocations

    settings = Settings(api_key=args.api_key, max_bytes=args.max_bytes, max_images=args.max_images,
                        max_pixels=args.max_pixels, max_decode_mb=args.max_decode_mb, timeout=args.timeout,
                        body_timeout=args.body_timeout)
    app = create_app(service, settings)
    map_large_allocations()  # decoded images' memory goes back to the system when freed
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=args.access_log,
                            timeout_graceful_shutdown=5)
    if args.access_log:  # uvicorn logs each request at INFO, under the warning level set for its other lines
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(config)
    url = f"http://{args.host}:{args.port}"
    print(f"serving {what} on {url} (web page {url}/, API docs {url}/docs"
          + (", API key required" if args.api_key else "") + ")", flush=True)
    settle_heap()  # fewer and shorter collector pauses between requests
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (the port was taken since check_port)
        raise UserError(f"could not start the server on {args.host}:{args.port}") from None


def run_worker(args: Options) -> None:
    """A model worker of --queue: until SIGTERM or Ctrl-C (the batch in hand is finished first)."""
    from utils.serve.redis_queue import RedisWorker, safe_url

    runner = build_runner(args)
    worker = RedisWorker(runner, args.queue, args.queue_name, args.max_batch, args.max_wait_ms,
                         args.heartbeat_s, args.max_deliveries)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    print(f"worker {worker.name}: {args.save_path} ({runner.meta.model_name}, {runner.backend.model_type}, model id "
          f"{worker.model_id}) on {safe_url(args.queue)} '{args.queue_name}', batches of up to {args.max_batch}", flush=True)
    settle_heap()
    try:
        worker.run()
    except KeyboardInterrupt:
        worker.stop()
    print(f"worker {worker.name} stopped after {worker.batches} batch(es), {worker.images} image(s)", flush=True)


def main(args: Options) -> None:
    if args.save_path is not None:  # a role that loads the model: one line now, not after the imports
        check_model_paths([args.save_path], "--save_path")
    if args.worker:
        run_worker(args)
        return
    check_port(args.host, args.port)
    if args.queue:
        from utils.serve.redis_queue import RedisService, connect, safe_url

        connect(args.queue)  # a clear line now if Redis is not there
        service = RedisService(args.queue, args.queue_name, args.max_pixels)
        serve_http(args, service, f"the workers of {safe_url(args.queue)} '{args.queue_name}'")
        return
    from utils.serve.service import EmbeddedService

    runner = build_runner(args)
    service = EmbeddedService(runner, args.max_batch, args.max_wait_ms, args.max_pixels)
    serve_http(args, service, f"{args.save_path} ({runner.meta.model_name}, {runner.backend.model_type}, "
                              f"batches of up to {args.max_batch})")


if __name__ == "__main__":
    script_main(main, parse_args)
