"""serve.py with a real Redis: an API tier and two model workers, each a subprocess on loopback.

The API's answers equal predict.py's; a burst is answered once per request even when a worker is
killed while it holds images (another worker takes them over); a request whose worker froze is
answered 504 at --timeout, never left hanging, and its stale image is dropped; with no worker
alive the API says so at once (503). Redis restarted without its data under a running API tier and
workers: they create the stream and group again and answer correctly, and /metrics says in JSON
(503) that Redis is away meanwhile. A worker of another model on the queue refuses to start and
never answers; a worker refuses an image prepared for another model. The worker's take-over and
give-up logic is also driven directly against Redis. Skips, saying why, only when redis-server is not installed (`make test`
installs it when apt-get is there).
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import (  # noqa: F401
    Proc,
    RedisServer,
    Served,
    check_labels,
    check_result,
    expected,
    images,
    multilabel_served,
    read,
    redis_server_binary,
    serve_run,
)

pytestmark = [pytest.mark.system_deps,
              pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed: "
                                 "apt-get install -y redis-server (make test installs it when apt-get is available)")]

TIMEOUT = 10.0  # the API tier's --timeout: a first Grad-CAM request on a busy 2-core machine (xdist) took over 6 s
HEARTBEAT = 2.0  # the workers' --heartbeat_s
BURST = 64


def worker_name(proc: Proc, timeout: float = 60) -> str:
    """The consumer name a worker prints when it starts ('worker NAME: ...')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"^worker (\S+): ", proc.tail(20000), re.M)
        if match:
            return match.group(1)
        assert proc.proc.poll() is None, proc.tail()
        time.sleep(0.2)
    raise AssertionError(f"the worker did not start within {timeout}s:\n{proc.tail()}")


@pytest.fixture(scope="module")
def cluster(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """redis-server, two workers and the API tier; all stopped at the end."""
    pytest.importorskip("redis", reason="the Redis mode needs the redis package (pip install -r requirements.txt)")
    folder = tmp_path_factory.mktemp("redis_cluster")
    with RedisServer(folder / "redis") as redis_server:
        workers = [Proc(["serve.py", "--worker", "--queue", redis_server.url, "--save_path", serve_run, "--device", "cpu",
                         "--max_batch", 4, "--max_wait_ms", 20, "--heartbeat_s", HEARTBEAT], folder / f"worker{i}.log")
                   for i in range(2)]
        try:
            names = [worker_name(w) for w in workers]
            with Served(["--queue", redis_server.url, "--timeout", TIMEOUT], folder / "api.log") as api:
                yield {"redis": redis_server, "workers": workers, "names": names, "api": api}
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    os.kill(w.proc.pid, signal.SIGCONT)
                w.stop()


def client(cluster: dict[str, Any]) -> Any:
    import redis

    return redis.Redis.from_url(cluster["redis"].url, socket_timeout=5)


def pending_of(r: Any, consumer: str) -> int:
    summary = r.xpending("serve:jobs", "workers")
    return sum(int(c["pending"]) for c in summary["consumers"] if c["name"].decode() == consumer)


def test_results_equal_predict_py(cluster: dict[str, Any], images: Path, expected: dict[str, dict[str, str]]) -> None:
    api = cluster["api"]
    info = api.client.get("/info").json()
    assert info["mode"] == "redis" and info["workers"] == 2 and info["model_name"] == "resnet10t"
    files = sorted(images.iterdir())
    response = api.post([(f.name, read(f)) for f in files])
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        check_result(result, expected[result["file"]])
    bad = api.post([("notes.txt", b"not an image")])
    assert bad.status_code == 415 and "notes.txt" in bad.json()["error"]
    cam = api.post([(files[0].name, read(files[0]))], params={"cam": "EigenCAM"})
    assert cam.status_code == 200 and cam.json()["results"][0]["cam"]["png"]


def test_a_burst_survives_killing_a_worker_mid_batch(cluster: dict[str, Any], images: Path,
                                                     expected: dict[str, dict[str, str]]) -> None:
    api, r = cluster["api"], client(cluster)
    victim, victim_name = cluster["workers"][0], cluster["names"][0]
    files = sorted(images.iterdir())
    plan = [(f"req{i}_{f.name}", f) for i, f in zip(range(BURST), itertools.cycle(files))]
    killed: dict[str, int] = {}
    started = threading.Event()

    def kill_when_it_holds_images() -> None:
        """Freeze the victim; if it holds unacknowledged images, kill it, else let it go on and retry."""
        started.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            os.kill(victim.proc.pid, signal.SIGSTOP)
            held = pending_of(r, victim_name)
            if held:
                victim.kill()
                killed["held"] = held
                return
            os.kill(victim.proc.pid, signal.SIGCONT)
            time.sleep(0.003)

    def one(item: tuple[str, Path]) -> tuple[str, Any]:
        started.set()
        response = api.post([(item[0], read(item[1]))])
        return item[0], response

    killer = threading.Thread(target=kill_when_it_holds_images)
    killer.start()
    retried0 = api.metric("serve_queue_retried_total")
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, plan))
    seconds = time.monotonic() - t0
    killer.join(40)
    assert killed.get("held", 0) > 0, "the victim never held images while the burst ran"
    assert len(answers) == BURST and len({name for name, _ in answers}) == BURST
    for (name, response), (_, path) in zip(answers, plan):
        assert response.status_code == 200, (name, response.text)
        (result,) = response.json()["results"]
        assert result["file"] == name  # its own answer, not another request's
        check_result(result, expected[path.name])
    assert seconds < TIMEOUT + 10
    assert api.metric("serve_queue_retried_total") - retried0 >= killed["held"]  # taken over, not lost
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and r.xpending("serve:jobs", "workers")["pending"]:
        time.sleep(0.1)
    assert r.xpending("serve:jobs", "workers")["pending"] == 0 and r.xlen("serve:jobs") == 0


