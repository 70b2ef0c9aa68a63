"""WebDataset tar shards: processing.py --write_shards writes them, every split reader reads them.

The writer's round trip (every image's bytes and class come back; --shard_size cuts where asked;
the same input and seed give the same bytes), shards and class folders of the same images giving
the same samples and metrice.py the same test metrics with the same best.pt, the folder, glob and
brace forms agreeing, predict.py --source on shards, a val split remapped to the model's classes by
name, the cached member index, a truncated shard in one line through the command line, and a
2-process DDP run over shards reading each sample once per epoch.
"""
from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import (REPO, TINY_CLASSES, assert_ok, assert_user_error, describe, reads, records, recording_main, run_inprocess,
                      train_args)


@pytest.fixture(scope="module")
def sharded(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny_data's 42 images as one raw folder, split by processing.py into class folders and, with
    the same seed, into shards of 10 images (and once more into shards, for the bytes)."""
    root = tmp_path_factory.mktemp("shards")
    raw = root / "raw"
    for split in ("train", "val", "test"):
        for image in (tiny_data / split).glob("*/*"):
            (raw / image.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, raw / image.parent.name / f"{split}_{image.name}")
    common = ["--data_path", raw, "--seed", "3", "--workers", "0"]
    for out, extra in (("folders", []), ("shards", ["--write_shards", "--shard_size", "10"]),
                       ("again", ["--write_shards", "--shard_size", "10"])):
        assert_ok(run_inprocess("processing.py", *common, "--output_path", root / out, *extra))
    return {"root": root, "raw": raw, "folders": root / "folders", "shards": root / "shards", "again": root / "again"}


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_hold_every_image_with_its_class_and_cut_where_asked(sharded: dict[str, Path]) -> None:
    from utils.data.sources import scan_split

    raw, out = sharded["raw"], sharded["shards"]
    assert (out / "label.txt").read_text().split() == TINY_CLASSES
    for split, n in (("train", 24), ("val", 9), ("test", 9)):
        index = json.loads((out / split / "shards.json").read_text())
        sizes = [10] * (n // 10) + ([n % 10] if n % 10 else [])
        assert [s["samples"] for s in index["shards"]] == sizes and index["samples"] == n
        assert [s["name"] for s in index["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(sizes))]
        assert index["class_names"] == TINY_CLASSES and index["class_counts"] == [n // 3] * 3
        found = {}
        for entry in index["shards"]:
            shard = out / split / entry["name"]
            assert shard.stat().st_size == entry["bytes"]
            found.update(members(shard))
        keys = sorted({name.split(".")[0] for name in found})
        assert keys == [f"{i:08d}" for i in range(n)]  # the serials of the split, each a sample
        for key in keys:
            source = json.loads(found[f"{key}.json"])["path"]
            assert found[f"{key}.png"] == (raw / source).read_bytes()  # the file's own bytes
            assert TINY_CLASSES[int(found[f"{key}.cls"])] == Path(source).parent.name
        folder_set = scan_split(sharded["folders"] / split)
        shard_set = scan_split(out / split)
        as_source = {s: json.loads(found[f"{Path(s).stem.split('#')[1]}.json"])["path"] for s, _ in shard_set.samples}
        assert sorted((as_source[s], t) for s, t in shard_set.samples) == sorted(
            (Path(p).relative_to(sharded["folders"] / split).as_posix(), t) for p, t in folder_set.samples)
    for shard in sorted(out.glob("*/*")):  # the same input and seed: the same bytes
        assert (sharded["again"] / shard.relative_to(out)).read_bytes() == shard.read_bytes(), shard


def test_shard_size_in_bytes_and_its_refusals(tmp_path: Path) -> None:
    from utils.core.log import UserError
    from utils.data.shard_writer import ShardItem, parse_shard_size, plan_shards

    assert parse_shard_size("10000,1GB") == (10000, 10**9) and parse_shard_size("500MB") == (None, 5 * 10**8)
    assert parse_shard_size("10000, 1.5gib") == (10000, int(1.5 * 2**30))  # spaces and any case of the unit
    for bad in ("0", "1.5", "10 parsecs", ""):
        with pytest.raises(UserError, match=r"--shard_size .*or both \(10000,1GB\)$|a whole number"):
            parse_shard_size(bad)
    image = tmp_path / "a.png"
    image.write_bytes(b"x" * 1000)  # 512 + 1024 in the tar, plus 512 + 512 for .cls and .json each: 3584
    items = [ShardItem(image, [0], "c/a.png")] * 7
    plan = plan_shards("val", items, ["c"], 0, parse_shard_size("7000B"))
    assert [len(s) for s in plan.shards] == [2, 2, 2, 1]  # a shard is complete once it holds 7000 bytes
    # --shard_size without --write_shards would be ignored: refused in one line instead
    assert_user_error(run_inprocess("processing.py", "--data_path", tmp_path, "--output_path", tmp_path / "out",
                                    "--shard_size", "10"), "--shard_size sizes the shards of --write_shards")


def test_folder_glob_and_brace_name_the_same_shards(sharded: dict[str, Path]) -> None:
    from utils.data.sources import scan_split

    train = sharded["shards"] / "train"
    forms = [train, f"{train}/*.tar", f"{train}/train-{{000000..000002}}.tar"]
    sets = [scan_split(form) for form in forms]
    assert all(s.samples == sets[0].samples and s.signature == sets[0].signature for s in sets)
    assert len(sets[0].samples) == 24 and sets[0].class_names == TINY_CLASSES
    one = scan_split(train / "train-000001.tar")
    assert one.samples == sets[0].samples[10:20]


def test_val_shards_follow_the_model_classes_by_name(sharded: dict[str, Path]) -> None:
    from utils.core.log import UserError
    from utils.data.sources import scan_split

    own = scan_split(sharded["shards"] / "val")
    order = ["red", "blue", "green", "extra"]
    mapped = scan_split(sharded["shards"] / "val", class_names=order)
    assert mapped.class_names == order
    assert [order[t] for _, t in mapped.samples] == [TINY_CLASSES[t] for _, t in own.samples]
    with pytest.raises(UserError, match="class 'green' that the model does not know"):
        scan_split(sharded["shards"] / "val", class_names=["red", "blue"])


def test_a_second_scan_reads_the_cached_index(sharded: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.data import shards

    spec = sharded["shards"] / "test"
    monkeypatch.setattr(shards, "_INDEXES", {})
    first = shards.scan_shards(spec)

    def no_walk(path: Path) -> None:
        raise AssertionError(f"{path} walked again")

    monkeypatch.setattr(shards, "_INDEXES", {})
    monkeypatch.setattr(shards, "walk_shard", no_walk)
    assert shards.scan_shards(spec).samples == first.samples


def test_a_truncated_shard_is_one_line_naming_it(sharded: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "train"
    shutil.copytree(sharded["shards"] / "train", broken)
    shard = broken / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:15000])
    proc = run_inprocess("main.py", *train_args(None, tmp_path / "run", "--train_path", broken))
    assert_user_error(proc, f"shard {shard} is truncated: it ends at byte 15000 after member 00000013.cls",
                      "write it again (processing.py --write_shards --force)")
    from utils.data.shards import ShardError, walk_shard

    whole = (sharded["shards"] / "train" / shard.name).read_bytes()
    end = len(whole) - 1024 - (len(whole) - 1024) % 512
    while whole[end - 512:end] == bytes(512):  # the last member's data ends here (tar pads to 10 KiB)
        end -= 512
    shard.write_bytes(whole[:end])  # cut between two members: only the missing end-of-archive blocks tell
    with pytest.raises(ShardError, match=f"shard {shard} is truncated: it ends at byte {end} after member 00000019.json, without"):
        walk_shard(shard)


def metrics_of(folder: Path) -> dict[str, str]:
    return {r["metric"]: r["value"] for r in csv.DictReader((folder / "metrics.csv").open())}


def test_metrics_and_predictions_on_shards_equal_those_on_folders(sharded: dict[str, Path], trained_run,
                                                                   tmp_path: Path) -> None:
    scores = {}
    for form in ("folders", "shards"):
        proc = run_inprocess("metrice.py", "--save_path", trained_run.path, "--task", "test", "--device", "cpu",
                             "--workers", "0", "--test_path", sharded[form] / "test")
        assert proc.returncode == 0, describe(proc)
        scores[form] = metrics_of(Path(proc.stdout.split("results: ")[-1].split()[0]))
    # the same images in another order make other batches: float32 outputs differ in the 7th digit, no more
    assert scores["shards"].keys() == scores["folders"].keys() and float(scores["shards"]["images"]) == 9
    for name, value in scores["folders"].items():
        assert float(scores["shards"][name]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), name
    assert scores["shards"]["acc"] == scores["folders"]["acc"]
    proc = run_inprocess("predict.py", "--save_path", trained_run.path, "--device", "cpu", "--source",
                         f"{sharded['shards']}/test/test-{{000000..000000}}.tar", "--save_images")
    assert proc.returncode == 0, describe(proc)
    out = Path(proc.stdout.split("results: ")[-1].split(",")[0]).parent
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 9 and all("test-000000.tar#" in r["path"] for r in rows)
    assert len(list((out / "images").iterdir())) == 9


def test_two_processes_read_each_shard_sample_once_per_epoch(sharded: dict[str, Path], tmp_path: Path) -> None:
    from test_distributed import torchrun

    from utils.data.sources import scan_split

    record = tmp_path / "records"
    record.mkdir()
    proc = torchrun(REPO / "main.py", *train_args(None, tmp_path / "run", "--train_path", f"{sharded['shards']}/train/*.tar", "--val_path",
                                sharded["shards"] / "val", "--batch_size", "4", "--epoch", "2"),
                    script=recording_main(tmp_path), env={"RECORD_DIR": str(record)})
    assert proc.returncode == 0, describe(proc)
    seen = records(record)
    assert sorted(seen) == [0, 1]
    total = len(scan_split(sharded["shards"] / "train").samples)
    for epoch in (0, 1):
        got = [reads(seen[rank], epoch) for rank in (0, 1)]
        assert len(got[0]) == len(got[1]) == total // 2
        assert sorted(got[0] + got[1]) == list(range(total))
