"""Scale-out serving through Redis: an API tier that queues images, and model workers anywhere.

    serve.py --queue redis://HOST:6379/0                          # API tier (RedisService): no model
    serve.py --queue redis://HOST:6379/0 --worker --save_path runs/exp   # a worker (RedisWorker), any number

Keys, under a prefix (--queue_name, default `serve`):

- `<p>:jobs`, a stream read by the consumer group `workers`: one entry per image (its uint8 model
  input, name, CAM type, timeout and the reply list to answer on). A worker takes up to
  max_batch entries at once (XREADGROUP), runs them as one batch, pushes each result to its reply
  list, then acknowledges and deletes the entries.
- `<p>:model`, the model the queue serves: its id (a SHA-256 of its file(s), meta and
  --conf_threshold) and meta, claimed by the first worker and kept by every worker's heartbeat
  (it expires a heartbeat after the last worker stops). A worker whose model is another refuses
  to start, in one line; the API tier reads the model's meta from it (it never loads the model)
  and stamps each image with the id, and a worker refuses an image stamped with another id, so
  no image is ever answered by another model.
- `<p>:worker:<id>`, each worker's heartbeat (its model's id), refreshed every heartbeat/3 s and
  expiring after the heartbeat: the API tier is ready while one serves the queue's model.
- `<p>:reply:<api id>`, one list per API process, read by one BLPOP loop that wakes the waiting
  requests.
- `<p>:stats:batches`, a hash of batch size -> batches run (for /metrics); `<p>:stats:retried` and
  `<p>:stats:failed` count entries taken over from dead workers and entries given up on.

No request is lost or left hanging: an entry stays pending in the group until a worker
acknowledges it, so when a worker dies mid-batch (its heartbeat expires), another worker claims
its pending entries (XCLAIM) and runs them again; an entry already delivered --max_deliveries
times is answered with an error instead (an image that kills workers). An entry older than its
timeout is dropped unanswered, because its request has already been answered 504 by the API tier,
which never waits past --timeout. Ages come from stream IDs and Redis' clock, so machine clocks
need not agree.

Redis may restart and lose everything (it is started without persistence, as the README does):
workers and the API tier wait while it is away, then carry on: the API tier's XADD creates the
stream again, the workers create their group (from the stream's first entry, so that nothing
queued meanwhile is missed), and the heartbeats bring back the workers' keys and the queue's
model; only the images queued at that moment are lost (their requests get a 504).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.core.log import UserError
from utils.core.schema import PreprocessSpec
from utils.deploy.formats import get_format
from utils.serve.service import Job, ModelRunner, Preprocessor, ServeError
from utils.serve.settings import BATCH, HTTP, QUEUE, WORKER

LOGGER = logging.getLogger(__name__)

GROUP = "workers"
STREAM_MAXLEN = 100_000  # approximate cap on queued images (old entries are trimmed first)
REPLY_TTL_S = 60  # reply lists of API processes that went away expire
# <p>:model: set it (with its time to live) unless another model holds it; else return the holder
CLAIM_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '\\n' then return held end
redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2], 'PX', ARGV[3])
return false
"""


def keys(prefix: str) -> dict[str, str]:
    """The Redis key names under a prefix."""
    return {"jobs": f"{prefix}:jobs", "model": f"{prefix}:model", "worker": f"{prefix}:worker:", "reply": f"{prefix}:reply:",
            "batches": f"{prefix}:stats:batches", "retried": f"{prefix}:stats:retried", "failed": f"{prefix}:stats:failed"}