def test_redis_restart_without_data_is_survived(cluster: dict[str, Any], images: Path,
                                               expected: dict[str, dict[str, str]]) -> None:
    api, redis_server, r = cluster["api"], cluster["redis"], client(cluster)
    live = [w for w in cluster["workers"] if w.proc.poll() is None]  # (the burst test killed one)
    assert live
    r.set("marker", "before the restart")
    redis_server.stop()
    down = api.client.get("/metrics")  # Redis away: a JSON 503 that says so, not a plain 500
    assert down.status_code == 503 and "does not answer" in down.json()["error"], down.text
    redis_server.start()  # same port, empty
    assert r.get("marker") is None  # every key is gone: the stream, the group, the heartbeats
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (api.client.get("/ready").status_code == 200
                                               and api.client.get("/info").json().get("workers") == len(live)):
        time.sleep(0.2)
    files = sorted(images.iterdir())
    response = api.post([(f.name, read(f)) for f in files])
    assert response.status_code == 200, (response.text, *(w.tail() for w in live))
    for result in response.json()["results"]:
        check_result(result, expected[result["file"]])
    assert api.client.get("/metrics").status_code == 200
    assert all(w.proc.poll() is None for w in live)  # nobody restarted anything
    logs = [p.tail(200_000) for p in (api.proc, *live)]
    assert not any("Traceback" in log for log in logs), logs
    assert sum("created it again" in log for log in logs[1:]) >= 1  # the group, by a worker
    assert logs[0].count("/metrics: Redis at") == 1  # one line for the one failed /metrics


def test_a_worker_of_another_model_refuses_to_start(cluster: dict[str, Any], trained_runs: dict[str, Any], images: Path,
                                                    expected: dict[str, dict[str, str]], tmp_path: Path) -> None:
    """A second worker with another trained model (same architecture and classes, other weights)
    on the queue: it stops in one line naming the queue's model, and never answers an image."""
    api = cluster["api"]
    other = trained_runs["CrossEntropyLoss"].path
    wrong = Proc(["serve.py", "--worker", "--queue", cluster["redis"].url, "--save_path", other, "--device", "cpu",
                  "--max_batch", 4, "--heartbeat_s", HEARTBEAT], tmp_path / "wrong.log")
    files = sorted(images.iterdir())
    answered = 0
    try:
        deadline = time.monotonic() + 90
        while wrong.proc.poll() is None and time.monotonic() < deadline:  # requests all the while it starts
            response = api.post([(f.name, read(f)) for f in files])
            assert response.status_code == 200, (response.text, wrong.tail(), api.proc.tail())
            for result in response.json()["results"]:
                check_result(result, expected[result["file"]])  # the queue's model answered, never the other
            answered += 1
            time.sleep(0.2)
    finally:
        wrong.stop()
    out = wrong.tail()
    queue_model = api.client.get("/info").json()["model_id"]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert wrong.proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert f"'serve' at {cluster['redis'].url} serves resnet10t" in errors[0] and queue_model in errors[0], errors[0]
    assert "another --queue_name" in errors[0] and answered >= 1
    assert api.client.get("/info").json()["workers"] == sum(w.proc.poll() is None for w in cluster["workers"])


