"""utils/infer/streams.py: batches predicted by several threads at once, handed back in order.

What it exists for: two forward passes at once on the CPU's cores, each batch's result with its own
batch, in file order, the compute threads shared out and restored, errors raised in their batch's
turn, and no thread left behind. predict.py's end-to-end check (the same predictions.csv with
--streams 2 as with 1) is in test_predict.py; a stopped streamed run in test_io_faults.py.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.core.log import UserError
from utils.core.options import Options
from utils.infer.streams import AHEAD, StreamedBatches, describe_streams, stream_count


def batches(count: int, taken: list[int] | None = None, closed: list[bool] | None = None,
            fail_at: int | None = None) -> Iterator[dict[str, Any]]:
    """`count` batches {"indices": [i], "x": i}; records each batch taken, and whether the generator was closed."""
    try:
        for i in range(count):
            if i == fail_at:
                raise OSError(f"cannot read batch {i}")
            if taken is not None:
                taken.append(i)
            yield {"indices": [i], "x": i}
    finally:
        if closed is not None:
            closed.append(True)


def consume(streamed: StreamedBatches, stop_at: int | None = None, timeout: float = 30) -> tuple[list[tuple[int, Any]], BaseException | None]:
    """Iterate in a thread of its own, so a hang fails the test instead of the suite: the (x, result)
    pairs handed over (up to x == stop_at), and the exception the iteration raised, if any."""
    out: list[tuple[int, Any]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            with streamed:  # as predict.py does: close() waits for the streams when the loop is left early
                for batch, result in streamed:
                    out.append((batch["x"], result))
                    if batch["x"] == stop_at:
                        break
        except BaseException as err:  # noqa: BLE001 - handed to the test
            error.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the iteration hung after {out}"
    return out, error[0] if error else None


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stream-")]


class Recorder:
    """work(): x * 10 after a sleep that makes later batches finish first; records threads and overlap."""

    def __init__(self, sleep: float = 0.02) -> None:
        self.sleep = sleep
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.thread_names: set[str] = set()
        self.torch_threads: set[int] = set()
        self.ran: list[int] = []

    def __call__(self, batch: dict[str, Any]) -> int:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.thread_names.add(threading.current_thread().name)
            self.torch_threads.add(torch.get_num_threads())
            self.ran.append(batch["x"])
        time.sleep(self.sleep * (1 + (batch["x"] % 2 == 0)))  # even batches take twice as long: odd ones finish first
        with self.lock:
            self.active -= 1
        return batch["x"] * 10


def test_results_come_back_in_order_each_with_its_batch_from_two_threads_at_once() -> None:
    work = Recorder()
    out, error = consume(StreamedBatches(batches(12), work, streams=2, threads=2))
    assert out == [(i, i * 10) for i in range(12)] and error is None
    assert work.thread_names == {"stream-0", "stream-1"} and work.most_active == 2
    assert sorted(work.ran) == list(range(12))  # each batch run once
    assert stream_threads() == []


def test_compute_threads_are_shared_out_and_restored() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        work = Recorder(0.001)
        list(StreamedBatches(batches(6), work, streams=2, threads=4))
        assert work.torch_threads == {2} and torch.get_num_threads() == 4
        work = Recorder(0.001)
        list(StreamedBatches(batches(6), work, streams=3, threads=2))  # fewer threads than streams: one each
        assert work.torch_threads == {1} and torch.get_num_threads() == 4
        work = Recorder(0.001)
        list(StreamedBatches(batches(6), work, streams=2, threads=2))  # the threads given, not the ones there are
        assert work.torch_threads == {1} and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_one_stream_runs_in_the_callers_thread() -> None:
    work = Recorder(0.0)
    before = torch.get_num_threads()
    with StreamedBatches(batches(3), work, streams=1, threads=8) as streamed:
        out = [result for _, result in streamed]
    assert out == [0, 10, 20] and work.thread_names == {threading.current_thread().name}
    assert torch.get_num_threads() == before
    streamed.close()  # closing twice (predict.py's `with` after the iteration's own close) is harmless


def test_closing_twice_after_streams_is_harmless() -> None:
    before = torch.get_num_threads()
    with StreamedBatches(batches(4), Recorder(0.0), streams=2, threads=2) as streamed:
        out, error = consume(streamed)
    streamed.close()
    assert len(out) == 4 and error is None and torch.get_num_threads() == before and stream_threads() == []


@pytest.mark.parametrize("streams", [1, 2])
def test_a_batch_without_images_is_handed_over_unrun(streams: int) -> None:
    source = [{"indices": [0], "x": 0}, {"indices": [], "x": 1}, {"indices": [2], "x": 2}]
    work = Recorder(0.0)
    out, error = consume(StreamedBatches(source, work, streams=streams, threads=2))
    assert out == [(0, 0), (1, None), (2, 20)] and sorted(work.ran) == [0, 2] and error is None


def test_an_error_in_work_comes_after_the_batches_before_it() -> None:
    def work(batch: dict[str, Any]) -> int:
        time.sleep(0.01 if batch["x"] != 5 else 0.0)
        if batch["x"] == 5:
            raise RuntimeError("out of memory at batch 5")
        return batch["x"]

    out, error = consume(StreamedBatches(batches(20), work, streams=2, threads=2))
    assert isinstance(error, RuntimeError) and "batch 5" in str(error)
    assert [x for x, _ in out] == [0, 1, 2, 3, 4] and stream_threads() == []


def test_after_an_error_the_other_streams_take_no_more_batches() -> None:
    def work(batch: dict[str, Any]) -> int:
        if batch["x"] == 1:
            raise RuntimeError("batch 1 failed")
        time.sleep(0.2)  # batch 0 ends after batch 1 failed
        return batch["x"]

    taken: list[int] = []
    out, error = consume(StreamedBatches(batches(50, taken), work, streams=2, threads=2))
    assert out == [(0, 0)] and isinstance(error, RuntimeError) and taken == [0, 1]


def test_an_error_while_loading_comes_after_the_batches_before_it() -> None:
    out, error = consume(StreamedBatches(batches(8, fail_at=3), Recorder(0.001), streams=2, threads=2))
    assert isinstance(error, OSError) and "cannot read batch 3" in str(error)
    assert out == [(0, 0), (1, 10), (2, 20)] and stream_threads() == []


def test_leaving_early_stops_the_streams_a_few_batches_ahead_and_closes_the_source() -> None:
    taken: list[int] = []
    closed: list[bool] = []
    streamed = StreamedBatches(batches(1000, taken, closed), Recorder(0.005), streams=2, threads=2)
    out, error = consume(streamed, stop_at=3)
    assert [x for x, _ in out] == [0, 1, 2, 3] and error is None
    assert stream_threads() == [] and closed == [True]  # closed by the streams, not by the garbage collector
    assert len(taken) <= 4 + AHEAD * 2 + 2, len(taken)  # not the whole source: memory stays flat


def test_an_iteration_run_to_its_end_closes_itself_and_one_left_early_stops_the_streams() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out = [x for _, x in StreamedBatches(batches(5), Recorder(0.0), streams=2, threads=4)]  # no with block
        assert out == [0, 10, 20, 30, 40] and stream_threads() == [] and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    release = threading.Event()

    def work(batch: dict[str, Any]) -> int:
        if batch["x"] > 0:
            release.wait(30)  # the later batches run until the test lets them go
        return batch["x"]

    streamed = StreamedBatches(batches(1000), work, streams=2, threads=2)
    iterator = iter(streamed)
    assert next(iterator)[1] == 0
    # Left early, the iteration returns without waiting for the running batches: a generator left by a
    # break is closed by the garbage collector, which would drop a KeyboardInterrupt raised while waiting.
    closing = threading.Thread(target=iterator.close)
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and any(t.is_alive() for t in stream_threads())
    release.set()
    streamed.close()  # the with block's end: waits for them and restores the threads
    assert stream_threads() == [] and torch.get_num_threads() == before


def test_streams_stay_a_bounded_number_of_batches_ahead_of_a_slow_consumer() -> None:
    taken: list[int] = []
    streamed = StreamedBatches(batches(100, taken), Recorder(0.0), streams=2, threads=2)
    for batch, _ in streamed:
        if batch["x"] == 0:
            time.sleep(0.3)  # the streams could have run all 100 by now
            assert len(taken) <= AHEAD * 2 + 1, len(taken)
    assert len(taken) == 100


def options(**values: Any) -> Options:
    return Options({"streams": 0, "model_type": "torch", "cam_visual": False, "feature_maps": 0, "reject": False,
                    "classical": None} | values)


@pytest.mark.parametrize("values, device, threads, expected", [
    ({}, "cpu", 2, 2),                        # auto: two streams on a CPU with two threads
    ({}, "cpu", 16, 2),
    ({}, "cpu", 1, 1),                        # one compute thread: one stream
    ({}, "cuda", 8, 1),
    ({"model_type": "onnx"}, "cpu", 4, 1),
    ({"cam_visual": True}, "cpu", 4, 1),
    ({"feature_maps": 8}, "cpu", 4, 1),
    ({"reject": True}, "cpu", 4, 2),         # its features are taken per thread
    ({"classical": "svm"}, "cpu", 4, 1),
    ({"streams": 3}, "cpu", 1, 3),           # asked for: given, one thread each at least
    ({"streams": 1}, "cuda", 8, 1),
    ({"streams": 1, "cam_visual": True}, "cpu", 8, 1),
])
def test_stream_count(values: dict[str, Any], device: str, threads: int, expected: int) -> None:
    assert stream_count(options(**values), device, threads) == expected


@pytest.mark.parametrize("values, device, needle", [
    ({"streams": 2}, "cuda", "--streams 2: streams share a CPU's cores, and the device is cuda"),
    ({"streams": 2, "model_type": "onnx"}, "cpu", "--streams 2: --model_type onnx runs its own threads"),
    ({"streams": 4, "cam_visual": True}, "cpu", "--streams 4: --cam_visual runs one batch at a time"),
    ({"streams": 2, "classical": "svm"}, "cpu", "--classical runs one batch at a time"),
])
def test_streams_asked_for_where_they_cannot_run_is_one_line(values: dict[str, Any], device: str, needle: str) -> None:
    with pytest.raises(UserError, match="drop --streams") as err:
        stream_count(options(**values), device, 8)
    assert needle in str(err.value)


def test_describe_streams() -> None:
    assert describe_streams(1, 8) == ""
    assert describe_streams(2, 2) == "2 streams of 1 compute thread each"
    assert describe_streams(2, 4) == "2 streams of 2 compute threads each"
    assert describe_streams(2, 8) == "2 streams of 4 compute threads each"
    assert describe_streams(4, 2) == "4 streams of 1 compute thread each"


class MeetingModel(torch.nn.Module):
    """A model without a timm head (its features come through a hook on the last nn.Linear) whose two
    concurrent passes both cross that layer while both calls' hooks are in place: they meet before it
    and again after it."""

    def __init__(self, meet: threading.Barrier) -> None:
        super().__init__()
        self.meet = meet
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)
        self.meet.wait(timeout=10)
        logits = self.fc(feats)
        self.meet.wait(timeout=10)
        return logits


def test_penultimate_features_of_two_threads_at_once_are_each_their_own() -> None:
    """--reject runs in two streams: utils.models.features.features_and_logits hooks the last linear
    layer, and a hook sees every thread's pass; each call must keep its own thread's features."""
    from utils.models.features import features_and_logits

    torch.manual_seed(0)
    model = MeetingModel(threading.Barrier(2)).eval()
    inputs = [torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8) + 5]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pool = [threading.Thread(target=lambda i=i: got.__setitem__(i, features_and_logits(model, inputs[i]))) for i in (0, 1)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    with torch.no_grad():
        for i, x in enumerate(inputs):
            feats, logits = got[i]
            assert torch.equal(feats, model.trunk(x)) and torch.equal(logits, model.fc(model.trunk(x))), i
