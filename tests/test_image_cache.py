"""--cache_images (utils.data.image_cache): a cached dataset gives exactly the pixels of an uncached one.

Covers ImageCache.build / get, the budget (cache_budget, auto / ram / off), deterministic_steps,
ImageDataset(cache=...), the RandomCrop and PILToTensor that replace torchvision's v2 ones (same
random draws, same output), and main.py --cache_images end to end (same weights, same train.log).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import utils.data.image_cache
import utils.data.loaders
import utils.data.transforms
from conftest import TINY_CLASSES, describe, load_ckpt, make_split_dataset, run_inprocess, train_args
from utils.core.schema import PreprocessSpec
from utils.data.augment import train_augment
from utils.data.image_cache import ImageCache, available_memory, cache_budget, deterministic_steps
from utils.data.loaders import ImageDataset
from utils.data.transforms import PILToTensor, RandomCrop, image_transform, train_transform

SIZE = 16      # model input size of the in-process tests: the training resize is to 17
BIG = 2**30    # a budget every test set fits in
GiB = 2**30


# ------------------------------------------------------------------------------ helpers
def mixed_images(root: Path) -> list[str]:
    """Images of several sizes (square, wide, tall) and PIL modes, as PNG files; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    palette = Image.fromarray(rng.integers(0, 8, (33, 33), dtype=np.uint8), "L").convert("P")
    palette.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    images = {
        "rgb.png": Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB"),
        "gray.png": Image.fromarray(rng.integers(0, 256, (50, 25), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (20, 60, 4), dtype=np.uint8), "RGBA"),
        "palette.png": palette,
        "deep.png": Image.fromarray(rng.integers(0, 65536, (44, 20), dtype=np.uint16)),  # 16-bit grey
        "small.png": Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8), "RGB"),
    }
    paths = []
    for name, img in images.items():
        img.save(root / name)
        paths.append(str(root / name))
    with Image.open(root / "deep.png") as raw:
        assert raw.mode.startswith("I;16") or raw.mode == "I"  # really stored as 16-bit
    with Image.open(root / "palette.png") as raw:
        assert raw.mode == "P"
    return paths


