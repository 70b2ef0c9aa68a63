"""predict.py --feature_maps: a grid per image of the strongest channels at each stage.

Checkpoints of untrained models are written directly (no training needed to look inside a
network): resnet10t (timm CNN), shufflenet_v2_x0_5 (torchvision CNN, with --test_tta) and
test_vit (timm transformer at 160 px). The stages and channels each grid names (its PNG text
chunk) and the pixels of its strongest tile are checked against forward hooks set here on the
model rebuilt from the checkpoint. The probe both --feature_maps and the CAMs find their layers
with (utils.explain.probe) is checked on a tiny model whose every output is known.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_ok, run_inprocess
from utils.core.log import UserError

K = 3
FILES = ["a.png", "b.png", "sub/c.jpg"]
MODELS = {  # name: (input size, TTA, {stage label: module name})
    "resnet10t": (32, False, {"stride 4": "layer1", "stride 8": "layer2", "stride 16": "layer3", "stride 32": "layer4"}),
    "shufflenet_v2_x0_5": (32, True, {"stride 4": "maxpool", "stride 8": "stage2", "stride 16": "stage3", "stride 32": "conv5"}),
    "test_vit": (160, False, {"block 1/6": "blocks.0", "block 3/6": "blocks.2", "block 4/6": "blocks.3", "block 6/6": "blocks.5"}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fm_images")
    rng = np.random.default_rng(3)
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def write_checkpoint(folder: Path, name: str, size: int) -> Path:
    """folder/best.pt: an untrained `name` at `size` px, 3 classes."""
    from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
    from utils.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, 3).eval()
    meta = ModelMeta(name, ("a", "b", "c"), PreprocessSpec.create(size, 3, [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]))
    folder.mkdir(parents=True)
    torch.save(Checkpoint("best", meta, {k: v.clone() for k, v in model.state_dict().items()}).to_dict(), folder / "best.pt")
    return folder


def reference_stages(run: Path, path: Path, modules: dict[str, str], tta: bool) -> dict[str, torch.Tensor]:
    """{module: its (C, H, W) map} for one image, by hooks set here (tokens: the class token dropped, the
    patch tokens in row-major order on their square grid)."""
    from utils.core.checkpoint import load_checkpoint
    from utils.data.decode import load_image
    from utils.data.transforms import Normalize, image_transform
    from utils.models.weights import model_from_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(ckpt).eval()
    spec = ckpt.meta.preprocess
    view = image_transform(spec, tta)(load_image(path, 3))
    view = view[4] if tta else view  # TenCrop's centre crop
    seen: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    hooks = [named[m].register_forward_hook(lambda mod, i, out, m=m: seen.__setitem__(m, out[0])) for m in modules.values()]
    with torch.no_grad():
        model(Normalize(spec.mean, spec.std)(view[None]))
    for hook in hooks:
        hook.remove()
    side = {m: math.isqrt(out.shape[0] - 1) for m, out in seen.items()}
    return {m: (out[1:].reshape(side[m], side[m], -1).permute(2, 0, 1) if out.ndim == 2 else out) for m, out in seen.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_grid_per_image_with_the_strongest_channels_of_each_stage(name: str, images: Path, tmp_path: Path) -> None:
    from utils.explain.cam import heatmap_colors
    from utils.explain.feature_maps import LEFT, PNG_KEY, TILE, stage_row_top

    size, tta, stages = MODELS[name]
    run = write_checkpoint(tmp_path / name, name, size)
    proc = run_inprocess("predict.py", "--source", images, "--save_path", run, "--feature_maps", K, "--device", "cpu",
                         "--workers", "0", *(["--test_tta"] if tta else []))
    assert_ok(proc)
    out = next((run / "predict").glob("exp*"))
    assert sorted(p.relative_to(out / "feature_maps").as_posix() for p in (out / "feature_maps").rglob("*.png")) == \
        sorted(f if f.endswith(".png") else f + ".png" for f in FILES)
    for rel in FILES:
        grid = Image.open(out / "feature_maps" / (rel if rel.endswith(".png") else rel + ".png"))
        info = json.loads(grid.text[PNG_KEY])
        assert {s["stage"]: s["module"] for s in info} == stages and [s["stage"] for s in info] == list(stages)
        reference = reference_stages(run, images / rel, stages, tta)
        for row, stage in enumerate(info):
            fmap = reference[stage["module"]]
            means = fmap.flatten(1).mean(1)
            strongest = torch.argsort(means, descending=True, stable=True)[:K].tolist()
            assert stage["channels"] == strongest, (rel, stage["stage"])
            assert stage["means"] == pytest.approx(means[strongest].tolist(), abs=1e-4)
            picked = fmap[strongest]  # the strongest channel's tile, drawn on its stage's colour scale
            scaled = ((picked[0] - picked.min()) / (picked.max() - picked.min())).numpy()
            tile = np.asarray(Image.fromarray(heatmap_colors(scaled)).resize((TILE, TILE), Image.NEAREST), dtype=float)
            top = stage_row_top(row)
            drawn = np.asarray(grid.convert("RGB"), dtype=float)[top:top + TILE, LEFT:LEFT + TILE]
            assert np.abs(drawn - tile).mean() < 2.0, (rel, stage["stage"])
        if name == "test_vit":
            assert [s["map"] for s in info] == [[10, 10]] * 4  # 100 patch tokens of 16 px, class token dropped
    assert "feature maps: " in proc.stdout and "feature_maps/" in proc.stdout
    shutil.rmtree(run / "predict")


def test_channels_last_stages_and_a_model_without_stages() -> None:
    from timm.models.swin_transformer import SwinTransformer

    from utils.data.transforms import Normalize
    from utils.explain.feature_maps import find_stages, stage_maps

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                           num_classes=3).eval()
    stages = find_stages(swin, 32)
    assert [(s.label, s.name, s.layout) for s in stages] == [("stride 4", "layers.0", "NHWC"), ("stride 8", "layers.1", "NHWC")]
    backend = SimpleNamespace(model=swin, normalize=Normalize([0.5] * 3, [0.25] * 3), device=torch.device("cpu"), half=False)
    maps = stage_maps(backend, stages, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4)]  # channels first
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(UserError, match="found no feature stages"):
        find_stages(flat, 8)


class _Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, -x


class _Tiny(torch.nn.Module):
    """conv -> relu -> a block (1x1 conv, batch norm) -> the same relu again -> a module returning a tuple -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = torch.nn.ReLU()
        self.block = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 1), torch.nn.BatchNorm2d(6))
        self.pair = _Pair()
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.block(self.act(self.conv(x))))
        return self.head(self.pair(x)[0].mean((2, 3)))