def safe_url(url: str) -> str:
    """A Redis URL without its password (for messages and /info)."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def connect(url: str, asyncio_client: bool = False) -> Any:
    """A Redis client for url (bytes in and out); the sync one is pinged.

    Raises:
        UserError: the redis package is missing, the URL is not a Redis URL, or Redis does not answer.
    """
    try:
        import redis
        import redis.asyncio
    except ImportError as err:
        raise UserError(f"--queue needs the redis package ({err}): pip install 'redis>=5'") from None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"--queue {safe_url(url)}: not a Redis URL (redis://HOST:6379/0, rediss://... or unix:///path.sock)")
    module = redis.asyncio if asyncio_client else redis
    try:
        client = module.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as err:
        raise UserError(f"--queue {safe_url(url)}: {err}") from None
    if not asyncio_client:
        try:
            client.ping()
        except redis.RedisError as err:
            raise UserError(f"--queue {safe_url(url)}: Redis does not answer ({err})") from None
    return client


def ensure_group(client: Any, stream: str) -> bool:
    """Create the stream and its consumer group if missing (sync client).

    Args:
        client: a sync Redis client.
        stream: the stream's key.

    Returns:
        True when they were created (missing: a new queue, or a Redis that restarted without its data).
    """
    import redis

    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)  # id 0: images queued before it are read too
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise
        return False
    return True


def model_id(runner: ModelRunner) -> str:
    """What tells the models of a queue apart: a SHA-256 of the model's file(s), its meta, its
    --conf_threshold and its --reject (two runs of one architecture and classes differ in their weights).

    Args:
        runner: the loaded model (its backend's `.file`, when it has one, is hashed).

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256(json.dumps([runner.meta.to_dict(), runner.conf_threshold, runner.describe()["reject"]],
                                       sort_keys=True, default=str).encode())
    file = getattr(runner.backend, "file", None)
    files: list[Path] = []
    if file is not None:
        file = Path(file)
        companions = (file.with_suffix(s) for s in get_format(runner.backend.model_type).companions)
        files = sorted(p for p in file.rglob("*") if p.is_file()) if file.is_dir() else \
            [file, *(p for p in companions if p.is_file())]
    for path in files:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_label(claim: dict[str, Any]) -> str:
    """A queue's model in words: 'resnet10t (torch, runs/exp/best.pt, id 0123abcd...)'."""
    meta = claim.get("meta", {})
    return f"{meta.get('model_name', '?')} ({meta.get('model_type', '?')}, {claim.get('file', '?')}, id {claim.get('id', '?')})"


def parse_claim(raw: bytes | None) -> dict[str, Any] | None:
    """The value of <p>:model ('ID\\nJSON') as a dict with 'id', or None."""
    if not raw:
        return None
    ident, _, rest = raw.decode("utf-8", "replace").partition("\n")
    try:
        return {**json.loads(rest), "id": ident}
    except ValueError:
        return {"id": ident}


def encode_job(job: Job, job_id: str, reply: str, timeout_ms: int, model: str) -> dict[str, Any]:
    """The stream fields of one image; `model` is the id of the model it was prepared for."""
    return {"id": job_id, "reply": reply, "name": job.name.encode("utf-8", "replace"), "cam": job.cam or "",
            "timeout_ms": str(timeout_ms), "shape": ",".join(map(str, job.tensor.shape)), "model": model,
            "data": np.ascontiguousarray(job.tensor, dtype=np.uint8).tobytes()}


def decode_job(fields: dict[bytes, bytes], shape: Sequence[int]) -> Job:
    """A stream entry -> Job; raises ValueError when its input does not fit this worker's model."""
    got = tuple(int(s) for s in fields[b"shape"].decode().split(","))
    if got != tuple(shape):
        raise ValueError(f"the image was prepared for input {got}, but this worker's model takes {tuple(shape)}: "
                         "API tier and workers disagree on the model")
    tensor = np.frombuffer(fields[b"data"], dtype=np.uint8).reshape(got).copy()
    return Job(fields[b"name"].decode("utf-8", "replace"), tensor, fields[b"cam"].decode() or None)


# ------------------------------------------------------------------------------ API tier
class RedisService:
    """The HTTP tier's side of the queue (a utils.serve.service.Service): images go to the stream, results
    come back on this process's reply list.

    Args:
        url: the Redis URL.
        prefix: the key prefix (--queue_name).
        max_pixels: the per-image pixel limit of the uploads.
    """

    mode = "redis"

    def __init__(self, url: str, prefix: str = QUEUE.queue_name, max_pixels: int = HTTP.max_pixels) -> None:
        self.url = url
        self.prefix = prefix
        self.keys = keys(prefix)
        self.max_pixels = max_pixels
        self.reply_key = self.keys["reply"] + uuid.uuid4().hex
        self.waiting: dict[str, asyncio.Future] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] | None = None
        self.model_id = ""  # the id of the model self.meta describes (utils.serve.redis_queue.model_id)
        self.model_label = ""
        self._pre: Preprocessor | None = None
        self._problem = "no worker has registered yet (start: serve.py --worker --queue URL --save_path RUN)"
        self._tasks: list[asyncio.Task] = []
        self.client: Any = None

    async def start(self) -> None:
        ensure_group(connect(self.url), self.keys["jobs"])
        self.client = connect(self.url, asyncio_client=True)
        listener = connect(self.url, asyncio_client=True)  # BLPOP holds its connection
        self._tasks = [asyncio.create_task(self._listen(listener)), asyncio.create_task(self._watch_workers())]
        await self._refresh_workers()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            try:
                await self.client.delete(self.reply_key)
            except Exception as err:  # noqa: BLE001 - Redis gone: the reply list expires by itself
                LOGGER.warning("could not delete %s: %s", self.reply_key, err)
            await self.client.aclose()

    async def _listen(self, client: Any) -> None:
        """One loop per API process: replies -> the waiting requests' futures."""
        while True:
            try:
                item = await client.blpop([self.reply_key], timeout=1)
            except asyncio.CancelledError:
                await client.aclose()
                raise
            except Exception as err:  # noqa: BLE001 - Redis restarting: keep trying, requests time out meanwhile
                LOGGER.warning("reading replies from Redis failed (%s); retrying", err)
                await asyncio.sleep(0.5)
                continue
            if item is None:
                continue
            message = json.loads(item[1])
            future = self.waiting.pop(message["id"], None)
            if future is not None and not future.done():  # a second answer to a retried image is dropped
                future.set_result(message)

    async def _watch_workers(self) -> None:
        """Every second: the queue's model and workers; a change of readiness is logged in one line."""
        was = self.ready()
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._refresh_workers()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                self.workers = {}
                self._problem = f"Redis at {safe_url(self.url)} does not answer ({err})"
            now = self.ready()
            if now[0] != was[0] or (not now[0] and now[1] != was[1]):
                LOGGER.warning("%s: %s", "ready" if now[0] else "not ready", now[1])
            was = now

    async def _refresh_workers(self) -> None:
        """Read the queue's model and its live workers. (After Redis lost its data, XADD creates the
        stream again; the workers, its readers, create their group, from its first entry.)"""
        claim = parse_claim(await self.client.get(self.keys["model"]))
        names = [k async for k in self.client.scan_iter(match=self.keys["worker"] + "*", count=1000)]
        values = await self.client.mget(names) if names else []
        workers = {n.decode(): json.loads(v) for n, v in zip(names, values) if v}
        # only workers of the queue's model count (a worker of another model refuses to start)
        self.workers = {n: w for n, w in workers.items() if claim and w.get("model_id") == claim["id"]}
        if claim is None or not self.workers:
            self._problem = "no live worker (start: serve.py --worker --queue URL --save_path RUN)"
            return
        if "preprocess" not in claim.get("meta", {}):
            self._problem = f"the record of the queue's model ({self.keys['model']}) is unreadable"
            return
        if claim["id"] != self.model_id:
            self.model_id, self.meta, self.model_label = claim["id"], claim["meta"], model_label(claim)
            self._pre = Preprocessor(PreprocessSpec.from_dict(self.meta["preprocess"], "the workers' model"), self.max_pixels)
        self._problem = ""

    def ready(self) -> tuple[bool, str]:
        if self._problem or self.meta is None:
            return False, self._problem or "no worker"
        return True, f"{len(self.workers)} worker(s) of {self.model_label}"

    def preprocessor(self) -> Preprocessor:
        if self._pre is None:
            raise ServeError(503, f"not ready: {self._problem}")
        return self._pre

    def info(self) -> dict[str, Any]:
        base = dict(self.meta or {})
        return {**base, "mode": self.mode, "queue": safe_url(self.url), "queue_name": self.prefix,
                "model_id": self.model_id, "workers": len(self.workers),
                "max_batch": sorted({w.get("max_batch") for w in self.workers.values()}),
                "max_wait_ms": sorted({w.get("max_wait_ms") for w in self.workers.values()})}

    async def predict(self, jobs: list[Job], timeout: float) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        ids = [uuid.uuid4().hex for _ in jobs]
        futures = [loop.create_future() for _ in jobs]
        self.waiting.update(zip(ids, futures))
        try:
            pipe = self.client.pipeline(transaction=False)
            for job, job_id in zip(jobs, ids):
                pipe.xadd(self.keys["jobs"], encode_job(job, job_id, self.reply_key, int(timeout * 1000), self.model_id),
                          maxlen=STREAM_MAXLEN, approximate=True)
            await pipe.execute()
            messages = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:
            raise ServeError(504, f"no worker answered within {timeout:.1f}s (--timeout); "
                                  f"{len(self.workers)} live worker(s)") from None
        except ServeError:
            raise
        except Exception as err:  # noqa: BLE001 - Redis down or refusing
            raise ServeError(503, f"the queue at {safe_url(self.url)} failed ({type(err).__name__}: {err})") from None
        finally:
            for job_id in ids:
                self.waiting.pop(job_id, None)
        bad = next((m for m in messages if not m["ok"]), None)
        if bad is not None:
            raise ServeError(int(bad.get("status", 500)), bad["error"])
        return [m["result"] for m in messages]

    async def stats(self) -> dict[str, Any]:
        """The counts /metrics shows, kept in Redis.

        Raises:
            ServeError: 503 when Redis does not answer (logged in one line).
        """
        try:
            raw = await self.client.hgetall(self.keys["batches"])
            retried, failed = await self.client.mget([self.keys["retried"], self.keys["failed"]])
            length = await self.client.xlen(self.keys["jobs"])
        except Exception as err:  # noqa: BLE001 - Redis down or refusing: a clear answer, not a traceback
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            LOGGER.warning("/metrics: Redis at %s does not answer (%s)", safe_url(self.url), why)
            raise ServeError(503, f"/metrics: the counts are kept in Redis at {safe_url(self.url)}, which does not "
                                  f"answer ({why}); try again when it is back") from None
        return {"batch_sizes": Counter({int(k): int(v) for k, v in raw.items()}),
                "gauges": {"serve_workers": len(self.workers), "serve_queue_retried_total": int(retried or 0),
                           "serve_queue_failed_total": int(failed or 0), "serve_queue_length": length}}