def same_size_images(root: Path, n: int, size: int = 20) -> list[str]:
    """n RGB images of the same size (each one the same number of bytes once cached)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for k in range(n):
        path = root / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(str(path))
    return paths


def samples_of(paths: list[str]) -> list[tuple[str, int]]:
    return [(p, k % 3) for k, p in enumerate(paths)]


def spec_of(channels: int, resize_mode: str = "crop") -> PreprocessSpec:
    return PreprocessSpec.create(SIZE, channels, [0.5] * channels, [0.25] * channels, resize_mode)


def assert_same_items(cached: ImageDataset, plain: ImageDataset, keys: list[Any]) -> None:
    """Every key gives the same tensor (exactly), target, path and failure as the uncached dataset."""
    for key in keys:
        got, want = cached[key], plain[key]
        assert want[0] is not None, want
        assert isinstance(got[0], torch.Tensor) and got[0].dtype == want[0].dtype == torch.uint8, key
        assert got[0].shape == want[0].shape and torch.equal(got[0], want[0]), f"pixels differ for {key}"
        assert got[1:] == want[1:], key


def blob(cache: ImageCache) -> bytes:
    return b"".join(block.tobytes() for block in cache.blocks)


# --------------------------------------------------------------- 1. cached == uncached
@pytest.mark.parametrize("resize_mode,policy,channels", [
    ("crop", "RandAugment", 3),
    ("squash", "TrivialAugmentWide", 3),
    ("letterbox", "RandAugment", 3),
    ("crop", "TrivialAugmentWide", 1),
])
def test_training_transform_cached_equals_uncached(tmp_path: Path, resize_mode: str, policy: str, channels: int) -> None:
    paths = mixed_images(tmp_path / "img")
    augment = train_augment(policy, [])[0]
    assert augment and all(not isinstance(a, str) for a in augment)
    transform = train_transform(SIZE, resize_mode, augment)
    cache = ImageCache.build(paths, channels, transform, "ram", BIG)
    assert cache is not None and cache.count == len(paths) and cache.steps == 1 and cache.kind == "pil"
    samples = samples_of(paths)
    cached = ImageDataset(samples, transform, channels, seed=5, cache=cache)
    plain = ImageDataset(samples, transform, channels, seed=5)
    keys = [(epoch, index) for epoch in (0, 1) for index in range(len(paths))]
    assert_same_items(cached, plain, keys)
    # the transform really is random: the two epochs differ for most images, so the test compares random steps
    differ = sum(not torch.equal(plain[(0, i)][0], plain[(1, i)][0]) for i in range(len(paths)))
    assert differ >= len(paths) // 2
    assert plain[(0, 0)][0].shape == (channels, SIZE, SIZE)


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("resize_mode", ["crop", "squash", "letterbox"])
def test_eval_and_tta_transform_cached_equals_uncached(tmp_path: Path, resize_mode: str, tta: bool) -> None:
    paths = mixed_images(tmp_path / "img")
    for channels in (3, 1):
        transform = image_transform(spec_of(channels, resize_mode), tta=tta)
        cache = ImageCache.build(paths, channels, transform, "ram", BIG)
        assert cache is not None and cache.count == len(paths) and cache.kind == "tensor"
        assert cache.steps == len(transform.transforms)
        samples = samples_of(paths)
        cached = ImageDataset(samples, transform, channels, cache=cache)
        plain = ImageDataset(samples, transform, channels)
        assert_same_items(cached, plain, list(range(len(paths))))
        shape = (10, channels, SIZE, SIZE) if tta else (channels, SIZE, SIZE)
        assert plain[0][0].shape == shape
        # a consumer that writes into a returned tensor does not change the cache
        cached[0][0].fill_(0)
        assert torch.equal(cached[0][0], plain[0][0])


# --------------------------------------------------------- 2. a cached image is not read
@pytest.mark.parametrize("kind", ["crop", "letterbox", "eval"])
def test_cached_images_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Neither decoded nor resized again: the cached steps are skipped, only the rest of the transform runs."""
    paths = mixed_images(tmp_path / "img")
    samples = samples_of(paths)
    if kind != "eval":
        transform, seed, keys = train_transform(SIZE, kind, train_augment("RandAugment", [])[0]), 3, [(1, i) for i in range(len(paths))]
    else:
        transform, seed, keys = image_transform(spec_of(3, "letterbox")), None, list(range(len(paths)))
    cache = ImageCache.build(paths, 3, transform, "ram", BIG)
    assert cache is not None and cache.count == len(paths)

    resized: list[str] = []
    real_resize, real_letterbox = v2.Resize.forward, utils.data.transforms.Letterbox.__call__

    def resize(self: Any, *inputs: Any) -> Any:
        resized.append("resize")
        return real_resize(self, *inputs)

    def letterbox(self: Any, img: Any) -> Any:
        resized.append("letterbox")
        return real_letterbox(self, img)

    monkeypatch.setattr(v2.Resize, "forward", resize)
    monkeypatch.setattr(utils.data.transforms.Letterbox, "__call__", letterbox)
    expected = [ImageDataset(samples, transform, 3, seed=seed)[key] for key in keys]
    assert len(resized) == len(keys)  # the spies see every resize of an uncached read
    resized.clear()

    def refuse(path: Any, channels: int = 3) -> Image.Image:
        raise OSError(f"read {path}")

    monkeypatch.setattr(utils.data.loaders, "load_image", refuse)
    monkeypatch.setattr(utils.data.image_cache, "load_image", refuse)
    cached = ImageDataset(samples, transform, 3, seed=seed, cache=cache)
    plain = ImageDataset(samples, transform, 3, seed=seed)
    for key, want in zip(keys, expected):
        got = cached[key]
        assert got[0] is not None and got[3] is None, got
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
        index = key[1] if isinstance(key, tuple) else key
        failed = plain[key]
        assert failed[0] is None and failed[2] == paths[index] and failed[3] == f"OSError: read {paths[index]}"
    assert resized == []  # the cached images were not resized again either