def test_a_worker_refuses_images_prepared_for_another_model(cluster: dict[str, Any], trained_runs: dict[str, Any],
                                                            serve_run: Path) -> None:
    """In-process, under its own prefix: an image stamped with another model's id is answered with
    an error that names the worker's model, and is not run; an entry that is not serve.py's is
    dropped."""
    import json

    import numpy as np

    from utils.infer.backends import load_backend
    from utils.serve.redis_queue import RedisWorker, encode_job, model_id
    from utils.serve.service import Job, ModelRunner

    r = client(cluster)
    queue_model = model_id(ModelRunner(load_backend(serve_run, "torch", "cpu")))
    worker = RedisWorker(ModelRunner(load_backend(trained_runs["CrossEntropyLoss"].path, "torch", "cpu")),
                         cluster["redis"].url, prefix="other", max_batch=4, heartbeat_s=1.0)
    assert worker.model_id != queue_model
    for job_id, stamp in (("mine", worker.model_id), ("theirs", queue_model)):
        job = Job(f"{job_id}.png", np.full(worker.shape, 90, dtype=np.uint8))
        r.xadd("other:jobs", encode_job(job, job_id, "other:reply:test", 60_000, stamp))
    r.xadd("other:jobs", {"foreign": "entry"})  # not serve.py's: dropped, without killing the worker
    worker.process(worker.read_batch())
    assert r.xlen("other:jobs") == 0 and r.xpending("other:jobs", "workers")["pending"] == 0
    replies = {m["id"]: m for m in (json.loads(x) for x in r.lrange("other:reply:test", 0, -1))}
    assert set(replies) == {"mine", "theirs"}
    assert replies["mine"]["ok"] is True and replies["mine"]["result"]["batch_size"] == 1
    refused = replies["theirs"]
    assert refused["ok"] is False and refused["status"] == 503 and "result" not in refused
    assert queue_model in refused["error"] and worker.model_id in refused["error"] and "theirs.png" in refused["error"]
    assert r.hgetall("other:stats:batches") == {b"1": b"1"}  # the refused image was not run