def test_probe_records_each_module_output_in_finishing_order() -> None:
    from utils.explain.probe import probe, zero_input

    torch.manual_seed(0)
    model = _Tiny().eval().double()
    x = zero_input(model, 8, 3)
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.float64 and not x.any()
    records, out = probe(model, lambda: model(x))
    assert [(r.name, r.shape) for r in records] == [
        ("conv", (1, 4, 4, 4)), ("act", (1, 4, 4, 4)),  # a module run twice is recorded twice
        ("block.0", (1, 6, 4, 4)), ("block.1", (1, 6, 4, 4)), ("block", (1, 6, 4, 4)),  # a container after its children
        ("act", (1, 6, 4, 4)), ("head", (1, 2))]  # the tuple of pair and the model itself: not recorded
    assert [r.module for r in records] == [model.conv, model.act, model.block[0], model.block[1], model.block, model.act,
                                           model.head]
    assert records[-1].output is out and torch.equal(out, model(x)) and not out.requires_grad  # no graph kept
    assert all(not m._forward_hooks for m in model.modules())  # every hook removed
    with pytest.raises(RuntimeError):
        probe(model, lambda: model(torch.zeros(1, 5, 8, 8, dtype=torch.float64)))
    assert all(not m._forward_hooks for m in model.modules())  # also after a failed pass


def test_feature_maps_refusals(images: Path, tmp_path: Path) -> Any:
    from conftest import assert_user_error

    common = ("--source", images, "--device", "cpu", "--workers", "0", "--feature_maps")
    assert_user_error(run_inprocess("predict.py", *common, "--save_path", tmp_path, "--model_type", "onnx"),
                      "--feature_maps", "--model_type torch")
    assert_user_error(run_inprocess("predict.py", *common, "--save_path", tmp_path / "a", tmp_path / "b"),
                      "--feature_maps", "one --save_path")
