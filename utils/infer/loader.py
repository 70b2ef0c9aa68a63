"""Images to predict, decoded in batches: once per input geometry of the models.

    loader = prediction_loader(files, ensemble.plan(), batch_size=64, workers=2)
    for batch in loader:     # {"inputs": uint8 batch per geometry, "views", "indices", "failed": [(index, reason)]}
        probs, _ = ensemble.predict(batch["inputs"], plan)

With workers > 0 the batches are decoded in that many processes, at most two per worker ahead of
the consumer (memory stays flat); a file that fails to decode comes back with its reason, never as
an exception, and a process that dies (a signal, the out-of-memory killer) is replaced and its
batches asked again. numpy and Pillow only: no torch import.
"""
from __future__ import annotations

import math
import multiprocessing
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from utils.core.log import UserError
from utils.data.decode import check_image_header, open_image, to_mode
from utils.infer.ensemble import InputPlan


# ------------------------------------------------------------------------------- dataset
class PredictDataset:
    """Image files -> batches of uint8 inputs (one per geometry), views and failures (load_batch).

    Args:
        files: image paths.
        plan: the input geometries of the models (Ensemble.plan).
        view: a transform whose uint8 output is kept for drawing (the model's centre view for
            Grad-CAM), or None.
        view_channels: channels of the view.
    """

    def __init__(self, files: Sequence[str | Path], plan: InputPlan, view: Any = None, view_channels: int = 3) -> None:
        self.files = [str(f) for f in files]
        self.plan = plan
        self.view = view
        self.view_channels = view_channels
        self.channels = sorted(set(plan.channels) | ({view_channels} if view is not None else set()))

    def __len__(self) -> int:
        return len(self.files)

    def load_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The batch of these files (what a loader process returns): {"inputs": one uint8 array per
        geometry, "views", "indices" of the images decoded, "failed": [(index, reason)]}. Each image is
        written straight into its batch slot (utils.data.transforms_np.ImageTransform.fill)."""
        n = len(indices)
        inputs = [np.empty((n, *t.output_shape()), dtype=np.uint8) for t in self.plan.transforms]
        views = np.empty((n, *self.view.output_shape()), dtype=np.uint8) if self.view is not None else None
        kept: list[int] = []
        failed: list[tuple[int, str]] = []
        for index in indices:
            slot = len(kept)
            path = self.files[index]
            try:
                # decoded once for every channel count; a gray image stays L (the slot's channels take it)
                decoded = open_image(path)
                images = {c: to_mode(decoded, c, keep_gray=True) for c in self.channels}
                for transform, channels, out in zip(self.plan.transforms, self.plan.channels, inputs):
                    transform.fill(images[channels], out[slot])
                if views is not None:
                    self.view.fill(images[self.view_channels], views[slot])
            except Exception as err:  # noqa: BLE001 - any decoder failure means 'skip and report'
                failed.append((index, check_image_header(Path(path)) or f"cannot decode ({type(err).__name__}: {err})"))
                continue
            kept.append(index)
        if len(kept) < n:  # views of the images kept (the slots after them are unused)
            inputs = [batch[:len(kept)] for batch in inputs]
            views = views[:len(kept)] if views is not None else None
        return {"inputs": inputs if kept else [], "views": views if kept else None, "indices": kept, "failed": failed}


class PredictionLoader:
    """Batches of a PredictDataset in file order. With workers > 0, batches are decoded in that
    many processes, at most 2 per worker ahead of the consumer (memory stays flat).

    Args:
        dataset: the files and their transforms.
        batch_size: images per batch.
        workers: decoding processes; 0 decodes in this process.
    """

    def __init__(self, dataset: PredictDataset, batch_size: int, workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def _chunks(self) -> Iterator[range]:
        for start in range(0, len(self.dataset), self.batch_size):
            yield range(start, min(start + self.batch_size, len(self.dataset)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.workers == 0:
            for chunk in self._chunks():
                yield self.dataset.load_batch(chunk)
            return
        chunks = self._chunks()
        processes = LoaderProcesses(self.dataset.load_batch, self.workers)
        try:
            pending: deque[list[Any]] = deque()  # [chunk, its future, times asked again]
            for chunk in chunks:
                pending.append([chunk, processes.submit(chunk), 0])
                if len(pending) >= 2 * self.workers:
                    break
            while pending:
                batch = self._first_back(processes, pending)
                chunk = next(chunks, None)
                if chunk is not None:
                    pending.append([chunk, processes.submit(chunk), 0])
                yield batch
        finally:
            processes.close()

    def _first_back(self, processes: "LoaderProcesses", pending: deque[list[Any]]) -> dict[str, Any]:
        """The first pending batch, once back. A loader process that dies (SIGTERM to the whole process
        group, as systemd's stop sends it; the out-of-memory killer) breaks the pool: the batches not
        back are then asked again of new processes, each up to RETRIES times.

        Raises:
            UserError: loader processes died RETRIES + 1 times over one batch (one line, exit 2).
        """
        while True:
            try:
                batch = pending[0][1].result()
            except BrokenProcessPool:
                processes.restart()
                for entry in pending:
                    if entry[1].done() and entry[1].exception() is None:
                        continue  # back before the pool broke
                    if entry[2] >= RETRIES:
                        files = self.dataset.files
                        raise UserError(f"loader processes died {RETRIES + 1} times loading {files[entry[0][0]]} ... "
                                        f"{files[entry[0][-1]]} (out of memory? killed by another process?): try "
                                        "--workers 0 or a smaller --batch_size") from None
                    entry[1], entry[2] = processes.submit(entry[0]), entry[2] + 1
                continue
            pending.popleft()
            return batch


class LoaderProcesses:
    """The loader processes of a PredictionLoader (a concurrent.futures process pool): unlike
    multiprocessing.Pool, which waited forever for the batch of a process killed mid-task (and then
    for a queue lock that process held, in terminate), a pool whose process dies fails the batches
    not back (BrokenProcessPool), and restart() starts a new one.

    Args:
        load: chunk -> batch (PredictDataset.load_batch), run in the processes.
        workers: processes.
    """

    def __init__(self, load: Any, workers: int) -> None:
        self.load = load
        self.workers = workers
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(), initializer=loader_process_signals)

    def submit(self, chunk: range) -> Future:
        # Processes start at a submit (all at the first, with fork), with Ctrl-C and SIGTERM blocked
        # in the thread that forks them; their initializer sets them up.
        with signals_blocked():
            return self.executor.submit(self.load, chunk)

    def restart(self) -> None:
        """A new pool after one of its processes died (the broken one is let go)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._start()

    def close(self) -> None:
        """Batches not begun are dropped; those being loaded are finished first (a few ms)."""
        self.executor.shutdown(wait=True, cancel_futures=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRIES = 2  # times a batch is asked again of new loader processes after one died


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back in this thread meanwhile (delivered after), so a process forked
    meanwhile cannot take one before loader_process_signals has run. Windows has no signal masks
    (nor fork: its loader processes start fresh, without the main process's handlers)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def loader_process_signals() -> None:
    """A loader process leaves Ctrl-C to the main process (predict.py's StopFlag finishes the batch,
    then stops the pool) and ends on SIGTERM, which is how a broken pool stops its processes (and
    what systemd sends every process of a service: the pool is then restarted). Inherited as
    they were, the main process's handlers turned the pool's SIGTERM into a flag, and predict.py
    waited for its loaders forever after a Ctrl-C or a SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def prediction_loader(files: Sequence[str | Path], plan: InputPlan, batch_size: int, workers: int,
                      view: Any = None, view_channels: int = 3) -> PredictionLoader:
    """Batches of decoded images for prediction (in file order): {"inputs": one uint8 numpy batch
    per geometry of `plan`, "views", "indices" into `files`, "failed": [(index, reason)]}."""
    return PredictionLoader(PredictDataset(files, plan, view, view_channels), batch_size, workers)