# ------------------------------------------------------------------------------ worker
class RedisWorker:
    """A model worker: takes batches off the stream, answers each image, and takes over the
    pending images of workers that died.

    Args:
        runner: the loaded model.
        url: the Redis URL.
        prefix: the key prefix (--queue_name).
        max_batch: most images per batch.
        max_wait_ms: how long a batch waits to fill once its first image arrived.
        heartbeat_s: this worker counts as dead this long after its last heartbeat.
        max_deliveries: an image delivered this many times (to workers that all died) is answered
            with an error instead of being run again.
    """

    def __init__(self, runner: ModelRunner, url: str, prefix: str = QUEUE.queue_name, max_batch: int = BATCH.max_batch,
                 max_wait_ms: float = BATCH.max_wait_ms, heartbeat_s: float = WORKER.heartbeat_s,
                 max_deliveries: int = WORKER.max_deliveries) -> None:
        self.runner = runner
        self.url = url
        self.keys = keys(prefix)
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.heartbeat_s = heartbeat_s
        self.max_deliveries = max_deliveries
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefix = prefix
        self.client = connect(url)
        self.shape = runner.input_shape()
        self.stop_event = threading.Event()
        self.batches = 0
        self.images = 0
        self.model_id = model_id(runner)
        self.claim = {"id": self.model_id, "meta": runner.describe(), "file": str(getattr(runner.backend, "file", "?"))}
        self.refusal = ""  # why this worker stopped: the queue serves another model
        self._claim_script = self.client.register_script(CLAIM_SCRIPT)
        self._claim()
        ensure_group(self.client, self.keys["jobs"])

    # -- the queue's model, and the heartbeat
    def _claim(self) -> None:
        """Claim the queue for this worker's model, or keep the claim alive.

        Raises:
            UserError: the queue serves another model (one line: which, and what to do).
        """
        held = self._claim_script(keys=[self.keys["model"]], args=[
            self.model_id, json.dumps({k: v for k, v in self.claim.items() if k != "id"}), int(self.heartbeat_s * 1000)])
        if held:
            raise UserError(f"--queue_name '{self.prefix}' at {safe_url(self.url)} serves {model_label(parse_claim(held) or {})}, "
                            f"but this worker's model is {model_label(self.claim)}: serve it under another --queue_name "
                            f"(or stop that queue's workers: the queue is free {self.heartbeat_s:g} s after the last one stops)")

    def _beat(self) -> None:
        self._claim()
        payload = json.dumps({"model_id": self.model_id, "model_name": self.runner.meta.model_name, "pid": os.getpid(),
                              "host": socket.gethostname(), "max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms})
        self.client.set(self.keys["worker"] + self.name, payload, px=int(self.heartbeat_s * 1000))

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.wait(self.heartbeat_s / 3):
            try:
                self._beat()
            except UserError as err:  # another model took the queue while Redis was away: stop taking images
                self.refusal = str(err)
                self.stop_event.set()
            except Exception as err:  # noqa: BLE001 - Redis away for a moment: the next beat may succeed
                LOGGER.warning("heartbeat failed: %s", err)

    # -- the loop
    def run(self) -> None:
        """Serve until stop() (SIGTERM / Ctrl-C): the batch in hand is finished first. While Redis
        is unreachable the worker waits and tries again (its images stay pending there); when Redis
        comes back without its data, the stream and group are created again.

        Raises:
            UserError: the queue came to serve another model (see _claim).
        """
        import redis

        beater = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beater.start()
        last_claim, missing = 0.0, False
        try:
            while not self.stop_event.is_set():
                try:
                    if missing and ensure_group(self.client, self.keys["jobs"]):
                        LOGGER.warning("the queue %s was missing in Redis (restarted without its data?): created it "
                                       "again", self.keys["jobs"])
                    if missing or not last_claim:
                        self._beat()  # at once: the API tier is ready again only with a heartbeat
                    missing = False
                    if time.monotonic() - last_claim > self.heartbeat_s / 3:
                        last_claim = time.monotonic()
                        self.reclaim()
                    entries = self.read_batch()
                    if entries:
                        self.process(entries)
                except redis.RedisError as err:
                    missing = True  # Redis may come back empty (NOGROUP: it did)
                    if "NOGROUP" not in str(err):
                        LOGGER.warning("Redis at %s: %s; trying again in 1 s", safe_url(self.url),
                                       str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
                        self.stop_event.wait(1.0)
        except UserError as err:
            self.refusal = str(err)
        finally:
            self.stop_event.set()
            self._leave()
        if self.refusal:
            raise UserError(self.refusal)

    def _leave(self) -> None:
        """Drop the heartbeat and, when it holds no image, this consumer (deleting a consumer would
        drop its pending images: those are left for another worker to take over)."""
        try:
            self.client.delete(self.keys["worker"] + self.name)
            held = self.client.xpending_range(self.keys["jobs"], GROUP, "-", "+", 1, consumername=self.name)
            if not held:
                self.client.xgroup_delconsumer(self.keys["jobs"], GROUP, self.name)
        except Exception as err:  # noqa: BLE001 - leaving is best effort; the heartbeat expires anyway
            LOGGER.warning("could not leave the group cleanly: %s", err)

    def stop(self) -> None:
        self.stop_event.set()

    def read_batch(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Up to max_batch new entries: wait up to 0.5 s for the first, then max_wait_ms for more.

        The short wait polls without BLOCK: Redis checks the timeouts of blocked clients only at
        its cron tick (100 ms at the default hz 10), so a BLOCK of 2 ms can last 100 ms.
        """
        stream = self.keys["jobs"]
        got = self.client.xreadgroup(GROUP, self.name, {stream: ">"}, count=self.max_batch, block=500)
        entries = list(got[0][1]) if got else []
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while entries and len(entries) < self.max_batch:
            more = self.client.xreadgroup(GROUP, self.name, {stream: ">"}, count=self.max_batch - len(entries))
            if more and more[0][1]:
                entries += more[0][1]
                continue
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.0005, max(0.0, deadline - time.monotonic())))
        return entries

    def process(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]]], retried: bool = False) -> None:
        """Run one batch and answer every entry of it, then acknowledge them."""
        now_ms = self._redis_ms()
        jobs, live, replies = [], [], []
        for entry_id, fields in entries:
            if not {b"id", b"reply", b"timeout_ms"} <= fields.keys():  # no one to answer: dropped, not fatal
                LOGGER.warning("dropped %s of %s: not an image queued by serve.py", entry_id.decode(), self.keys["jobs"])
                continue
            age_ms = now_ms - int(entry_id.split(b"-")[0])
            if age_ms > int(fields[b"timeout_ms"]):
                continue  # its request was already answered 504
            if fields.get(b"model", b"").decode() != self.model_id:
                replies.append((fields, {"ok": False, "status": 503, "error": self._not_my_model(fields)}))
                continue
            try:
                jobs.append(decode_job(fields, self.shape))
                live.append(fields)
            except (ValueError, KeyError, RuntimeError) as err:
                replies.append((fields, {"ok": False, "status": 500, "error": str(err)}))
        if jobs:
            try:
                results = self.runner.run(jobs)
                replies += [(f, {"ok": False, "status": r.status, "error": r.message} if isinstance(r, ServeError)
                             else {"ok": True, "result": r}) for f, r in zip(live, results)]
            except ServeError as err:
                replies += [(f, {"ok": False, "status": err.status, "error": err.message}) for f in live]
            except Exception as err:  # noqa: BLE001 - a failed batch fails its images, not the worker
                LOGGER.exception("batch of %d failed", len(jobs))
                replies += [(f, {"ok": False, "status": 500, "error": f"the model failed: {type(err).__name__}: {err}"})
                            for f in live]
        self._answer(replies, [e[0] for e in entries], len(jobs), retried=len(jobs) if retried else 0)

    def _not_my_model(self, fields: dict[bytes, bytes]) -> str:
        """Why this worker refuses an image prepared for another model (one line)."""
        name = fields.get(b"name", b"image").decode("utf-8", "replace")
        sent = fields.get(b"model", b"").decode() or "none"
        LOGGER.warning("refused %s: prepared for model id %s, this worker serves %s", name, sent, model_label(self.claim))
        return (f"{name}: the API tier prepared it for the model with id {sent}, but the worker that took it serves "
                f"{model_label(self.claim)}; it was not run (one model per --queue_name '{self.prefix}')")

    def _answer(self, replies: Sequence[tuple[dict[bytes, bytes], dict[str, Any]]], ids: Sequence[bytes], batch: int,
                retried: int = 0, failed: int = 0) -> None:
        """Send the answers, count them, then acknowledge and delete the entries (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        # counted before the answers go out, so a client that got one sees it in /metrics
        if batch:
            pipe.hincrby(self.keys["batches"], str(batch), 1)
        if retried:
            pipe.incrby(self.keys["retried"], retried)
        if failed:
            pipe.incrby(self.keys["failed"], failed)
        for fields, message in replies:
            reply = fields[b"reply"].decode()
            pipe.rpush(reply, json.dumps({"id": fields[b"id"].decode(), **message}))
            pipe.expire(reply, int(int(fields[b"timeout_ms"]) / 1000) + REPLY_TTL_S)
        if ids:
            pipe.xack(self.keys["jobs"], GROUP, *ids)
            pipe.xdel(self.keys["jobs"], *ids)
        pipe.execute()
        self.batches += bool(batch)
        self.images += batch

    def _redis_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def reclaim(self) -> int:
        """Take over the pending entries of dead workers (no heartbeat); answer with an error those
        delivered max_deliveries times already. Returns how many entries were taken."""
        stream = self.keys["jobs"]
        pending = self.client.xpending_range(stream, GROUP, min="-", max="+", count=1000)
        alive: dict[str, bool] = {self.name: True}
        orphans = []
        for p in pending:
            consumer = p["consumer"].decode() if isinstance(p["consumer"], bytes) else p["consumer"]
            if consumer not in alive:
                alive[consumer] = bool(self.client.exists(self.keys["worker"] + consumer))
            if not alive[consumer]:
                orphans.append(p)
        taken = 0
        for start in range(0, len(orphans), self.max_batch):
            chunk = orphans[start:start + self.max_batch]
            # min_idle_time: if another worker claimed one a moment ago, it is not taken twice
            claimed = self.client.xclaim(stream, GROUP, self.name, min_idle_time=100,
                                         message_ids=[p["message_id"] for p in chunk])
            delivered = {p["message_id"]: p["times_delivered"] for p in chunk}
            claimed = [(i, f) for i, f in claimed if f]  # entries deleted meanwhile come back empty
            dead = [(i, f) for i, f in claimed if delivered.get(i, 0) >= self.max_deliveries]
            retry = [(i, f) for i, f in claimed if delivered.get(i, 0) < self.max_deliveries]
            if dead:
                LOGGER.warning("%d image(s) were taken by %d workers that all died: answering with an error",
                               len(dead), self.max_deliveries)
                self._answer([(f, {"ok": False, "status": 500, "error": f"{f[b'name'].decode('utf-8', 'replace')}: "
                                   f"{self.max_deliveries} workers died while running this image"}) for _, f in dead],
                             [i for i, _ in dead], 0, failed=len(dead))
            if retry:
                LOGGER.info("taking over %d image(s) of a dead worker", len(retry))
                self.process(retry, retried=True)
            taken += len(claimed)
        self._forget_dead_consumers(alive)
        return taken

    def _forget_dead_consumers(self, alive: dict[str, bool]) -> None:
        for consumer in self.client.xinfo_consumers(self.keys["jobs"], GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name == self.name or consumer["pending"]:
                continue
            if name not in alive:
                alive[name] = bool(self.client.exists(self.keys["worker"] + name))
            if not alive[name] and consumer.get("idle", 0) > self.heartbeat_s * 1000:
                self.client.xgroup_delconsumer(self.keys["jobs"], GROUP, name)
