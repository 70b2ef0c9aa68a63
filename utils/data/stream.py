"""Splits given as URLs of WebDataset tar shards: which URLs, their index, each epoch's plan, the samples of a shard.

    index = read_stream_index("pipe:cat data/train/train-{000000..000003}.tar")   # shards.json beside the shards
    plans = plan_epoch(index.counts, seed=0, epoch=3, slots=4)                    # which shards each reader slot streams
    for name, image, target in shard_samples(index.urls[0], index.counts[0]): ...  # 'URL#00000012.jpg', bytes, 2

A URL is anything webdataset's gopen opens (http(s)://, file://, pipe:COMMAND, gs://, ...; s3 through
`pipe:aws s3 cp s3://... -`), with braces expanded (braceexpand). Its index is shards.json beside the
shards, read through the same opener; without one a stream cannot know an epoch's length, and it is
refused in one line. The training loader over a stream is utils.data.stream_loader; a URL val/test split
is copied once into the user's cache (`cache_split`) and read there as local shards. No torch here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from utils.core.files import atomic_write, atomic_write_text
from utils.core.log import UserError
from utils.data.containers import member_name

# webdataset's gopen schemes (its `hf:` is left to the Hugging Face datasets source: `--train_path hf:PATH`)
STREAM_SCHEMES = ("pipe", "file", "http", "https", "sftp", "ftps", "scp", "gs", "htgs", "ais")
INDEX_NAME = "shards.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif", "ppm", "pgm")
_TAR_NAME = re.compile(r"[^/\s'\"]+\.tar")
HOW_TO_INDEX = ("processing.py --write_shards writes one; for shards another tool wrote, write its fields "
                "(docs/data.md, 'Shards streamed from a URL')")


class StreamError(OSError):
    """A shard that cannot be streamed (unreachable, cut short, other than its index says); the message names it."""


def is_stream_url(path: str | Path) -> bool:
    """Whether a split path is a URL to stream (pipe:, file://, http(s):// ...) rather than a local path."""
    scheme, sep, _ = str(path).partition(":")
    return bool(sep) and scheme.lower() in STREAM_SCHEMES


def expand_urls(spec: str) -> list[str]:
    """The shard URLs of a URL pattern, braces expanded (`train-{000000..000003}.tar`: four URLs)."""
    import braceexpand

    return list(braceexpand.braceexpand(spec))


def shard_name(url: str) -> str:
    """The file name of the shard a URL reads (`train-000003.tar` of `pipe:aws s3 cp s3://b/train-000003.tar -`)."""
    names = _TAR_NAME.findall(url)
    if not names:
        raise UserError(f"{url}: names no .tar shard; a streamed split is WebDataset tar shards "
                        "(e.g. 'pipe:cat data/train/train-{000000..000003}.tar')")
    return names[-1]


def index_url(url: str) -> str:
    """The URL of the index beside a shard: the same URL with the shard's file name replaced by shards.json."""
    name = shard_name(url)
    at = url.rfind(name)
    return url[:at] + INDEX_NAME + url[at + len(name):]


def open_url(url: str) -> Any:
    """A binary stream of a URL through webdataset's gopen (a pipe's failing command raises on read or close)."""
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def read_url(url: str) -> bytes:
    """The whole content of a URL.

    Raises:
        StreamError: it cannot be read (the reason, the URL).
    """
    try:
        stream = open_url(url)
        try:
            return stream.read()
        finally:
            stream.close()
    except Exception as err:  # noqa: BLE001 - every opener has its own errors (a pipe's exit status, HTTP, a missing file)
        raise StreamError(f"{url}: cannot be read ({_reason(err)})") from None


_EXIT = re.compile(r"\bexit (-?\d+)")


def _reason(err: BaseException) -> str:
    """Why a URL could not be read, in plain words (not webdataset's repr of the pipe's arguments)."""
    if isinstance(err, FileNotFoundError):
        return f"no such file {err.filename}: check the path" if err.filename else "no such file: check the path"
    text = str(err)
    status = _EXIT.search(text)
    if status:
        return f"its command exited with status {status.group(1)}: check the URL and that the command can read it"
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


@dataclass(frozen=True)
class StreamIndex:
    """A streamed split: its shard URLs and what its index says of them.

    Attributes:
        spec: the split as given (a URL pattern).
        urls: the shard URLs, braces expanded, in the given order.
        counts: the samples of each shard (the index's).
        class_names, task_type, class_counts: the index's.
        digest: sha256 of the index file (a cached copy is re-used while it is unchanged).
        sizes: each shard's bytes as the index gives them (None where it does not).
    """

    spec: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    class_names: tuple[str, ...]
    task_type: str
    class_counts: tuple[int, ...]
    digest: str
    sizes: tuple[int | None, ...] = ()

    @property
    def total(self) -> int:
        """Samples in the split (one epoch)."""
        return sum(self.counts)


def read_stream_index(spec: str) -> StreamIndex:
    """A URL split's shards and their index (shards.json beside the first shard, through the same opener).

    Raises:
        UserError: no shard named, no readable index (how to make one), shards the index does not list.
    """
    urls = expand_urls(spec)
    where = index_url(urls[0])
    try:
        raw = read_url(where)
    except StreamError as err:
        raise UserError(f"{spec}: cannot read its index {where}: {str(err).partition(': cannot be read (')[2][:-1]}; "
                        f"a stream needs shards.json beside its shards for an epoch's length: {HOW_TO_INDEX}") from None
    try:
        index = json.loads(raw)
        listed = {s["name"]: int(s["samples"]) for s in index["shards"]}
        sizes = {s["name"]: s.get("bytes") for s in index["shards"]}
        class_names = tuple(str(c) for c in index["class_names"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{spec}: {where} is not a shard index ({type(err).__name__}: {err}); {HOW_TO_INDEX}") from None
    missing = [u for u in urls if shard_name(u) not in listed]
    if missing:
        raise UserError(f"{spec}: {missing[0]} is not in its index {where} ({len(missing)} of {len(urls)} shards are not); "
                        f"{HOW_TO_INDEX}")
    counts = tuple(listed[shard_name(u)] for u in urls)
    class_counts = tuple(int(c) for c in index.get("class_counts") or [0] * len(class_names))
    return StreamIndex(spec, tuple(urls), counts, class_names, str(index.get("task_type", "multiclass")), class_counts,
                       hashlib.sha256(raw).hexdigest(), tuple(_size(sizes[shard_name(u)]) for u in urls))


def _size(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and value >= 0 else None


# ------------------------------------------------------------------------------------ epochs
@dataclass(frozen=True)
class SlotPlan:
    """What one reader slot (a process's loader worker) streams in an epoch: `shards` (indices into the
    index's URLs) in this order, keeping the samples whose running number i has i % modulus == remainder
    (modulus 1: all of them; more when there are fewer shards than slots). `spans`, when given, one
    (start, stop) per shard: only the shard's samples start..stop-1 (a shard shared by two slots). `count`:
    the samples it keeps."""

    shards: tuple[int, ...]
    modulus: int
    remainder: int
    count: int
    spans: tuple[tuple[int, int], ...] = ()


def plan_epoch(counts: Sequence[int], seed: int, epoch: int, slots: int) -> list[SlotPlan]:
    """Each slot's shards for an epoch: the shards in a seeded order of (seed, epoch), each given to the slot
    with the fewest samples so far (balanced by the index's counts). Fewer shards than slots: every slot
    streams all of them and keeps every `slots`-th sample (each sample still read by one slot), so a small
    split still trains with any number of processes and workers, at the cost of reading it `slots` times.

    Returns:
        One SlotPlan per slot (slot = rank * workers + worker).
    """
    order = list(range(len(counts)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    total = sum(counts)
    if len(order) < slots:
        return [SlotPlan(tuple(order), slots, s, len(range(s, total, slots))) for s in range(slots)]
    given: list[list[int]] = [[] for _ in range(slots)]
    load = [0] * slots
    for shard in order:
        slot = min(range(slots), key=lambda s: (load[s], s))
        given[slot].append(shard)
        load[slot] += counts[shard]
    return [SlotPlan(tuple(given[s]), 1, 0, load[s]) for s in range(slots)]


def plan_ranges(counts: Sequence[int], seed: int, epoch: int, slots: int) -> list[SlotPlan]:
    """Each slot's samples for an epoch as one run of the split: the shards in plan_epoch's seeded order laid end
    to end and cut into `slots` runs of equal length (within one sample). A shard cut between two slots is
    read by both, each keeping its own part, so at most slots - 1 shards are read twice.

    Returns:
        One SlotPlan per slot, with spans.
    """
    order = list(range(len(counts)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    total = sum(counts)
    plans = []
    for slot in range(slots):
        begin, end = slot * total // slots, (slot + 1) * total // slots
        shards, spans, at = [], [], 0
        for shard in order:
            start, stop = max(begin, at) - at, min(end, at + counts[shard]) - at
            if start < stop:
                shards.append(shard)
                spans.append((start, stop))
            at += counts[shard]
        plans.append(SlotPlan(tuple(shards), 1, 0, end - begin, tuple(spans)))
    return plans


def epoch_plan(counts: Sequence[int], seed: int, epoch: int, world_size: int, workers: int,
               batch_size: int) -> tuple[list[SlotPlan], list[list[int]]]:
    """The slot plans and [rank][worker] batches of an epoch: whole shards (plan_epoch) when the images they
    leave out are fewer than a batch per slot, else the split cut into equal runs (plan_ranges), which leaves
    out fewer than a batch per slot always (a whole-shard plan of 300/300/300/179 images over 2 slots gives
    600/479, and both processes take 479 // batch steps).

    Args:
        counts: the samples of each shard.
        seed, epoch: the run's seed and the epoch (the order of the shards).
        world_size, workers: processes, and reader slots of each.
        batch_size: images per batch.
    """
    slots = world_size * workers
    plans = plan_epoch(counts, seed, epoch, slots)
    batches = epoch_batches(plans, world_size, workers, batch_size)
    if sum(counts) - sum(map(sum, batches)) * batch_size >= slots * batch_size:
        plans = plan_ranges(counts, seed, epoch, slots)
        batches = epoch_batches(plans, world_size, workers, batch_size)
    return plans, batches


def round_robin(batches: Sequence[int], steps: int) -> list[int]:
    """How many of its batches each loader worker gives in the first `steps` batches of its process: a
    DataLoader takes them in turn (worker 0, 1, ..., 0, 1, ...), passing over a worker that has no more.

    Args:
        batches: each worker's batches.
        steps: how many batches the process takes.
    """
    taken = [0] * len(batches)
    left = min(steps, sum(batches))
    i = 0
    while left > 0:
        for w, n in enumerate(batches):
            if n > i and left > 0:
                taken[w] += 1
                left -= 1
        i += 1
    return taken


def epoch_batches(plans: Sequence[SlotPlan], world_size: int, workers: int, batch_size: int) -> list[list[int]]:
    """Each process's workers' batches in an epoch: every process takes as many steps (DDP waits for all),
    the fewest any process's full batches make; the few samples over are left out (others each epoch).

    Returns:
        [rank][worker] -> batches that worker gives.
    """
    full = [[plans[r * workers + w].count // batch_size for w in range(workers)] for r in range(world_size)]
    steps = min(sum(row) for row in full)
    return [round_robin(row, steps) for row in full]


# ----------------------------------------------------------------------------------- samples
def _target(text: str) -> int | tuple[int, ...]:
    labels = tuple(int(v) for v in text.split())
    return labels[0] if len(labels) == 1 else labels


def _sample(url: str, key: str, members: dict[str, bytes]) -> tuple[str, bytes, Any]:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None or "cls" not in members:
        raise StreamError(f"{url}#{key}: a sample needs an image and a .cls member; it has {', '.join(sorted(members))}")
    return member_name(url, f"{key}.{ext}"), members[ext], _target(members["cls"].decode())


def shard_samples(url: str, expected: int | None = None) -> Iterator[tuple[str, bytes, Any]]:
    """The samples of one shard, streamed in order: (name `URL#KEY.EXT`, the image's bytes, the target: a
    class index, or a tuple of them for a multilabel sample).

    Raises:
        StreamError: the shard cannot be opened, is cut short, or holds other than `expected` samples.
    """
    done, stream, complete = 0, None, False
    try:
        stream = open_url(url)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                name = f"{folder}/{stem}" if folder else stem
                if name != key and members:
                    yield _sample(url, key, members)
                    done += 1
                    members = {}
                key = name
                members[ext.lower()] = tar.extractfile(info).read()
            if members:
                yield _sample(url, key, members)
                done += 1
        complete = True
        stream.close()  # a pipe's command that failed says so here
    except StreamError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise StreamError(f"shard {url} cannot be streamed after {done} samples ({_reason(err)}): it is cut short or "
                          "unreachable; write it again (processing.py --write_shards) or check the URL") from None
    finally:
        if stream is not None and not complete:  # left early (the epoch's batches were full) or failed
            with contextlib.suppress(Exception):
                stream.close()
    if expected is not None and done != expected:
        raise StreamError(f"shard {url} holds {done} samples where its index says {expected}: it is cut short or "
                          "was changed after shards.json; write the shards again (processing.py --write_shards)")


def slot_samples(urls: Sequence[str], counts: Sequence[int], plan: SlotPlan) -> Iterator[tuple[int, str, bytes, Any]]:
    """A slot's samples of an epoch as (number of the sample in the split's index order, name, bytes, target)."""
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    running = 0
    for i, shard in enumerate(plan.shards):
        start, stop = plan.spans[i] if plan.spans else (0, counts[shard])
        samples = shard_samples(urls[shard], counts[shard] if stop == counts[shard] else None)
        for position, (name, data, target) in enumerate(samples):
            if position >= stop:  # the rest of the shard is another slot's
                samples.close()
                break
            if position >= start and running % plan.modulus == plan.remainder:
                yield offsets[shard] + position, name, data, target
            running += position >= start


def buffer_shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Items in a shuffled order through a buffer of `size` (WebDataset's shuffle): each new item takes the place
    of a random one, which comes out; at the end the rest come out shuffled. size <= 1: the order as it is."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        at = rng.randrange(size)
        buffer[at], item = item, buffer[at]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------- val/test: a local copy
def cache_split(spec: str, base: Path) -> Path:
    """A URL val/test split copied once into `base`/<hash of the URL pattern>/ (its shards and shards.json),
    re-used while its index is unchanged; a split read every epoch is small, and read locally by name it
    needs no stream. Each shard is copied to a temporary name, its size checked against the index's
    "bytes", then renamed; the stamp that marks the copy complete is written only after all of them, so a
    copy cut short is never re-used. Returns the local folder.

    Raises:
        UserError: no index, or a shard that cannot be read or is not the size its index says (naming its URL).
    """
    index = read_stream_index(spec)
    folder = base / hashlib.sha256(spec.encode()).hexdigest()[:16]
    stamp = folder / "source.json"
    try:
        if json.loads(stamp.read_text()).get("index") == index.digest:
            return folder
    except (OSError, ValueError, AttributeError):  # no stamp, or not one this copy wrote: copy again
        pass
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    where = index_url(index.urls[0])
    sizes = index.sizes or (None,) * len(index.urls)
    for url, size, target in [*zip(index.urls, sizes, (folder / shard_name(u) for u in index.urls)),
                              (where, None, folder / INDEX_NAME)]:
        try:
            atomic_write(target, lambda tmp, url=url, size=size: _copy_url(url, tmp, size))
        except StreamError as err:
            raise UserError(f"{err}; the val/test copy was not kept, run again once the URL reads whole") from None
    atomic_write_text(stamp, json.dumps({"spec": spec, "index": index.digest}))
    print(f"{spec}: {len(index.urls)} shards copied into {folder} (re-used while its shards.json is unchanged)", flush=True)
    return folder


def _copy_url(url: str, path: str, size: int | None = None) -> None:
    try:
        stream = open_url(url)
        with open(path, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        stream.close()
    except Exception as err:  # noqa: BLE001 - as read_url
        raise StreamError(f"{url}: cannot be read ({_reason(err)})") from None
    got = os.path.getsize(path)
    if size is not None and got != size:
        raise StreamError(f"shard {url} is {got} bytes where its index says {size}: it is cut short or was changed "
                          "after shards.json")


def stream_cache_dir() -> Path:
    """Where URL val/test splits are copied: utils.data.scan_cache's cache folder, `streamed/` (the system's
    temporary folder with PYTORCH_CLASSIFIER_CACHE=off)."""
    from utils.data.scan_cache import cache_dir

    if os.environ.get("PYTORCH_CLASSIFIER_CACHE") == "off":
        return Path(tempfile.gettempdir()) / "pytorch-classifier-streamed"
    return cache_dir() / "streamed"


def local_split(path: str | Path) -> str | Path:
    """A split path as a local path: a URL split copied into the cache (`cache_split`), anything else as it is."""
    if is_stream_url(path):
        return cache_split(str(path), stream_cache_dir())
    return path