def test_frozen_workers_give_504_at_timeout_then_no_worker_gives_503(cluster: dict[str, Any], images: Path) -> None:
    api, r = cluster["api"], client(cluster)
    live = [w for w in cluster["workers"] if w.proc.poll() is None]
    assert live
    f = sorted(images.iterdir())[0]
    images_run = api.metric("serve_batch_size_sum")
    for w in live:  # alive to the API for up to --heartbeat_s, but answering nothing
        os.kill(w.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        response = api.post([(f.name, read(f))])
        waited = time.monotonic() - t0
        assert response.status_code == 504, response.text
        assert "--timeout" in response.json()["error"] and TIMEOUT - 0.5 < waited < TIMEOUT + 3
    finally:
        for w in live:
            os.kill(w.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and api.client.get("/ready").status_code != 200:
        time.sleep(0.2)
    assert api.post([(f.name, read(f))]).status_code == 200
    assert r.xlen("serve:jobs") == 0
    assert api.metric("serve_batch_size_sum") == images_run + 1  # the stale image was dropped, not run for nobody
    for w in live:  # SIGTERM: a worker finishes its batch, then leaves the group
        w.stop()
        assert w.proc.returncode == 0 and "stopped after" in w.tail(), w.tail()
    deadline = time.monotonic() + HEARTBEAT + 5
    while time.monotonic() < deadline and api.client.get("/ready").status_code == 200:
        time.sleep(0.2)
    ready = api.client.get("/ready")
    assert ready.status_code == 503 and "no live worker" in ready.json()["error"]
    t0 = time.monotonic()
    refused = api.post([(f.name, read(f))])
    assert refused.status_code == 503 and time.monotonic() - t0 < 2


def test_worker_takes_over_dead_consumers_and_gives_up_after_max_deliveries(cluster: dict[str, Any],
                                                                           serve_run: Path) -> None:
    """In-process, under its own prefix: entries held by consumers without a heartbeat."""
    import json

    import torch

    from utils.infer.backends import load_backend
    from utils.serve.redis_queue import GROUP, RedisWorker, encode_job
    from utils.serve.service import Job, ModelRunner

    r = client(cluster)
    worker = RedisWorker(ModelRunner(load_backend(serve_run, "torch", "cpu")), cluster["redis"].url, prefix="unit",
                         max_batch=4, heartbeat_s=0.5, max_deliveries=3)
    stream, shape = "unit:jobs", worker.shape
    for n, job_id in enumerate(("once", "thrice")):
        job = Job(f"{job_id}.png", torch.full(shape, 60 * n, dtype=torch.uint8))
        r.xadd(stream, encode_job(job, job_id, "unit:reply:test", 60_000, worker.model_id))
    r.xreadgroup(GROUP, "ghost-1", {stream: ">"}, count=2)  # delivered once, to a consumer that died
    thrice = r.xpending_range(stream, GROUP, "-", "+", 10)[1]["message_id"]
    for ghost in ("ghost-2", "ghost-3"):  # "thrice" died with two more workers
        r.xclaim(stream, GROUP, ghost, 0, [thrice])
    r.set("unit:worker:ghost-1", "{}", px=60_000)  # ghost-1 looks alive: nothing of it is taken yet
    time.sleep(0.3)  # past the worker's 100 ms claim guard
    assert worker.reclaim() == 1  # only "thrice" (held by dead ghost-3)
    r.delete("unit:worker:ghost-1")
    time.sleep(0.6)  # dead consumers are forgotten once idle for a heartbeat
    assert worker.reclaim() == 1  # now "once"
    replies = {m["id"]: m for m in (json.loads(x) for x in r.lrange("unit:reply:test", 0, -1))}
    assert replies["thrice"]["ok"] is False and "3 workers died" in replies["thrice"]["error"]
    assert replies["once"]["ok"] is True and replies["once"]["result"]["file"] == "once.png"
    assert r.xpending(stream, GROUP)["pending"] == 0 and r.xlen(stream) == 0
    assert int(r.get("unit:stats:failed")) == 1 and int(r.get("unit:stats:retried")) == 1
    names = {c["name"].decode() for c in r.xinfo_consumers(stream, GROUP)}
    assert not names & {"ghost-2", "ghost-3"}  # dead consumers with nothing pending are forgotten


def test_multilabel_model_through_redis(cluster: dict[str, Any], multilabel_served: dict[str, Any]) -> None:
    """A multi-label model behind the queue (the API tier and a worker in this process, under their
    own prefix, on the real Redis): each image's labels and probabilities equal predict.py's."""
    from fastapi.testclient import TestClient

    from utils.infer.backends import load_backend
    from utils.serve.app import Settings, create_app
    from utils.serve.redis_queue import RedisService, RedisWorker
    from utils.serve.service import ModelRunner

    url = cluster["redis"].url
    worker = RedisWorker(ModelRunner(load_backend(multilabel_served["run"], "torch", "cpu")), url, prefix="multilabel",
                         max_batch=8, heartbeat_s=1.0)
    thread = threading.Thread(target=worker.run, name="multilabel-worker", daemon=True)
    thread.start()
    files = sorted(multilabel_served["images"].iterdir())
    try:
        with TestClient(create_app(RedisService(url, "multilabel"), Settings(timeout=30))) as api:
            deadline = time.monotonic() + 20
            while api.get("/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            response = api.post("/predict", files=[("file", (f.name, read(f))) for f in files])
    finally:
        worker.stop()
        thread.join(10)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == [f.name for f in files]
    for result in results:
        check_labels(result, multilabel_served["rows"][result["file"]])
