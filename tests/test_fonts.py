"""Figures draw any class name (utils.draw.fonts): 猫 and défaut come out as letters, not as the
missing-glyph box, in matplotlib figures (the confusion matrix) and in Pillow drawings (batch grids,
predict.py's labelled copies, CAM panels); with no CJK font, one warning naming what to install.

The box a font draws for a code point it lacks is the reference: a private-use character (U+E000)
that no font holds is rendered the same way, and a name drawn as boxes would equal it.
"""
from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_ckpt, run_inprocess, assert_ok

from utils.draw import fonts
from utils.draw.figures import plot_confusion_matrix, subplots
from utils.draw.labels import annotate, batch_grid

BOX = "\ue000"  # private use: no font has a glyph for it, so every font draws its missing-glyph box

pytestmark = pytest.mark.system_deps  # the CJK font is a system package (Makefile SYSTEM_DEPS: fonts-wqy-microhei)


@pytest.fixture(scope="module", autouse=True)
def cjk_font() -> str:
    path = fonts.cjk_font_path()
    if path is None:
        pytest.skip("no CJK font on this machine: apt-get install fonts-wqy-microhei (make system-deps)")
    return path


def png_pixels(fig) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60)
    return np.asarray(Image.open(buffer).convert("L"))


def mpl_text(text: str) -> np.ndarray:
    fig, ax = subplots(figsize=(2.5, 1))
    ax.axis("off")
    fig.text(0.05, 0.3, text, fontsize=28)
    return png_pixels(fig)


def glyph_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_matplotlib_draws_cjk_and_accents_as_glyphs() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cat, accented = mpl_text("猫"), mpl_text("défaut")
    assert glyph_warnings(caught) == []
    assert (mpl_text("猫") == cat).all()  # deterministic, so a difference below is the glyph
    assert (cat != mpl_text(BOX)).sum() > 50, "猫 is drawn as the missing-glyph box"
    assert (accented != mpl_text(f"d{BOX}faut")).sum() > 20, "é is drawn as the missing-glyph box"
    # Latin stays in DejaVu Sans; the CJK font only fills in the glyphs it lacks
    assert fonts.configure_matplotlib()[0] == fonts.LATIN_FAMILY and len(fonts.configure_matplotlib()) == 2


def test_confusion_matrix_names_in_cjk_and_latin1() -> None:
    confusion = np.array([[3, 1], [0, 2]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        named = png_pixels(plot_confusion_matrix(confusion, ["猫", "défaut"], title="猫 défaut"))
    assert glyph_warnings(caught) == []
    boxed = png_pixels(plot_confusion_matrix(confusion, [BOX, "défaut"], title=f"{BOX} défaut"))
    assert named.shape == boxed.shape and (named != boxed).sum() > 50


def test_pillow_drawings_use_the_cjk_font(cjk_font: str) -> None:
    assert Path(fonts.pillow_font(14).path) == Path(cjk_font)
    image = Image.new("RGB", (96, 96), (120, 160, 200))
    cat = np.asarray(annotate(image, "猫 (0.97)"))
    assert (cat != np.asarray(annotate(image, f"{BOX} (0.97)"))).sum() > 30
    assert (np.asarray(annotate(image, "défaut")) != np.asarray(annotate(image, f"d{BOX}faut"))).sum() > 10
    pixels = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    grid = np.asarray(batch_grid(pixels, ["猫", "défaut"]))
    assert (grid != np.asarray(batch_grid(pixels, [BOX, "défaut"]))).sum() > 30


def test_cam_panel_writes_cjk() -> None:
    from utils.explain.cam import cam_panel

    view, cam = np.full((3, 16, 16), 90, dtype=np.uint8), np.zeros((16, 16))
    drawn = np.asarray(cam_panel(view, cam, ["猫 (0.90)"], size=64))
    assert (drawn != np.asarray(cam_panel(view, cam, [f"{BOX} (0.90)"], size=64))).sum() > 30


def test_predict_copies_label_cjk_names(trained_run, tmp_path: Path) -> None:
    """predict.py --save_images with a model whose classes are named 猫, 狗, défaut: each copy is the
    image with its 'class (probability)' banner in the CJK font, not boxes."""
    ckpt = load_ckpt(trained_run.path / "best.pt")
    ckpt["class_names"] = ["猫", "狗", "défaut猫"]  # every class needs the CJK font
    torch.save(ckpt, tmp_path / "best.pt")
    source = tmp_path / "img"
    source.mkdir()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(source / "a.png")
    assert_ok(run_inprocess("predict.py", "--weight", tmp_path / "best.pt", "--source", source, "--save_images",
                            "--device", "cpu", "--workers", "0"))
    out = tmp_path / "predict"  # beside the model file
    csv_file = next(out.rglob("predictions.csv"))
    with csv_file.open(encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    text = f"{row['class']} ({float(row['prob']):.2f})" + (" uncertain" if row["uncertain"] == "1" else "")
    copy = np.asarray(Image.open(next(out.rglob("images/a.png"))).convert("RGB"))
    original = Image.open(source / "a.png")
    assert (copy == np.asarray(annotate(original, text))).all()
    boxed = "".join(BOX if fonts.needs_cjk(ch) else ch for ch in text)
    assert (copy != np.asarray(annotate(original, boxed))).sum() > 30


def test_no_cjk_font_warns_once_naming_the_package(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fonts, "cjk_font_path", lambda: None)
    monkeypatch.setattr(fonts, "_warned", False)
    fonts.pillow_font.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fonts.__name__):
            assert fonts.check_glyphs(["défaut", "cat"])  # Latin-1 needs no CJK font: no warning
            assert caplog.records == []
            assert not fonts.check_glyphs(["défaut", "猫"])
            assert not fonts.check_glyphs(["狗"])
            annotate(Image.new("RGB", (64, 64)), "猫")  # still drawn (boxes), no exception
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "\n" not in lines[0]
        assert "猫" in lines[0] and "fonts-noto-cjk" in lines[0] and "fonts-wqy-microhei" in lines[0]
    finally:
        fonts.pillow_font.cache_clear()
