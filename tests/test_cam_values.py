"""Grad-CAM maps checked by where they point, not only by their range.

A synthetic task whose class is decided by a coloured patch at a random, known place (red patch:
class 0, blue patch: class 1, on grey noise). A small CNN (16x16 maps at its last stage) learns it
in about a second; then every CAM type must put its peak and its mass in the patch. Maps are
checked raw, before cam_maps cleans them up for drawing (NaN -> 0, clipped to [0, 1]), and a
degenerate map (NaN, or constant) must be reported rather than drawn as a blank heatmap.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from utils.explain.cam import CAM_TYPES, DegenerateCAMError, cam_maps, degenerate_reason, find_cam_layer, orient_projection

SIZE, PATCH, MARGIN = 32, 8, 2
COLOURS = [(200, 40, 40), (40, 40, 200)]  # class 0: red patch, class 1: blue patch
# Gradient-weighted maps change sign with the class; ScoreCAM and AblationCAM weight channels by
# (ratios of) scores, which with two classes give nearly the same map; EigenCAM ignores the class.
GRADIENT_WEIGHTED = ("GradCAM", "HiResCAM", "GradCAMPlusPlus", "XGradCAM")


def patch_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n normalised images, their classes, and the (row, col) of each patch's top-left corner."""
    rng = np.random.default_rng(seed)
    pixels = 128 + rng.normal(0, 20, (n, SIZE, SIZE, 3))
    labels = rng.integers(0, 2, n)
    corners = rng.integers(MARGIN, SIZE - PATCH - MARGIN, (n, 2))
    for i, (r, c) in enumerate(corners):
        pixels[i, r:r + PATCH, c:c + PATCH] = COLOURS[labels[i]]
    x = torch.tensor((np.clip(pixels, 0, 255) - 128) / 64, dtype=torch.float32).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), corners


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32, 2), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))


def patch_mask(corner: np.ndarray, grow: int = 0) -> np.ndarray:
    r, c = corner
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[max(0, r - grow):r + PATCH + grow, max(0, c - grow):c + PATCH + grow] = True
    return mask