# --------------------------------------------------------------- 3. a corrupt file
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_corrupt_image_is_not_cached_and_reported_alike(tmp_path: Path, kind: str) -> None:
    paths = mixed_images(tmp_path / "img")
    garbage = tmp_path / "img" / "garbage.png"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 400, dtype=np.uint8).tobytes())
    cut = tmp_path / "img" / "cut.png"
    whole = (tmp_path / "img" / "rgb.png").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])  # a valid header, a truncated body
    paths = paths[:2] + [str(garbage)] + paths[2:4] + [str(cut)] + paths[4:]
    bad = [paths.index(str(garbage)), paths.index(str(cut))]
    samples = samples_of(paths)
    if kind == "train":
        transform, seed, keys = train_transform(SIZE, "squash"), 1, [(e, i) for e in (0, 1) for i in range(len(paths))]
    else:
        transform, seed, keys = image_transform(spec_of(3)), None, list(range(len(paths)))
    cache = ImageCache.build(paths, 3, transform, "ram", BIG)
    assert cache is not None and cache.count == len(paths) - 2
    assert [i for i in range(len(paths)) if cache.get(i) is None] == bad
    cached = ImageDataset(samples, transform, 3, seed=seed, cache=cache)
    plain = ImageDataset(samples, transform, 3, seed=seed)
    for key in keys:
        index = key[1] if isinstance(key, tuple) else key
        got, want = cached[key], plain[key]
        if index in bad:
            assert want[0] is None and want[3]  # the uncached dataset reports it ...
            assert got[0] is None and got[1:] == want[1:]  # ... and so does the cached one, word for word
        else:
            assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


# ------------------------------------------------------------------------- 4. budget
def test_ram_budget_caches_what_fits(tmp_path: Path) -> None:
    paths = mixed_images(tmp_path / "img")
    samples = samples_of(paths)
    transform = train_transform(SIZE, "crop", train_augment("TrivialAugmentWide", [])[0])
    full = ImageCache.build(paths, 3, transform, "ram", BIG)
    assert full is not None and full.count == len(paths)
    budget = full.nbytes // 2
    half = ImageCache.build(paths, 3, transform, "ram", budget)
    assert half is not None and 0 < half.count < len(paths) and half.nbytes <= budget
    # what is cached is the same bytes as in the full cache, image by image
    for i in range(len(paths)):
        got = half.get(i)
        if got is not None:
            assert np.array_equal(np.asarray(got), np.asarray(full.get(i)))
    cached = ImageDataset(samples, transform, 3, seed=9, cache=half)
    plain = ImageDataset(samples, transform, 3, seed=9)
    assert_same_items(cached, plain, [(e, i) for e in (0, 1) for i in range(len(paths))])


