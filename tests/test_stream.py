"""Training on WebDataset shards streamed from a URL (utils.data.stream, utils.data.stream_loader).

The tiny training split written as 4 tar shards of 6 images in the agreed format (KEY.png, KEY.cls,
KEY.json, shards.json beside them), read through `pipe:cat DIR/train-{000000..000003}.tar` and a file://
URL. The reader slots (process x loader worker) of an epoch, checked on the dataset itself: every sample
at most once, the same steps in every process, a new order each epoch, fewer shards than slots; a resume
mid-epoch gives the batches the whole epoch would have given after the stop, pixels included, through a
real 2-worker DataLoader. Through main.py's command line: a 2-process torchrun run reads each sample
exactly once per epoch, as many steps each; a run stopped mid-epoch by a signal and resumed reads (and
decodes) exactly the samples the stopped one had not, once; a missing index and a cut shard are one line.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_CLASSES, assert_ok, assert_user_error, describe, recording_main,
                      run_inprocess, train_args)
from utils.data.stream import read_stream_index
from utils.data.stream_loader import StreamDataset, StreamLoader, stream_mean_std
from utils.data.transforms import train_transform

PER_SHARD, SHARDS, BATCH = 6, 4, 4

# main.py run with every streamed sample it decodes recorded (STREAM_RECORD/rank<RANK>.jsonl: [epoch, name]),
# then as conftest's RECORDING_MAIN runs it (STOP_AFTER_STEP: SIGTERM after that optimizer step)
STREAM_RECORDING = """
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository (the tests run main.py from its root)
from utils.data.stream_loader import StreamDataset
record = open(os.path.join(os.environ["STREAM_RECORD"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a", buffering=1)
decode = StreamDataset.decode
def recorded(self, sample):
    record.write(json.dumps([self.epoch, sample[1]]) + "\\n")
    return decode(self, sample)
StreamDataset.decode = recorded
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def write_shards(split: Path, out: Path, name: str = "train") -> list[str]:
    """The class folders of `split` as tar shards of PER_SHARD samples in the agreed format; the keys."""
    files = sorted((c, p) for c, name in enumerate(TINY_CLASSES) for p in sorted((split / name).iterdir()))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()  # the writer's seeded order
    out.mkdir(parents=True)
    shards, keys = [], []
    for s in range(0, len(order), PER_SHARD):
        shard = f"{name}-{s // PER_SHARD:06d}.tar"
        with tarfile.open(out / shard, "w") as tar:
            for serial in range(s, min(s + PER_SHARD, len(order))):
                label, path = files[order[serial]]
                key = f"{serial:08d}"
                members = {"png": path.read_bytes(), "cls": str(label).encode(),
                           "json": json.dumps({"path": f"{TINY_CLASSES[label]}/{path.name}"}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(f"{key}.png")
        shards.append({"name": shard, "samples": min(PER_SHARD, len(order) - s), "bytes": (out / shard).stat().st_size})
    counts = [sum(1 for c, _ in files if c == k) for k in range(len(TINY_CLASSES))]
    (out / "shards.json").write_text(json.dumps({"format": "webdataset", "version": 1, "split": name,
                                                 "class_names": TINY_CLASSES, "task_type": "multiclass",
                                                 "class_counts": counts, "samples": len(files), "shards": shards}))
    return keys


@pytest.fixture(scope="module")
def shards(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("stream")
    keys = write_shards(tiny_data / "train", root / "train")
    write_shards(tiny_data / "val", root / "val", "val")
    pattern = f"train-{{000000..{SHARDS - 1:06d}}}.tar"
    return {"root": root, "keys": keys, "pipe": f"pipe:cat {root}/train/{pattern}", "file": f"file://{root}/train/{pattern}",
            "val": f"file://{root}/val/val-{{000000..000001}}.tar"}


def key_of(name: str) -> str:
    return name.rpartition("#")[2]


def epoch_batches(spec: str, world: int, workers: int, epoch: int, monkeypatch: pytest.MonkeyPatch,
                  skip_steps: int = 0) -> list[list[list[str]]]:
    """[rank] -> the batches (their keys) the rank's loader gives, its workers taken in turn as a DataLoader does."""
    import utils.data.stream_loader as stream_loader

    index = read_stream_index(spec)
    transform = train_transform(32, "crop", [], "bilinear")
    result = []
    for rank in range(world):
        per_worker = []
        for worker in range(max(1, workers)):
            monkeypatch.setattr(stream_loader, "get_worker_info", lambda w=worker: SimpleNamespace(id=w))
            dataset = StreamDataset(index, transform, 3, seed=5, batch_size=BATCH, rank=rank, world_size=world,
                                    workers=workers, buffer=4)
            dataset.epoch, dataset.skip_steps = epoch, skip_steps
            per_worker.append([[key_of(n) for n in b["paths"]] for b in dataset])
        turns = [b for i in range(max(map(len, per_worker))) for w in per_worker if i < len(w) for b in [w[i]]]
        result.append(turns)
    return result


@pytest.mark.parametrize("url", ["pipe", "file"])
def test_reader_slots_give_each_sample_at_most_once_and_every_process_the_same_steps(
        shards: dict[str, Any], url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 process x 1 reader, 2 x 2, 3 x 2 (6 slots, 4 shards: each slot keeps every 6th sample of all) and 3 x 1
    (whole shards give 12/6/6, which would leave 12 out: the split is cut into runs of 8, two shards shared):
    every key of the index at most once per epoch, the few left out fewer than a batch per slot, as many
    batches in every process, and the order of epoch 1 other than epoch 0's."""
    for world, workers in [(1, 0), (2, 2), (3, 2), (3, 0)]:
        orders = []
        for epoch in (0, 1):
            ranks = epoch_batches(shards[url], world, workers, epoch, monkeypatch)
            read = [k for batches in ranks for b in batches for k in b]
            assert len(read) == len(set(read)) and set(read) <= set(shards["keys"]), (world, workers)
            slots = world * max(1, workers)
            assert len(shards["keys"]) - len(read) < slots * BATCH, (world, workers, len(read))
            assert len({len(batches) for batches in ranks}) == 1 and all(len(b) == BATCH for r in ranks for b in r)
            orders.append(read)
        assert orders[0] != orders[1], (world, workers)
    whole = epoch_batches(shards[url], 1, 0, 0, monkeypatch)[0]
    assert sorted(k for b in whole for k in b) == sorted(shards["keys"])  # one reader, 24 = 6 batches: all of them


def test_an_epoch_plan_leaves_out_fewer_than_a_batch_per_slot() -> None:
    """The review's case, 1079 images in shards of 300/300/300/179 over 2 processes (whole shards: 600/479, both
    take the smaller, 14% out), and others: the images trained on are the plans' batches, each slot's within
    its own count, and fewer than slots x batch sit out, in every epoch."""
    from utils.data.stream import epoch_plan

    for counts, world, workers, batch in [((300, 300, 300, 179), 2, 1, 32), ((300, 300, 300, 179), 2, 2, 16),
                                          ((500, 20, 20, 20, 20), 2, 1, 8), ((7,) * 9, 3, 2, 2)]:
        slots = world * workers
        for epoch in range(3):
            plans, batches = epoch_plan(counts, 0, epoch, world, workers, batch)
            assert sum(p.count for p in plans) == sum(counts) and len({sum(b) for b in batches}) == 1
            assert all(batches[r][w] * batch <= plans[r * workers + w].count for r in range(world) for w in range(workers))
            out = sum(counts) - sum(map(sum, batches)) * batch
            assert 0 <= out < slots * batch, (counts, world, workers, batch, epoch, out)


def test_mean_std_of_a_stream_is_that_of_its_images(shards: dict[str, Any], tiny_data: Path) -> None:
    """Fewer images than MEAN_STD_IMAGES: the stream's mean/std are those of the same 24 files read as a folder."""
    from utils.data.loaders import compute_mean_std

    files = [(str(p), 0) for p in sorted((tiny_data / "train").rglob("*.png"))]
    expected = compute_mean_std(files, 32, 3)
    got = stream_mean_std(read_stream_index(shards["file"]), 32, 3)
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-9), (got, expected)


def test_resume_mid_epoch_gives_the_rest_of_the_epoch_through_two_workers(shards: dict[str, Any]) -> None:
    """A real DataLoader with 2 workers: the epoch resumed after 2 of its steps gives the same batches
    (keys and pixels) as the whole epoch from its third step on; another worker count is refused."""
    index = read_stream_index(shards["pipe"])
    transform = train_transform(32, "crop", [], "bilinear")

    def loader() -> StreamLoader:
        return StreamLoader(StreamDataset(index, transform, 3, seed=1, batch_size=BATCH, workers=2, buffer=4), workers=2)

    whole = loader()
    whole.set_epoch(3)
    full = list(whole)
    resumed = loader()
    resumed.load_state_dict(whole.state_dict())
    resumed.set_epoch(3, skip=2 * BATCH)
    rest = list(resumed)
    assert len(rest) == len(resumed) == len(full) - 2 > 0
    assert [b["paths"] for b in rest] == [b["paths"] for b in full[2:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(rest, full[2:]))
    other = StreamLoader(StreamDataset(index, transform, 3, seed=1, batch_size=BATCH, workers=1, buffer=4), workers=1)
    other.load_state_dict(whole.state_dict())
    with pytest.raises(Exception, match="resume it with 1 process and --workers 2"):
        other.set_epoch(3, skip=2 * BATCH)
    # a run at --workers 0 (the process reads itself): --workers 1 reads the same one stream and resumes it; the
    # refusal of --workers 2 names --workers 0, not its one reader slot
    inline = StreamLoader(StreamDataset(index, transform, 3, seed=1, batch_size=BATCH, workers=0, buffer=4), workers=0)
    other.load_state_dict(inline.state_dict())
    other.set_epoch(3, skip=2 * BATCH)
    whole.load_state_dict(inline.state_dict())
    with pytest.raises(Exception, match=r"not 1 process, --workers 2: resume it with 1 process and --workers 0$"):
        whole.set_epoch(3, skip=2 * BATCH)


def test_a_cut_val_copy_names_its_url_and_is_not_kept(shards: dict[str, Any], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A URL val split whose second shard reads short (its size is not shards.json's "bytes"): one line naming
    the shard's URL, not the cache; once the source reads whole again, the next call copies it and it works."""
    from utils.core.log import UserError
    from utils.data.stream import cache_split, index_url
    from utils.data.shards import scan_shards

    source = tmp_path / "val"
    source.mkdir()
    for f in (shards["root"] / "val").iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    shard = source / "val-000001.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])
    spec = f"file://{source}/val-{{000000..000001}}.tar"
    with pytest.raises(UserError, match=f"shard file://{source}/val-000001.tar is {len(whole) // 2} bytes where its index "
                                        f"says {len(whole)}") as err:
        cache_split(spec, tmp_path / "cache")
    assert str(tmp_path / "cache") not in str(err.value) and "\n" not in str(err.value)
    shard.write_bytes(whole)
    folder = cache_split(spec, tmp_path / "cache")
    assert (folder / "val-000001.tar").read_bytes() == whole
    assert len(scan_shards(folder, use_cache=False).samples) == 9
    from utils.data.sources import scan_split  # a message about the copy names the URL first, then the cache folder
    with pytest.raises(UserError) as err:
        scan_split(spec, class_names=["x", "y"], what="val set")
    assert str(err.value).startswith(f"val set {spec}, copied into ") and "has class 'blue'" in str(err.value), err.value
    # an index that cannot be read: why in plain words (a pipe's exit status, a path to check), not webdataset's repr
    for url, words in ((f"pipe:cat {tmp_path}/none/val-0.tar", "its command exited with status 1"),
                       (f"file://{tmp_path}/none/val-0.tar", f"no such file {tmp_path}/none/shards.json: check the path")):
        with pytest.raises(UserError, match="cannot read its index") as err:
            cache_split(url, tmp_path / "cache")
        assert index_url(url) in str(err.value) and words in str(err.value) and "shell" not in str(err.value), err.value


def stream_run(record: Path, *args: Any, env: dict[str, str] | None = None, nproc: int = 0) -> subprocess.CompletedProcess:
    """main.py (under torchrun with `nproc` processes) recording the streamed samples it decodes into `record`."""
    record.mkdir(parents=True)
    wrapper = record / "stream_recording.py"
    wrapper.write_text(STREAM_RECORDING)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, *launch, str(wrapper), str(recording_main(record)), str(REPO / "main.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV | {"STREAM_RECORD": str(record)} | (env or {}),
                          capture_output=True, text=True, timeout=600)


def decoded(record: Path) -> dict[int, dict[int, list[str]]]:
    """rank -> epoch -> the keys it decoded, in order."""
    result: dict[int, dict[int, list[str]]] = {}
    for f in sorted(record.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            epoch, name = json.loads(line)
            result.setdefault(int(f.stem[4:]), {}).setdefault(epoch, []).append(key_of(name))
    return result


def test_two_processes_and_a_resumed_run_read_each_sample_once_per_epoch(shards: dict[str, Any], tiny_data: Path) -> None:
    """torchrun, 2 processes over pipe:cat: each epoch the two read disjoint halves of all 24 samples, 3 steps
    each. One process over file://, stopped by SIGTERM after step 8 (epoch 2, step 2) and resumed: epoch 2's
    samples over both runs are all 24 once, the resumed one decoding only the 16 it had not trained on; its
    val split, a file:// URL, is copied once into the cache and read there as local shards."""
    root = shards["root"]

    def args(name: str, url: str) -> list[str]:
        return train_args(tiny_data, root / "runs" / name, "--train_path", url, "--batch_size", BATCH, "--epoch", 2,
                          "--test_path", root / "none", "--patience", 0, "--imagenet_meanstd")

    with ThreadPoolExecutor(2) as pool:
        ddp = pool.submit(stream_run, root / "ddp", *args("ddp", shards["pipe"]), nproc=2)
        stopped = pool.submit(stream_run, root / "stopped", *args("stopped", shards["file"]), "--val_path", shards["val"],
                              env={"STOP_AFTER_STEP": "8"})
        ddp, stopped = ddp.result(), stopped.result()
    assert_ok(ddp)
    assert "weights identical on all 2 processes" in ddp.stdout and "3 steps per epoch" in ddp.stdout, describe(ddp)
    assert "24 of 24 training images per epoch (the rest, fewer than a batch per reader, sit out)" in ddp.stdout
    reads = decoded(root / "ddp")
    for epoch in (0, 1):
        first, second = reads[0][epoch], reads[1][epoch]
        assert len(first) == len(second) == 3 * BATCH and sorted(first + second) == sorted(shards["keys"]), epoch

    assert stopped.returncode != 0 and "stopped at epoch 2, step 2" in stopped.stdout, describe(stopped)
    resumed = stream_run(root / "resumed", "--save_path", root / "runs" / "stopped", "--resume")
    assert_ok(resumed)
    assert "resuming" in resumed.stdout and "step 2" in resumed.stdout, describe(resumed)
    # the URL val split: copied into the cache once, read there as local shards (all 9 images), re-used on resume
    assert "2 shards copied into" in stopped.stdout and "copied into" not in resumed.stdout, describe(resumed)
    assert "calibration on the val split (9 images)" in resumed.stdout, describe(resumed)
    before, after = decoded(root / "stopped")[0], decoded(root / "resumed")[0]
    assert sorted(before[0]) == sorted(shards["keys"])
    assert len(before[1]) == 2 * BATCH and len(after[1]) == len(shards["keys"]) - 2 * BATCH
    assert sorted(before[1] + after[1]) == sorted(shards["keys"])
    assert set(after) == {1}  # nothing decoded again for epoch 1


def test_missing_index_and_cut_shard_are_one_line(shards: dict[str, Any], tiny_data: Path, tmp_path: Path) -> None:
    """No shards.json beside the shards: one line naming where it was looked for and how to write one; --kfold
    and --sampler balanced on a stream: one line each. A shard cut in the middle: one line naming the shard's
    URL, at the step that reads it."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (shards["root"] / "train").glob("*.tar"):
        (bare / f.name).write_bytes(f.read_bytes())
    pattern = f"train-{{000000..{SHARDS - 1:06d}}}.tar"
    proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "a", "--train_path", f"pipe:cat {bare}/{pattern}"))
    assert_user_error(proc, f"{bare}/shards.json", "--write_shards")
    for refused in (["--kfold", 2], ["--sampler", "balanced"]):  # they need the images by name
        proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "c", "--train_path", shards["file"], *refused))
        assert_user_error(proc, refused[0], "is streamed")

    cut = tmp_path / "cut"
    cut.mkdir()
    for f in (shards["root"] / "train").iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    shard = cut / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "b", "--train_path", f"file://{cut}/{pattern}",
                                                "--shard_buffer", 0, "--imagenet_meanstd"))  # no mean/std pass: the loader meets it
    assert_user_error(proc, f"file://{cut}/train-000002.tar", "cut short")


@pytest.mark.parametrize("multilabel", [False, True])
def test_class_balance_of_a_stream_index_is_that_of_its_targets(multilabel: bool) -> None:
    """--class_balance from an index's class counts and sample count: the weights the targets themselves give."""
    from utils.core.task import MULTICLASS, MULTILABEL
    from utils.train.losses import class_balance_weights

    task = MULTILABEL if multilabel else MULTICLASS
    targets = [(0, 2), (1,), (0,), (0, 1, 2), (2,)] if multilabel else [0, 0, 0, 1, 2, 2]
    counts = task.class_counts(targets, 3).tolist()
    for mode in ("sqrt", "inverse", "effective"):
        expected = class_balance_weights(targets, 3, mode, 0.9, task)
        got = class_balance_weights(None, 3, mode, 0.9, task, counts=(counts, len(targets)))
        assert torch.allclose(got, expected), (mode, got, expected)


def test_metrice_names_a_url_split_and_export_int8_refuses_a_streamed_training_split(
        shards: dict[str, Any], trained_run: Any, tmp_path: Path) -> None:
    """metrice.py --task val on a URL: its messages and args.yaml name the URL (and the cache folder it was copied
    into), its 9 images evaluated. export.py --int8 with --train_path a URL of training shards: one line saying to
    pass local images, before anything is copied into the stream cache (which would hold the whole training split)."""
    import yaml

    proc = run_inprocess("metrice.py", "--save_path", trained_run.path, "--task", "val", "--val_path", shards["val"],
                         "--device", "cpu")
    assert_ok(proc)
    assert f"on val set {shards['val']} (copied into " in proc.stdout and "(9 images" in proc.stdout, describe(proc)
    written = max((trained_run.path).glob("val*/args.yaml"), key=lambda f: f.stat().st_mtime)
    assert yaml.safe_load(written.read_text())["split"].startswith(f"{shards['val']} (copied into ")

    from utils.data.stream import stream_cache_dir

    before = set(stream_cache_dir().glob("*")) if stream_cache_dir().is_dir() else set()
    proc = run_inprocess("export.py", "--save_path", trained_run.path, "--export", "onnx", "--int8", "--device", "cpu",
                         "--train_path", shards["file"], "--output_path", tmp_path / "out")
    assert_user_error(proc, shards["file"], "calibration images", "--train_path with local training images")
    assert (set(stream_cache_dir().glob("*")) if stream_cache_dir().is_dir() else set()) == before


def test_the_epoch_plan_keeps_whole_shards_when_they_balance_and_follows_seed_and_epoch() -> None:
    """8 shards of 7 over 2 processes x 2 workers, batch 3: whole shards leave 2 images per slot out (fewer
    than a batch), so each shard is read whole by one slot; the order comes from (seed, epoch)."""
    from utils.data.stream import epoch_plan, plan_epoch

    cases = ((0, 0), (0, 1), (5, 0))
    plans = {case: epoch_plan([7] * 8, *case, 2, 2, 3)[0] for case in cases}
    for (seed, epoch), plan in plans.items():
        assert plan == plan_epoch([7] * 8, seed, epoch, 4) and not any(p.spans for p in plan)
    assert len({tuple(p.shards for p in plan) for plan in plans.values()}) == len(cases)