@pytest.fixture(scope="module")
def patch_task() -> dict:
    torch.manual_seed(0)
    model = small_cnn()
    x, y, _ = patch_images(256, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    images, labels, corners = patch_images(24, seed=1)
    with torch.no_grad():
        pred = model(images).argmax(dim=1)
    return {"model": model, "images": images, "labels": labels, "corners": corners, "pred": pred,
            "layer": find_cam_layer(model, SIZE, 3)}


def test_the_patch_task_is_learned(patch_task: dict) -> None:
    assert torch.equal(patch_task["pred"], patch_task["labels"])  # otherwise "the class's evidence" is undefined
    layer = patch_task["layer"]
    assert layer.layout == "NCHW" and layer.shape[1:] == (32, 16, 16)


@pytest.mark.parametrize("cam_type", CAM_TYPES)
def test_each_cam_type_points_at_the_patch(patch_task: dict, cam_type: str) -> None:
    maps = cam_maps(patch_task["model"], patch_task["images"], patch_task["layer"], cam_type,
                    patch_task["pred"].tolist(), batch_size=64, on_degenerate="raise", raw=True)
    assert maps.shape == (24, SIZE, SIZE)
    # raw maps, before any clean-up: finite and varying
    assert np.isfinite(maps).all()
    assert all(m.max() - m.min() > 0.5 for m in maps)
    hits, ratios = [], []
    for cam, corner in zip(maps, patch_task["corners"]):
        peak = np.unravel_index(int(cam.argmax()), cam.shape)
        hits.append(bool(patch_mask(corner, grow=MARGIN)[peak]))  # upsampling from 16x16 blurs edges
        inside = patch_mask(corner)
        ratios.append(cam[inside].mean() / max(1e-9, cam[~inside].mean()))
    ratios = np.array(ratios)
    if cam_type == "FullGrad":
        # FullGrad adds the bias gradients of every layer, down to the input's resolution, where the
        # noise has edges too: its peak wanders, its mass does not
        assert np.mean(ratios > 1.0) >= 0.9 and ratios.mean() > 1.5, f"mean inside / outside: {np.round(ratios, 2)}"
        return
    assert np.mean(hits) >= 0.75, f"peak in the patch for {np.mean(hits):.0%} of images"
    assert np.mean(ratios > 1.5) >= 0.9, f"mean inside / outside: {np.round(ratios, 2)}"


@pytest.mark.parametrize("cam_type", GRADIENT_WEIGHTED)
def test_another_class_gives_another_map(patch_task: dict, cam_type: str) -> None:
    model, images, layer = patch_task["model"], patch_task["images"], patch_task["layer"]
    pred = patch_task["pred"].tolist()
    own = cam_maps(model, images, layer, cam_type, pred, batch_size=64, on_degenerate="ignore")
    other = cam_maps(model, images, layer, cam_type, [1 - c for c in pred], batch_size=64, on_degenerate="ignore")
    diff = np.abs(own - other).mean(axis=(1, 2))
    assert (diff > 0.05).all(), diff
    # the patch is evidence for the predicted class, not for the other one
    inside = [own[i][patch_mask(c)].mean() - other[i][patch_mask(c)].mean() for i, c in enumerate(patch_task["corners"])]
    assert np.mean(np.array(inside) > 0) >= 0.9, np.round(inside, 2)


def test_degenerate_maps_are_reported_not_hidden(patch_task: dict, caplog: pytest.LogCaptureFixture) -> None:
    images = patch_task["images"][:3]
    flat = small_cnn().eval()
    with torch.no_grad():
        for m in flat.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()  # every activation is 0: no map can vary
    with pytest.raises(DegenerateCAMError) as err:
        cam_maps(flat, images, None, "GradCAM", [0, 0, 1], on_degenerate="raise")
    assert sorted(err.value.reasons) == [0, 1, 2] and "3 of 3 map(s) degenerate" in str(err.value)
    assert all("all zero" in r for r in err.value.reasons.values())

    broken = small_cnn().eval()
    with torch.no_grad():
        broken[6].weight[0, 0, 0, 0] = float("nan")  # one NaN weight: NaN activations at the CAM layer
    raw = cam_maps(broken, images, None, "GradCAM", [0, 0, 1], raw=True, on_degenerate="ignore")
    assert np.isnan(raw).any()
    with caplog.at_level(logging.WARNING, logger="utils.explain.cam"):
        cleaned = cam_maps(broken, images, None, "GradCAM", [0, 0, 1])  # the default warns ...
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "degenerate" in warnings[0] and "not finite" in warnings[0], warnings
    assert np.isfinite(cleaned).all() and cleaned.min() >= 0 and cleaned.max() <= 1  # ... and still draws safely

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.explain.cam"):
        cam_maps(patch_task["model"], images, patch_task["layer"], "GradCAM", patch_task["pred"][:3].tolist())
    assert not caplog.records, "a good map was reported as degenerate"


def test_degenerate_reason() -> None:
    assert degenerate_reason(np.array([[0.0, 1.0], [0.5, 0.2]])) is None
    assert "NaN" in degenerate_reason(np.array([[np.nan, 1.0], [0.5, 0.2]]))
    assert "infinite" in degenerate_reason(np.array([[np.inf, 1.0], [0.5, 0.2]]))
    assert "all zero" in degenerate_reason(np.zeros((4, 4)))
    assert "constant" in degenerate_reason(np.full((4, 4), 0.3))


def test_eigencam_projection_is_oriented_to_the_salient_region() -> None:
    salient = np.full((2, 4, 4), -0.1, dtype=np.float32)
    salient[:, 1, 1] = 1.0
    salient[1] *= -1  # the same map with the sign an SVD may return
    oriented = orient_projection(salient)
    assert (oriented[:, 1, 1] == 1.0).all() and np.allclose(oriented[0], oriented[1])
