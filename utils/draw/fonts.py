"""The font every picture writes its text in: one file that covers CJK and Latin-1, so class names
such as 猫, 狗 or défaut are drawn as letters and not as empty boxes, by matplotlib and Pillow alike.

    path = cjk_font_path()          # e.g. /usr/share/fonts/truetype/wqy/wqy-microhei.ttc, or None
    configure_matplotlib()          # font.family: DejaVu Sans, then the CJK font glyph by glyph
    font = pillow_font(14)          # ImageFont of the same file (utils.draw.labels.load_font)
    check_glyphs(class_names)       # one warning per process when a name needs a font that is missing

Where it is looked for, in order: matplotlib's font list (by family name, most wanted first), the
places Linux, macOS and Windows keep the usual ones, then fontconfig (`fc-list :lang=zh`). matplotlib
keeps Latin text in DejaVu Sans and takes only the glyphs DejaVu lacks from the CJK font (a list of
families, matplotlib >= 3.6); Pillow has no such fallback, so it writes everything in the CJK font
(which holds Latin-1 too). Without one, text is still drawn (DejaVu, Pillow's own font) and a name
that needs CJK glyphs is warned about once, naming what to install.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterable

LOGGER = logging.getLogger(__name__)

# Family names as matplotlib reports them, most wanted first.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
                "Source Han Sans CN", "Source Han Sans", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Microsoft YaHei",
                "PingFang SC", "Hiragino Sans GB", "Heiti SC", "SimHei", "Arial Unicode MS", "Droid Sans Fallback")
# Where those files usually are (Debian/Ubuntu, Fedora/Arch, macOS, Windows).
KNOWN_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/source-han-sans/SourceHanSans-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
)
LATIN_FAMILY = "DejaVu Sans"  # matplotlib's own font: Latin, Greek, Cyrillic ...
INSTALL_HINT = ("install a CJK font: Debian/Ubuntu `apt-get install fonts-noto-cjk` (or the smaller fonts-wqy-microhei), "
                "Fedora `dnf install google-noto-sans-cjk-fonts`; macOS and Windows have one built in")
# Code points that DejaVu lacks and a CJK font holds: CJK radicals to Yi, Hangul, compatibility forms,
# full-width forms, and the supplementary ideographs.
CJK_RANGES = ((0x2E80, 0xA4CF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x20000, 0x3FFFF))

_warned = False


def needs_cjk(text: str) -> bool:
    """Whether `text` holds a character that only a CJK font draws."""
    return any(low <= ord(ch) <= high for ch in text for low, high in CJK_RANGES)


def _from_matplotlib() -> str | None:
    """The most wanted CJK family in matplotlib's font list (its cache), as a file."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib import font_manager

    files = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    return next((files[name] for name in CJK_FAMILIES if name in files and Path(files[name]).is_file()), None)


def _from_fontconfig() -> str | None:
    """A font file fontconfig says covers Chinese (Linux, and macOS with fontconfig)."""
    if shutil.which("fc-list") is None:
        return None
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "--format", "%{file}\n"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    files = sorted(line.strip() for line in out.stdout.splitlines() if line.strip().lower().endswith((".ttf", ".ttc", ".otf")))
    return files[0] if files else None


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """The font file with CJK and Latin-1 glyphs that every picture uses, or None when this machine has none.

    Returns:
        Its path (found once per process).
    """
    found = _from_matplotlib() or next((p for p in KNOWN_PATHS if Path(p).is_file()), None) or _from_fontconfig()
    if found:
        LOGGER.debug("CJK font: %s", found)
    return found


@functools.lru_cache(maxsize=1)
def configure_matplotlib() -> list[str]:
    """Set matplotlib's font.family to DejaVu Sans followed by the CJK font (per-glyph fallback), once
    per process; the file is added to matplotlib's list when its cache did not know it.

    Returns:
        The family list set.
    """
    from matplotlib import font_manager, rcParams

    families = [LATIN_FAMILY]
    path = cjk_font_path()
    if path:
        name = font_manager.FontProperties(fname=path).get_name()
        if name not in {f.name for f in font_manager.fontManager.ttflist}:
            font_manager.fontManager.addfont(path)
        families.append(name)
    rcParams["font.family"] = families
    return families


@functools.lru_cache(maxsize=16)
def pillow_font(size: int) -> Any:
    """A Pillow font of `size` px in the CJK font's file; without one, Pillow's own (Latin-1; the
    bitmap default on builds without FreeType)."""
    from PIL import ImageFont

    path = cjk_font_path()
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError as err:
            LOGGER.warning("%s: cannot be read as a font (%s); text is drawn in Pillow's own", path, err)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def check_glyphs(texts: Iterable[str]) -> bool:
    """Warn once per process, in one line, when a text needs CJK glyphs and no CJK font was found
    (the text is still drawn, with boxes); matplotlib's own per-glyph warnings are then silenced.

    Returns:
        Whether every text can be drawn.
    """
    global _warned
    if cjk_font_path() is not None:
        return True
    missing = next((str(t) for t in texts if needs_cjk(str(t))), None)
    if missing is None:
        return True
    if not _warned:
        _warned = True
        LOGGER.warning("'%s' needs a CJK font and this machine has none, so it is drawn as boxes: %s", missing, INSTALL_HINT)
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
    return False
