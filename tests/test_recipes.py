"""Training recipes: augmentation, mixup/cutmix, EMA, R-Drop, accumulate, freeze, distillation (SWA and
the recipes' values: test_train_effects, test_recipe_values)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (assert_ok, assert_user_error, load_ckpt, make_split_dataset, run_inprocess, run_many, run_script,
                      train_args)
from utils.core.log import UserError
from utils.core.schema import PreprocessSpec
from utils.data.augment import POLICIES, BatchMix, CutOut, build_custom_augment, train_augment
from utils.data.transforms import eval_transform, train_transform, tta_transform
from utils.models.features import feature_taps
from utils.models.registry import create_model
from utils.train.distill import KD_METHODS, Distiller
from utils.train.losses import LOSSES, build_loss

STEPLR = "lr_scheduler: StepLR\nlr_scheduler_params: {step_size: 1, gamma: 0.8}\nplot_train_batch_count: 1\n"
TEACHER_MODEL = "test_resnet"  # a different architecture from the students (resnet10t)


def photo(size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


# ------------------------------------------------------------------------- in-process units
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_each_policy_gives_the_model_input_shape(policy: str, mode: str) -> None:
    augment, note = train_augment(policy, [])
    assert policy in note
    out = train_transform(32, "crop", augment)(photo(mode=mode))
    assert out.shape == (3 if mode == "RGB" else 1, 32, 32) and out.dtype == torch.uint8


def test_custom_augment_mixes_torchvision_albumentations_and_cutout() -> None:
    entries = [{"name": "RandomHorizontalFlip", "params": {"p": 1.0}},
               {"name": "RandomGridShuffle", "params": {"grid": [2, 2], "p": 1.0}},
               {"name": "CutOut", "params": {"n_holes": 2, "length": 8}}]
    augment, note = train_augment("AutoAugment", entries)
    assert "custom_augment" in note and "AutoAugment" not in note  # the list replaces --Augment
    assert [type(t).__name__ for t in augment] == ["RandomHorizontalFlip", "Albumentation", "CutOut"]
    for mode, channels in (("RGB", 3), ("L", 1)):
        out = train_transform(32, "letterbox", augment)(photo(mode=mode))
        assert out.shape == (channels, 32, 32) and out.dtype == torch.uint8


def test_cutout_erases_squares() -> None:
    img = Image.new("RGB", (32, 32), (200, 200, 200))
    torch.manual_seed(0)
    out = np.array(CutOut(n_holes=1, length=8)(img))
    assert (out == 0).all(axis=2).sum() > 0 and (out == 200).all(axis=2).sum() > 32 * 32 - 8 * 8 - 1


@pytest.mark.parametrize("entry, needle", [
    ({"name": "NoSuchTransform"}, "unknown transform 'NoSuchTransform'"),
    ({"name": "RandomRotation", "params": {"degreez": 20}}, "RandomRotation"),
    ({"name": "CutOut", "params": {"length": -1}}, "CutOut"),
])
def test_custom_augment_errors_name_the_entry(entry: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        build_custom_augment([entry])


def test_resize_modes_and_tta_shapes() -> None:
    img = photo((60, 20))
    for mode in ("crop", "letterbox", "squash"):
        spec = PreprocessSpec.create(32, 3, [0.5] * 3, [0.5] * 3, mode)
        assert eval_transform(spec)(img).shape == (3, 32, 32)
        assert tta_transform(spec)(img).shape == (10, 3, 32, 32)
    letterboxed = eval_transform(PreprocessSpec.create(32, 3, [0.5] * 3, [0.5] * 3, "letterbox"))(img)
    assert (letterboxed[:, 0, :] == 114).all()  # the short side is padded, nothing cut


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_mixed_targets_sum_to_one_and_every_loss_is_finite(mode: str, loss_name: str) -> None:
    np.random.seed(0)
    torch.manual_seed(0)
    mix = BatchMix(mode, num_classes=4)
    images, targets = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, soft = mix(images.clone(), targets)
    assert soft.shape == (8, 4)
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert not torch.equal(mixed, images)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    loss = build_loss(loss_name, label_smoothing=0.1, weight=weight)(torch.randn(8, 4), soft)
    assert torch.isfinite(loss) and loss > 0


def test_odd_batch_is_left_unmixed() -> None:
    images, targets = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    mixed, soft = BatchMix("mixup", 3)(images.clone(), targets)
    assert torch.equal(mixed, images) and torch.equal(soft.argmax(1), targets)


def test_feature_taps_timm_and_torchvision() -> None:
    assert feature_taps(create_model("resnet10t", 3)) == {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}
    taps = feature_taps(create_model("shufflenet_v2_x0_5", 3))
    assert taps[8] == "stage2" and taps[16] == "stage3" and set(taps) == {4, 8, 16, 32}


@pytest.mark.parametrize("method", ["AT", "SP", "MGD"])
def test_distiller_step_leaves_the_teacher_unchanged(method: str) -> None:
    torch.manual_seed(0)
    student, teacher = create_model("resnet10t", 3), create_model("test_resnet", 3).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    norm = ([0.5] * 3, [0.25] * 3)
    kd = Distiller(build_loss("CrossEntropyLoss"), student, teacher, method, 0.7, 3, norm, norm)
    params = list(student.parameters()) + list(kd.method.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    loss, logits, parts = kd(student, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(loss) and parts["kd_loss"] > 0 and logits.shape == (4, 3)
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_methods_refuse_a_model_without_feature_maps() -> None:
    norm = ([0.5] * 3, [0.25] * 3)
    vit = create_model("test_vit", 3)
    with pytest.raises(UserError, match="SoftTarget"):
        Distiller(build_loss("CrossEntropyLoss"), vit, create_model("resnet10t", 3), "AT", 0.7, 3, norm, norm)


# ---------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    (root / "steplr.yaml").write_text(STEPLR)
    return root


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, recipe_root: Path) -> Path:
    save = recipe_root / "teacher"
    assert_ok(run_script("main.py", *train_args(tiny_data, save, "--epoch", "2", model=TEACHER_MODEL)))
    return save


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_kd_method_trains_from_a_teacher_of_another_architecture(tiny_data: Path, recipe_root: Path, teacher: Path) -> None:
    before = sha(teacher / "best.pt")
    jobs = [{"script": "main.py", "args": train_args(tiny_data, recipe_root / f"kd_{m}", "--kd", "--teacher_path", teacher,
                                                     "--kd_method", m)} for m in KD_METHODS]
    for method, proc in zip(KD_METHODS, run_many(jobs)):
        assert_ok(proc)
        assert f"distillation: {method} from {TEACHER_MODEL}" in proc.stdout
        header, row = (recipe_root / f"kd_{method}" / "train.log").read_text().splitlines()[:2]
        assert header.endswith(",kd_loss")
        assert float(row.split(",")[-1]) > 0, row
    assert sha(teacher / "best.pt") == before
    mgd = load_ckpt(recipe_root / "kd_MGD" / "last.pt")
    assert mgd["train_state"]["distill"] and any(k.startswith("generate") for k in mgd["train_state"]["distill"])


def test_kd_refuses_bad_combinations_at_start(tiny_data: Path, recipe_root: Path, teacher: Path) -> None:
    other = make_split_dataset(recipe_root / "other_classes", ["cat", "dog"], train=2, val=1, test=0)
    procs = [run_inprocess("main.py", *args) for args in (  # start-up errors: in this process
        train_args(tiny_data, recipe_root / "bad1", "--kd", "--teacher_path", teacher, "--rdrop"),
        train_args(other, recipe_root / "bad2", "--kd", "--teacher_path", teacher),
        train_args(tiny_data, recipe_root / "bad3", "--kd"),
        train_args(tiny_data, recipe_root / "bad4", "--swa", "--ema"),
    )]
    assert_user_error(procs[0], "--rdrop")
    assert_user_error(procs[1], "same classes")
    assert_user_error(procs[2], "--teacher_path")
    assert_user_error(procs[3], "--swa", "--ema")


def test_recipes_each_run_one_epoch(tiny_data: Path, recipe_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "aug.yaml"
    config.write_text("custom_augment:\n  - {name: RandomHorizontalFlip, params: {p: 0.5}}\n"
                      "  - {name: RandomGridShuffle, params: {grid: [2, 2]}}\n  - {name: CutOut, params: {n_holes: 1, length: 8}}\n")
    # SWA (averaging, batch-norm recompute, promotion to best.pt) and R-Drop on a model with dropout
    # are checked by value in test_train_effects; here the plumbing of the other recipes
    runs = {
        "ema": ["--ema", "--Augment", "TrivialAugmentWide", "--mixup", "cutmix", "--resize_mode", "letterbox"],
        "rdrop": ["--rdrop", "--accumulate", "2", "--clip_grad", "1.0", "--test_tta", "--config", config],
    }
    procs = run_many([{"script": "main.py", "args": train_args(tiny_data, recipe_root / name, *extra)} for name, extra in runs.items()])
    for proc in procs:
        assert_ok(proc)
    assert "augmentation: custom_augment" in procs[1].stdout
    assert "RandomGridShuffle" in procs[1].stdout and "CutOut" in procs[1].stdout

    last, best = load_ckpt(recipe_root / "ema" / "last.pt"), load_ckpt(recipe_root / "ema" / "best.pt")
    raw, ema = last["model"], last["train_state"]["ema"]["model"]
    floats = [k for k, v in raw.items() if v.is_floating_point()]
    assert any(not torch.equal(raw[k], ema[k]) for k in floats), "EMA weights equal the raw weights"
    assert best["weights"] == "ema" and best["epoch"] == 1
    assert all(torch.equal(best["model"][k], ema[k].half()) for k in floats), "best.pt does not hold the EMA weights"
    assert best["preprocess"]["resize_mode"] == "letterbox"


def test_freeze_changes_only_the_head(tiny_data: Path, recipe_root: Path, trained_run) -> None:
    start = trained_run.path / "best.pt"
    save = recipe_root / "frozen"
    proc = run_script("main.py", *train_args(tiny_data, save, "--weight", start, "--freeze", "1", "--lr", "0.05"))
    assert_ok(proc)
    assert "head only" in proc.stdout
    before, after = load_ckpt(start)["model"], load_ckpt(save / "last.pt")["model"]
    head = {"fc.weight", "fc.bias"}
    for key, value in after.items():
        if key in head:
            assert not torch.equal(value.half(), before[key]), f"head tensor {key} did not train"
        elif key.endswith("num_batches_tracked"):
            continue
        else:
            assert torch.equal(value.half(), before[key]), f"frozen tensor {key} changed"


@pytest.mark.parametrize("recipe", [["--ema"], ["--kd", "--kd_method", "MGD"]], ids=["ema", "mgd"])
def test_resume_with_recipe_is_exact(recipe: list[str], tiny_data: Path, recipe_root: Path, teacher: Path) -> None:
    name = recipe[-1].lower().strip("-")
    extra = [*recipe, "--config", recipe_root / "steplr.yaml", "--val_path", "none"]
    if "--kd" in recipe:
        extra += ["--teacher_path", teacher]
    full, part = recipe_root / f"full_{name}", recipe_root / f"part_{name}"
    procs = run_many([{"script": "main.py", "args": train_args(tiny_data, full, *extra, "--epoch", "3", "--batch_size", "4")},
                      {"script": "main.py", "args": train_args(tiny_data, part, *extra, "--epoch", "1", "--batch_size", "4")}])
    for proc in procs:
        assert_ok(proc)
    assert_ok(run_script("main.py", "--save_path", part, "--resume", "--epoch", "3"))
    a, b = load_ckpt(full / "last.pt"), load_ckpt(part / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    a, b = a["train_state"], b["train_state"]
    if "--ema" in recipe:
        assert a["ema"]["updates"] == b["ema"]["updates"] > 0
        for key in a["ema"]["model"]:
            assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    else:
        for key in a["distill"]:
            assert torch.equal(a["distill"][key], b["distill"][key]), key
