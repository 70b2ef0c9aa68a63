"""Several batches predicted at once on the CPU (inference streams), results in file order.

    with StreamedBatches(loader, lambda batch: ensemble.predict(batch["inputs"], plan), streams=2) as batches:
        for batch, result in batches:      # file order, each result from its own batch
            ...                            # rows, files: in this thread

A stream is a thread that takes the next batch (loading it, in loader order), runs `work` on it and
hands the pair over; this thread gets the pairs back in the order of the batches. With S streams
the compute threads are shared out (torch.set_num_threads(threads // S) meanwhile).

Why: on a CPU, one forward pass at a time leaves cores idle between batches. While the main thread
loads the next batch and writes the rows of the last, OpenMP's threads spin waiting for the next
operator, and inside a forward pass they wait at every operator's end for the slowest one. Two
streams of one thread each on two cores keep both cores on useful work: a stream's loading and rows
overlap the other stream's forward pass (PyTorch releases the GIL in its operators), and no thread
waits for another inside an operator. On the digits benchmark (resnet18, 32 px, batch 64, 2 cores)
two single-threaded forward passes side by side did 2,465 images/s against 2,290 for one forward
pass on two threads (benchmarks/predict_throughput.py).

Only for work that is safe to run twice at once: a PyTorch model's forward pass in eval mode with
no gradients is, and so are --reject's scores; Grad-CAM's and the feature maps' hooks are not, and
those run one stream (stream_count decides).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Iterator

from utils.core.device import compute_threads

#: batches a stream may finish ahead of the one being handed over, per stream (memory stays flat)
AHEAD = 2


#: predict.py flags that need one stream: Grad-CAM and the feature maps hook into the model's layers (a
#: hook sees every stream's forward pass), and --classical's scikit-learn estimators may run threads of
#: their own. (--reject's features are safe: utils.models.features.features_and_logits keeps its own
#: thread's.)
ONE_STREAM = ("cam_visual", "feature_maps", "classical")


def stream_count(args: Any, device_type: str, threads: int) -> int:
    """The streams predict.py runs: args.streams, or for 0 (auto) 2 on a CPU with 2 or more compute
    threads for a PyTorch model (--model_type torch) without a ONE_STREAM flag, else 1.

    Args:
        args: predict.py's options (streams, model_type and the ONE_STREAM flags).
        device_type: "cpu", "cuda", "mps".
        threads: the compute threads there are to share.

    Raises:
        UserError: several streams asked for where they cannot run.
    """
    from utils.core.log import UserError

    hooked = next((f"--{flag}" for flag in ONE_STREAM if args.get(flag)), "")
    reason = (f"streams share a CPU's cores, and the device is {device_type}" if device_type != "cpu" else
              f"--model_type {args.model_type} runs its own threads" if args.model_type != "torch" else
              f"{hooked} runs one batch at a time" if hooked else "")
    if args.streams == 0:
        return 2 if not reason and threads >= 2 else 1
    if args.streams > 1 and reason:
        raise UserError(f"--streams {args.streams}: {reason}; drop --streams (or give 1)")
    return args.streams


def describe_streams(streams: int, threads: int | None = None) -> str:
    """'2 streams of 1 compute thread each' (of `threads`, default: the compute threads now), or ''
    for one stream."""
    each = max(1, (threads or compute_threads()) // streams)
    return f"{streams} streams of {each} compute thread{'s' if each > 1 else ''} each" if streams > 1 else ""


class StreamedBatches:
    """Iterate (batch, work(batch)) in the order of `batches`, computed by `streams` threads.

    A batch without images (every file failed to decode) is handed over with result None, unrun.
    An exception of loading or of `work` is raised here when its batch's turn comes (the batches
    before it are handed over first). Leaving the iteration early (break, an exception) stops the
    streams after the batches they are running; close(), at the end of a with block, waits for
    them, closes the source and restores the compute threads (an iteration run to its end does
    that itself).

    Args:
        batches: an iterable of batch dicts with "indices" (a PredictionLoader); its iteration runs
            in the streams, one at a time.
        work: batch -> result, run in a stream.
        streams: threads (1 = in this thread, no threads at all).
        threads: compute threads to share among the streams (torch.set_num_threads(threads //
            streams), at least 1, while they run; restored at close); None: the compute threads now.
    """

    def __init__(self, batches: Iterable[dict[str, Any]], work: Callable[[dict[str, Any]], Any], streams: int,
                 threads: int | None = None) -> None:
        self.batches = batches
        self.work = work
        self.streams = max(1, streams)
        self.threads = threads
        self._saved_threads: int | None = None
        self._source: Iterator[dict[str, Any]] | None = None
        self._take = threading.Lock()        # one stream at a time takes (and loads) the next batch
        self._ready = threading.Condition()  # guards everything below
        self._done: dict[int, tuple[dict[str, Any] | None, Any, BaseException | None]] = {}
        self._taken = 0                      # batches taken by the streams so far
        self._end: int | None = None         # the number of batches, once the source is exhausted
        self._handed = 0                     # batches handed to the consumer so far
        self._stopping = False
        self._pool: list[threading.Thread] = []

    def __enter__(self) -> "StreamedBatches":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Any]]:
        if self.streams == 1:
            for batch in self.batches:
                yield batch, self.work(batch) if batch["indices"] else None
            return
        self._start()
        try:
            while True:
                with self._ready:
                    while self._handed not in self._done and self._handed != self._end:
                        self._ready.wait()
                    if self._handed == self._end:
                        break
                    batch, result, error = self._done.pop(self._handed)
                    self._handed += 1
                    self._ready.notify_all()
                if error is not None:
                    raise error
                yield batch, result
        finally:
            # Left early (a break, an error): the streams stop after their running batches, and close()
            # (the with block's end) waits for them. Not waited for here: a generator left early is
            # closed by the garbage collector, which drops what it raises (a second Ctrl-C meanwhile).
            self._request_stop()
        self.close()  # the end: every stream has returned

    def _request_stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()

    def _start(self) -> None:
        import torch

        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (self.threads or compute_threads()) // self.streams))
        self._source = iter(self.batches)
        self._pool = [threading.Thread(target=self._run, name=f"stream-{i}", daemon=True) for i in range(self.streams)]
        for thread in self._pool:
            thread.start()

    def _run(self) -> None:
        while True:
            with self._ready:  # not too far ahead of the consumer
                while not self._stopping and self._taken - self._handed >= AHEAD * self.streams:
                    self._ready.wait()
                if self._stopping:
                    return
            with self._take:
                if self._stopping or self._end is not None:
                    return
                number = self._taken
                try:
                    batch = next(self._source)
                except StopIteration:
                    self._finish(number)
                    return
                except BaseException as err:  # noqa: BLE001 - raised in the consumer, in its turn
                    self._put(number, None, None, err)
                    self._finish(number + 1)
                    return
                self._taken += 1
            try:
                result = self.work(batch) if batch["indices"] else None
            except BaseException as err:  # noqa: BLE001 - raised in the consumer, in its turn
                self._put(number, batch, None, err)
                with self._ready:
                    self._stopping = True
                    self._ready.notify_all()
                return
            self._put(number, batch, result, None)

    def _put(self, number: int, batch: dict[str, Any] | None, result: Any, error: BaseException | None) -> None:
        with self._ready:
            self._done[number] = (batch, result, error)
            self._ready.notify_all()

    def _finish(self, end: int) -> None:
        with self._ready:
            self._end = end
            self._ready.notify_all()

    def close(self) -> None:
        """Stop taking batches, wait for the streams' running batches, close the source (a loader's
        processes stop), restore the compute threads."""
        self._request_stop()
        for thread in self._pool:
            thread.join()
        self._pool = []
        if self._source is not None and hasattr(self._source, "close"):
            self._source.close()
            self._source = None
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