def test_ram_budget_exact_count(tmp_path: Path) -> None:
    paths = same_size_images(tmp_path / "img", 8)
    transform = image_transform(spec_of(3))
    per_image = 3 * SIZE * SIZE
    cache = ImageCache.build(paths, 3, transform, "ram", 4 * per_image + per_image // 2)
    assert cache is not None and cache.count == 4 and cache.nbytes == 4 * per_image
    assert [cache.get(i) is not None for i in range(8)] == [True] * 4 + [False] * 4
    assert ImageCache.build(paths, 3, transform, "ram", per_image - 1) is None  # not one image fits: no cache


def test_auto_and_off(tmp_path: Path) -> None:
    paths = same_size_images(tmp_path / "img", 8)
    transform = image_transform(spec_of(3))
    per_image = 3 * SIZE * SIZE
    # auto with room for all: everything
    cache = ImageCache.build(paths, 3, transform, "auto", 8 * per_image)
    assert cache is not None and cache.count == 8 and cache.nbytes == 8 * per_image
    # auto with room for half: nothing (ram would take half)
    assert ImageCache.build(paths, 3, transform, "auto", 4 * per_image) is None
    assert ImageCache.build(paths, 3, transform, "ram", 4 * per_image).count == 4
    # off, or no budget: nothing
    assert ImageCache.build(paths, 3, transform, "off", BIG) is None
    assert ImageCache.build(paths, 3, transform, "ram", 0) is None
    assert ImageCache.build([], 3, transform, "ram", BIG) is None


def test_auto_probe_gives_up_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """auto stops after the probe's images when they say the set will not fit (the loader hands over
    64 images at a time, so the probe is decided after the first 64 of 70)."""
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for k in range(70):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(root / f"{k}.png")
        paths.append(str(root / f"{k}.png"))
    transform = image_transform(spec_of(3))
    per_image = 3 * SIZE * SIZE
    monkeypatch.setattr(utils.data.image_cache, "PROBE_IMAGES", 8)
    budget = 66 * per_image  # the first 64 fit, the whole set (70) does not
    seen: list[str] = []
    real = utils.data.image_cache.load_image

    def counting(path: Any, channels: int = 3) -> Image.Image:
        seen.append(str(path))
        return real(path, channels)

    monkeypatch.setattr(utils.data.image_cache, "load_image", counting)
    with caplog.at_level(logging.INFO, logger="utils.data.image_cache"):
        assert ImageCache.build(paths, 3, transform, "auto", budget) is None
    assert len(seen) == 64  # decided after the probe: the last 6 were never decoded
    assert "its first 64 images say the whole set takes about" in caplog.text
    seen.clear()
    ram = ImageCache.build(paths, 3, transform, "ram", budget)  # ram takes what fits
    assert ram is not None and ram.count == 66 and len(seen) == 70


def test_cache_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_budget("off") == 0
    real = available_memory()
    assert real > 0
    with open("/proc/meminfo") as fh:  # Linux: MemAvailable, in kB
        avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    assert abs(real - avail) < max(avail // 5, 256 * 2**20)
    auto = cache_budget("auto")
    assert 0 < auto <= 8 * GiB and auto <= available_memory() / 4 * 1.2
    with pytest.raises(ValueError):
        cache_budget("disk")

    monkeypatch.setattr(utils.data.image_cache, "available_memory", lambda: 10 * GiB)
    assert cache_budget("auto") == int(2.5 * GiB)
    assert cache_budget("auto", processes=2) == int(1.25 * GiB)
    assert cache_budget("ram") == 8 * GiB
    assert cache_budget("ram", processes=4) == 2 * GiB
    assert cache_budget("off", processes=4) == 0
    monkeypatch.setattr(utils.data.image_cache, "available_memory", lambda: 100 * GiB)
    assert cache_budget("auto") == 8 * GiB  # never more than 8 GiB ...
    assert cache_budget("auto", processes=8) == 1 * GiB  # ... shared by the processes
    monkeypatch.setattr(utils.data.image_cache, "available_memory", lambda: 1 * GiB)
    assert cache_budget("ram") == 0  # less than the 2 GiB kept for everything else
    # loader workers: forked ones share the parent's copy; spawned ones hold one each
    monkeypatch.setattr(utils.data.image_cache, "available_memory", lambda: 10 * GiB)
    monkeypatch.setattr(utils.data.image_cache.multiprocessing, "get_start_method", lambda *a, **k: "fork")
    assert cache_budget("ram", processes=2, workers=3) == 4 * GiB
    monkeypatch.setattr(utils.data.image_cache.multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    assert cache_budget("ram", processes=2, workers=3) == 1 * GiB
    assert cache_budget("ram", processes=1, workers=0) == 8 * GiB


# ------------------------------------------------------------------------- 5. workers
@pytest.mark.parametrize("kind", ["train", "tta"])
def test_workers_build_the_same_cache(tmp_path: Path, kind: str) -> None:
    paths = mixed_images(tmp_path / "img")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    paths.insert(3, str(tmp_path / "img" / "bad.png"))
    transform = train_transform(SIZE, "letterbox") if kind == "train" else image_transform(spec_of(3), tta=True)
    serial = ImageCache.build(paths, 3, transform, "ram", BIG, workers=0)
    parallel = ImageCache.build(paths, 3, transform, "ram", BIG, workers=2)
    assert serial is not None and parallel is not None and serial.count == len(paths) - 1
    assert (serial.steps, serial.kind) == (parallel.steps, parallel.kind)
    assert np.array_equal(serial.where, parallel.where)
    assert blob(serial) == blob(parallel) and len(blob(serial)) == serial.nbytes


# ------------------------------------------------------------ 6. RandomCrop, PILToTensor
@pytest.mark.parametrize("hw", [(16, 16), (16, 23), (29, 16), (20, 20), (37, 25), (17, 40)])
def test_random_crop_matches_torchvision(hw: tuple[int, int]) -> None:
    height, width = hw
    rng = np.random.default_rng(height * 100 + width)
    for mode, shape in (("RGB", (height, width, 3)), ("L", (height, width))):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for seed in range(6):
            torch.manual_seed(seed)
            ours = RandomCrop(16)(img)
            after_ours = torch.rand(1)
            torch.manual_seed(seed)
            theirs = v2.RandomCrop(16)(img)
            after_theirs = torch.rand(1)
            assert isinstance(ours, Image.Image) and ours.mode == theirs.mode == mode
            assert ours.size == theirs.size == (16, 16)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (hw, mode, seed)
            assert torch.equal(after_ours, after_theirs), (hw, mode, seed)  # the same number of draws


def test_random_crop_tensor_and_too_small() -> None:
    x = torch.arange(3 * 20 * 27, dtype=torch.int32).reshape(3, 20, 27).to(torch.uint8)
    torch.manual_seed(4)
    ours = RandomCrop(16)(x)
    torch.manual_seed(4)
    assert torch.equal(ours, v2.RandomCrop(16)(x))
    with pytest.raises(ValueError):
        RandomCrop(16)(Image.new("RGB", (15, 30)))
    with pytest.raises(ValueError):
        RandomCrop(16)(Image.new("RGB", (30, 15)))


def test_pil_to_tensor_matches_torchvision() -> None:
    rng = np.random.default_rng(1)
    for mode, shape in (("RGB", (9, 13, 3)), ("L", (9, 13))):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        ours, theirs = PILToTensor()(img), v2.functional.pil_to_tensor(img)
        assert ours.dtype == theirs.dtype == torch.uint8 and ours.shape == theirs.shape
        assert torch.equal(ours, theirs) and torch.equal(ours, v2.PILToTensor()(img))
    x = torch.randint(0, 255, (3, 5, 5), dtype=torch.uint8)
    assert PILToTensor()(x) is x


# ------------------------------------------------------------- 7. deterministic_steps
def test_deterministic_steps() -> None:
    for mode in ("crop", "squash", "letterbox"):
        assert deterministic_steps(train_transform(SIZE, mode)) == 1
        assert deterministic_steps(train_transform(SIZE, mode, train_augment("RandAugment", [])[0])) == 1
        eval_t = image_transform(spec_of(3, mode))
        assert deterministic_steps(eval_t) == len(eval_t.transforms) == 3
        tta = image_transform(spec_of(3, mode), tta=True)
        assert deterministic_steps(tta) == len(tta.transforms) == 3
    assert deterministic_steps(v2.Compose([v2.RandomHorizontalFlip(), v2.Resize(8)])) == 0
    assert deterministic_steps(lambda img: img) == 0


# ----------------------------------------------------------------- 8. main.py end to end
def test_main_cache_images_ram_trains_like_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with and without the cache: the same weights and train.log, to the bit; with the
    cache, the epochs read no image from disk. (In-process, conftest's run_inprocess: the command
    line parsed and run as main.py runs it, without seconds of imports per run.)"""
    data = make_split_dataset(tmp_path / "data", TINY_CLASSES, train=4, val=2, test=0)
    n_train = 4 * len(TINY_CLASSES)
    real = utils.data.loaders.load_image
    reads: dict[str, list[str]] = {"off": [], "ram": []}
    procs = {}
    for mode in ("off", "ram"):
        def counting(path: Any, channels: int = 3, _seen: list[str] = reads[mode]) -> Image.Image:
            _seen.append(str(path))
            return real(path, channels)

        monkeypatch.setattr(utils.data.loaders, "load_image", counting)  # what the datasets read (not the cache's first pass)
        args = train_args(data, tmp_path / mode, "--epoch", "2", "--cache_images", mode, model="test_resnet")
        procs[mode] = run_inprocess("main.py", *args)
        assert procs[mode].returncode == 0, describe(procs[mode])
        assert "Traceback" not in procs[mode].stderr, describe(procs[mode])
    assert not (data / "test").exists()
    ram_out = procs["ram"].stdout + procs["ram"].stderr
    assert f"--cache_images ram: {n_train} of {n_train} training images in memory" in ram_out, describe(procs["ram"])
    assert "--cache_images ram: 6 of 6 validation images in memory" in ram_out
    assert "--cache_images" not in procs["off"].stdout + procs["off"].stderr
    train_files = {str(p) for p in (data / "train").rglob("*.png")}
    val_files = {str(p) for p in (data / "val").rglob("*.png")}
    assert len(train_files) == n_train and len(val_files) == 6
    # off: every epoch reads every training and validation image; ram: none (at most the mean/std pass before)
    assert all(reads["off"].count(f) >= 2 for f in train_files | val_files)
    # (both: one more read at the end, the pass that fits the unknown-image rejection: the statistics on
    # the training images, the thresholds on the validation images)
    assert all(reads["ram"].count(f) <= 1 for f in train_files | val_files)

    off, ram = load_ckpt(tmp_path / "off" / "last.pt"), load_ckpt(tmp_path / "ram" / "last.pt")
    assert off["epoch"] == ram["epoch"] == 2
    assert off["model"].keys() == ram["model"].keys() and off["model"]
    for name, tensor in off["model"].items():
        assert torch.equal(tensor, ram["model"][name]), name

    def rows(mode: str) -> list[dict[str, str]]:
        with (tmp_path / mode / "train.log").open() as fh:
            return [{k: v for k, v in row.items() if "time" not in k} for row in csv.DictReader(fh)]

    assert len(rows("off")) == 2 and rows("off") == rows("ram")


def test_available_memory_respects_a_container_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's memory limit (cgroup) caps what the cache may count on, below MemAvailable."""
    import utils.data.image_cache

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(utils.data.image_cache, "MEMINFO", str(meminfo))
    monkeypatch.setattr(utils.data.image_cache, "CGROUP_MEMORY", ((str(limit), str(usage)),))
    assert available_memory() == 20000000 * 1024                      # no cgroup files: MemAvailable
    limit.write_text("max\n")
    usage.write_text("123\n")
    assert available_memory() == 20000000 * 1024                      # no limit
    limit.write_text(f"{4 * GiB}\n")
    usage.write_text(f"{1 * GiB}\n")
    assert available_memory() == 3 * GiB                               # the limit less the group's usage
    usage.write_text(f"{5 * GiB}\n")
    assert available_memory() == 0
