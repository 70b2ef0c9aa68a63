"""Data rules: class folder names and order, label.txt, skipped files, image modes and EXIF."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (add_junk_files, assert_ok, load_ckpt, make_class_folders, make_split_dataset, make_truncated_jpeg,
                      run_many, train_args)
from utils.core.log import UserError
from utils.data.decode import check_image_header, load_image
from utils.data.folders import resolve_class_names
from utils.data.imageset import natural_key
from utils.data.loaders import ImageDataset, collate
from utils.data.sources import scan_split

NAMED = ["cat", "dog", "10", "2", "défaut"]
NAMED_ORDER = ["2", "10", "cat", "dog", "défaut"]  # digits by value, then words (é sorts after o)


# ------------------------------------------------------------------------------ load_image
def saved(img: Image.Image, fmt: str, tmp_path: Path, name: str, **kw) -> Path:
    path = tmp_path / name
    img.save(path, fmt, **kw)
    return path


def test_grayscale_to_rgb_and_l(tmp_path: Path) -> None:
    path = saved(Image.new("L", (12, 7), 90), "PNG", tmp_path, "g.png")
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (12, 7) and rgb.getpixel((3, 3)) == (90, 90, 90)
    gray = load_image(path, channels=1)
    assert gray.mode == "L" and gray.getpixel((0, 0)) == 90


def test_rgb_to_single_channel(tmp_path: Path) -> None:
    path = saved(Image.new("RGB", (5, 5), (255, 0, 0)), "PNG", tmp_path, "r.png")
    gray = load_image(path, channels=1)
    assert gray.mode == "L" and gray.size == (5, 5)
    assert gray.getpixel((2, 2)) == pytest.approx(76, abs=1)  # ITU-R 601 luma of pure red


def test_palette_with_transparency_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = saved(img, "PNG", tmp_path, "p.png", transparency=0)  # palette index 0 is transparent
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (200, 10, 10)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (3, 3), (0, 0, 255, 0))
    img.putpixel((1, 1), (0, 0, 255, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    out = load_image(saved(img, "PNG", tmp_path, "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> background, not the hidden blue
    assert out.getpixel((1, 1)) == (0, 0, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 2)))  # half-transparent black on white


def test_cmyk_jpeg_to_rgb(tmp_path: Path) -> None:
    path = saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", tmp_path, "c.jpg", quality=100)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    r, g, b = out.getpixel((4, 4))
    assert r > 230 and g < 30 and b < 30  # no cyan/magenta/yellow ink = red


def test_16_bit_scaled_to_8_bit(tmp_path: Path) -> None:
    arr = np.full((6, 9), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    arr[0, 1] = 32896  # 128 * 257
    path = tmp_path / "d.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # stored as 16-bit
    gray = load_image(path, channels=1)
    assert gray.mode == "L" and gray.size == (9, 6)
    assert gray.getpixel((5, 5)) == 255 and gray.getpixel((0, 0)) == 0 and gray.getpixel((1, 0)) == 128
    assert load_image(path).getpixel((5, 5)) == (255, 255, 255)


def test_16_bit_i16_mode() -> None:
    img = Image.new("I;16", (4, 3))
    img.putpixel((0, 0), 65535)
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    buf.seek(0)
    out = load_image(buf, channels=1)
    assert out.mode == "L" and out.getpixel((0, 0)) == 255 and out.getpixel((1, 1)) == 0


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 5, 10))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates 90 degrees clockwise
    for name, fmt, options in (("e.jpg", "JPEG", {"quality": 100}), ("e.tif", "TIFF", {})):  # a TIFF's tag too
        out = load_image(saved(img, fmt, tmp_path, name, exif=exif.tobytes(), **options))
        assert out.size == (10, 20), name
        assert out.getpixel((5, 1))[0] > 200 and out.getpixel((5, 18))[0] < 50  # left band is now on top


def odd_mode_files(folder: Path) -> list[Path]:
    """Non-square images of every mode the decoder converts, with and without an orientation."""
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 22, 3), dtype=np.uint8), "RGB")
    gray = Image.fromarray(rng.integers(0, 256, (13, 22), dtype=np.uint8), "L")
    rgba, la = rgb.copy(), gray.convert("LA")
    rgba.putalpha(gray)
    la.putalpha(gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    images = {"l.png": (gray, {}), "rgb.png": (rgb, {}), "rgba.png": (rgba, {}), "la.png": (la, {}),
              "p.png": (rgb.convert("P"), {}), "pt.png": (rgb.convert("P"), {"transparency": 2}),
              "one.png": (gray.convert("1"), {}), "i16.png": (Image.fromarray(rng.integers(0, 65536, (13, 22), dtype=np.uint16)), {}),
              "cmyk.jpg": (rgb.convert("CMYK"), {}), "rgb.jpg": (rgb, {}), "l.bmp": (gray, {}),
              "exif_l.png": (gray, {"exif": exif.tobytes()}), "exif_rgb.png": (rgb, {"exif": exif.tobytes()}),
              "exif.jpg": (rgb, {"exif": exif.tobytes()}), "exif_l.tif": (gray, {"tiffinfo": {0x0112: 6}}),
              "xmp_l.png": (gray, {"pnginfo": xmp_chunk(xmp)})}
    for name, (img, options) in images.items():
        img.save(folder / name, **options)
    return sorted(folder / name for name in images)


def xmp_chunk(xmp: str) -> object:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    return info


def test_prediction_loader_bytes_equal_the_plain_decode_and_rgb_path(tmp_path: Path) -> None:
    """The loader's shortcuts (EXIF parse skipped where no orientation can be, one decode for every
    channel count, gray images resized as L then repeated, tobytes instead of np.asarray) give the
    bytes of the plain path: open, exif_transpose always, to_mode, the array of the converted image."""
    from PIL import ImageOps

    from utils.core.schema import PreprocessSpec
    from utils.data.decode import to_mode
    from utils.data.transforms_np import image_transform
    from utils.infer.ensemble import InputPlan
    from utils.infer.loader import prediction_loader

    files = odd_mode_files(tmp_path)
    specs = [PreprocessSpec.create(16, 3, [0.5] * 3, [0.2] * 3), PreprocessSpec.create(12, 1, [0.5], [0.2], "squash", "bicubic"),
             PreprocessSpec.create(10, 3, [0.5] * 3, [0.2] * 3, "letterbox", "nearest")]
    plan, view = InputPlan(specs, tta=False), image_transform(PreprocessSpec.create(8, 3, [0.5] * 3, [0.2] * 3, "squash"))
    (batch,) = prediction_loader(files, plan, batch_size=len(files), workers=0, view=view)
    assert batch["failed"] == [] and batch["indices"] == list(range(len(files)))
    for k, path in enumerate(files):
        with Image.open(path) as img:
            img.load()
            plain = ImageOps.exif_transpose(img)
        for g, spec in enumerate(specs):
            converted = to_mode(plain, spec.channels)  # RGB for a 3-channel model, whatever the file
            assert np.array_equal(batch["inputs"][g][k], image_transform(spec)(converted)), (path.name, g)
            if spec.resize_mode == "squash":  # no crop or padding: the resized image, through np.asarray
                resized = np.asarray(converted.resize((spec.crop, spec.crop), Image.BICUBIC))
                assert np.array_equal(batch["inputs"][g][k], resized[None]), path.name
        assert np.array_equal(batch["views"][k], view(to_mode(plain, 3))), path.name
    tta = InputPlan(specs[:2], tta=True)  # TenCrop: (10, C, H, W) slots, a gray image broadcast into each crop
    (crops,) = prediction_loader(files, tta, batch_size=len(files), workers=0)
    for k, path in enumerate(files):
        with Image.open(path) as img:
            img.load()
            plain = ImageOps.exif_transpose(img)
        for g, spec in enumerate(specs[:2]):
            expected = image_transform(spec, tta=True)(to_mode(plain, spec.channels))
            assert expected.shape == (10, spec.channels, spec.crop, spec.crop)
            assert np.array_equal(crops["inputs"][g][k], expected), (path.name, g)
    gray = Image.open(tmp_path / "l.png").convert("L")
    for spec in (specs[0], specs[2]):  # an L image given to a 3-channel transform: the bytes of its RGB conversion
        for crop10 in (False, True):
            assert np.array_equal(image_transform(spec, crop10)(gray), image_transform(spec, crop10)(gray.convert("RGB")))
    with Image.open(tmp_path / "xmp_l.png") as img:
        assert img.size == (22, 13)
    assert load_image(tmp_path / "xmp_l.png").size == (13, 22)  # the XMP orientation is applied too


def test_truncated_jpeg_passes_the_header_check_but_fails_to_load(tmp_path: Path) -> None:
    path = make_truncated_jpeg(tmp_path / "cut.jpg")
    assert check_image_header(path) is None  # the header is fine, so scanning keeps it ...
    with pytest.raises(OSError):
        load_image(path)  # ... and decoding reports it
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    ds = ImageDataset([(str(good), 0), (str(path), 1)], lambda img: torch.zeros(3, 4, 4, dtype=torch.uint8))
    batch = collate([ds[0], ds[1]])
    assert batch["images"].shape == (1, 3, 4, 4) and batch["targets"].tolist() == [0]  # left out
    assert batch["failed"][0][0] == str(path) and "truncated" in batch["failed"][0][1]


def test_header_check_reasons(tmp_path: Path) -> None:
    junk = add_junk_files(tmp_path)
    assert "empty" in check_image_header(tmp_path / "empty.png")
    assert "not an image" in check_image_header(tmp_path / "garbage.jpg")
    assert check_image_header(tmp_path / ".hidden.png") is None  # a real image: skipped for its name only
    assert set(junk) == {".hidden.png", "notes.txt", "empty.png", "garbage.jpg"}


# ----------------------------------------------------------------------------- class order
def test_natural_sort_of_class_names() -> None:
    assert sorted(NAMED, key=natural_key) == NAMED_ORDER
    assert sorted(["img10.png", "img2.png", "img1.png"], key=natural_key) == ["img1.png", "img2.png", "img10.png"]


def test_numbered_folders_take_names_from_label_file(tmp_path: Path) -> None:
    label = tmp_path / "label.txt"
    label.write_text("apple\nbanana\ncherry\n")
    names, index = resolve_class_names(["0", "1", "2"], label)
    assert names == ["apple", "banana", "cherry"] and index == {"0": 0, "1": 1, "2": 2}
    names, index = resolve_class_names(["0", "1", "2"], tmp_path / "missing.txt")
    assert names == ["0", "1", "2"]


def test_scan_split_skips_and_reports(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "train", {"x": 2, "y": 2})
    junk = add_junk_files(root / "x")
    (root / "stray.png").write_bytes((root / "x" / "img0.png").read_bytes())
    found = scan_split(root)
    assert found.class_names == ["x", "y"] and len(found.samples) == 4
    reasons = dict(found.skipped)
    for name in junk:
        assert str(root / "x" / name) in reasons
    assert "outside the class folders" in reasons[str(root / "stray.png")]
    (root / "z").mkdir()
    with pytest.raises(UserError, match="z"):
        scan_split(root)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two runs: class folders with any names plus junk and a truncated JPEG in train; and
    pytorch-classifier's numbered folders with a label.txt."""
    root = tmp_path_factory.mktemp("data_rules")
    named = make_split_dataset(root / "named", NAMED, train=4, val=1, test=0)
    junk = add_junk_files(named / "train" / "cat")
    truncated = make_truncated_jpeg(named / "train" / "dog" / "cut.jpg")

    numbered = make_split_dataset(root / "numbered", ["0", "1", "2"], train=4, val=1, test=1)
    label = root / "numbered" / "label.txt"
    label.write_text("apple\nbanana\ncherry\n")

    # batch 6: 21 train images leave a last batch of 3, so no batch is dropped and every image is decoded
    named_proc, numbered_proc = run_many([
        {"script": "main.py", "args": train_args(named, root / "runs" / "named", "--batch_size", "6")},
        {"script": "main.py", "args": train_args(numbered, root / "runs" / "numbered", "--batch_size", "4")},
    ])
    return {"root": root, "named": named, "junk": junk, "truncated": truncated,
            "named_proc": named_proc, "numbered_proc": numbered_proc}


def test_any_class_names_in_natural_order(data_runs: dict) -> None:
    assert_ok(data_runs["named_proc"])
    run = data_runs["root"] / "runs" / "named"
    assert (run / "label.txt").read_text(encoding="utf-8").splitlines() == NAMED_ORDER
    assert load_ckpt(run / "best.pt")["class_names"] == NAMED_ORDER


def test_junk_in_train_is_skipped_and_reported(data_runs: dict) -> None:
    proc = data_runs["named_proc"]
    assert_ok(proc)
    cat = data_runs["named"] / "train" / "cat"
    for name, reason in data_runs["junk"].items():
        lines = [ln for ln in proc.stderr.splitlines() if str(cat / name) in ln]
        assert lines, f"{name} not reported:\n{proc.stderr}"
        assert reason in lines[0]
    # the truncated JPEG gets past the header scan and is reported when it fails to decode
    lines = [ln for ln in proc.stderr.splitlines() if str(data_runs["truncated"]) in ln]
    assert lines and "truncated" in lines[0], proc.stderr
    assert "on cpu (21 train images" in proc.stdout  # 5 x 4 + the truncated one


def test_numbered_folders_with_label_file(data_runs: dict) -> None:
    assert_ok(data_runs["numbered_proc"])
    run = data_runs["root"] / "runs" / "numbered"
    assert (run / "label.txt").read_text().splitlines() == ["apple", "banana", "cherry"]
    best = load_ckpt(run / "best.pt")
    assert best["class_names"] == ["apple", "banana", "cherry"]
    assert "test (3 images, best.pt)" in data_runs["numbered_proc"].stdout  # numbered test folders map too


def test_batch_left_with_one_image_by_failed_decodes_is_skipped() -> None:
    """A batch-norm model cannot train on one image: such a remnant is left out, not a crash."""
    from utils.data.transforms import Normalize
    from utils.evaluate.metrics import EpochSums
    from utils.models.registry import create_model
    from utils.train.engine import StepParts, train_one_epoch
    from utils.train.losses import CrossEntropyLoss, Supervised

    torch.manual_seed(0)
    model = create_model("resnet10t", num_classes=3)
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    loader = [
        {"images": images[:2], "targets": torch.tensor([0, 1]), "paths": ["a.png", "b.png"], "failed": []},
        {"images": images[2:], "targets": torch.tensor([2]), "paths": ["c.png"], "failed": [("d.jpg", "OSError: truncated")]},
    ]
    sums, failed = EpochSums(3), []
    parts = StepParts(Supervised(CrossEntropyLoss()), torch.optim.SGD(model.parameters(), lr=0.01))
    out = train_one_epoch(model, parts, loader, torch.device("cpu"), 0, Normalize([0.5] * 3, [0.25] * 3), sums, failed=failed)
    assert sums.count == 2 and out["steps"] == 2
    assert failed == [("d.jpg", "OSError: truncated")]
