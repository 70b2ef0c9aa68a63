"""What is wrong with a dataset's images: each image inspected once (decoded, measured, fingerprinted),
and the findings of audit.py, one per problem.

    records = inspect_images([(path, split, label), ...], workers=4)   # ImageRecord each, in order
    groups = duplicate_groups([r.fingerprint for r in records])         # utils.data.duplicates
    findings = audit_findings(records, groups, min_size=32, max_aspect=4.0)

The kinds, most serious first (KINDS):
- leak: an exact or near copy of an image in another split (a test image the model trained on).
- conflict: copies that carry different labels. A conflict takes precedence over leak and
  duplicate: a pair with different labels is a conflict whatever the splits, and its detail names
  both splits (two labels for one picture is the problem to fix first; moving one of them does not).
- duplicate: a copy in the same split (training weighs it twice).
- unreadable: the header or the pixels cannot be decoded (a truncated file), with the error.
- tiny: the shorter side under --min_size pixels.
- aspect: the longer side over --max_aspect times the shorter.
- constant: one flat colour (pixel standard deviation under 2 of 255).
- mode_mix: a grayscale image in a mostly colour set, or the reverse (the minority is under a
  quarter of the readable images that are not flat); the detail says what the majority is.
  Grayscale is judged on the pixels (channels equal within a few levels), not on the file's mode:
  an RGB file of a gray picture is grayscale to the model too.

A group of k copies gives k-1 rows, each member paired with the group's first image in scan order
(the train split first), its representative.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from utils.core.log import progress
from utils.data.decode import HeaderError, load_image, read_header
from utils.data.duplicates import Fingerprint, fingerprint, pair_distance, shrink

KINDS = ("leak", "conflict", "duplicate", "unreadable", "tiny", "aspect", "constant", "mode_mix")
GRAY_SPREAD = 3.0     # mean (max - min) of a pixel's channels under which an image is grayscale
MODE_MIX_SHARE = 0.25  # mode_mix flags the minority (grayscale or colour) when it is under this share


@dataclass(frozen=True)
class ImageRecord:
    """One image as the audit saw it.

    Attributes:
        path, split, label: where it is and what it is labelled.
        width, height, mode: from its header (Pillow's mode of the file).
        error: why it cannot be decoded ("" when it can).
        gray: its pixels are grayscale (whatever the file's mode).
        fingerprint: for duplicate search (None when it cannot be decoded).
    """

    path: str
    split: str
    label: str
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str = ""
    gray: bool = False
    fingerprint: Fingerprint | None = None


@dataclass(frozen=True)
class Finding:
    """One problem: an image (path_a), or a pair (path_b is its copy; distance in pHash bits)."""

    kind: str
    path_a: str
    split_a: str
    label_a: str
    path_b: str = ""
    split_b: str = ""
    label_b: str = ""
    distance: int | None = None
    detail: str = ""
    group: int | None = None


def inspect_image(item: tuple[str, str, str]) -> ImageRecord:
    """Decode one image (utils.data.decode) and measure it.

    Args:
        item: (path, split, label).
    """
    path, split, label = item
    try:
        header = read_header(path)
    except HeaderError as err:
        return ImageRecord(path, split, label, error=str(err))
    try:
        img = load_image(path, 3)
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on a corrupt file is a finding, not a crash
        return ImageRecord(path, split, label, header.width, header.height, header.mode,
                           error=f"cannot be decoded ({err or type(err).__name__})")
    work = shrink(img)
    r, g, b = (np.asarray(channel, dtype=np.int16) for channel in work.split())
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # per pixel, faster than axis=-1
    gray = float(spread.mean()) < GRAY_SPREAD
    return ImageRecord(path, split, label, img.width, img.height, header.mode, gray=gray,
                       fingerprint=fingerprint(img, work))


def inspect_images(items: Sequence[tuple[str, str, str]], workers: int = 0) -> list[ImageRecord]:
    """inspect_image of each (path, split, label), in order, in `workers` processes (0: this one)."""
    if workers <= 0 or len(items) < 4 * workers:  # a few images: not worth starting processes
        return [inspect_image(item) for item in progress(items, desc="inspect", unit="img")]
    with multiprocessing.get_context().Pool(workers) as pool:
        chunk = max(8, min(256, len(items) // (workers * 16)))
        return list(progress(pool.imap(inspect_image, items, chunksize=chunk), total=len(items), desc="inspect",
                             unit="img"))


# ---------------------------------------------------------------------------------- findings
def duplicate_findings(records: Sequence[ImageRecord], groups: Sequence[Sequence[int]]) -> list[Finding]:
    """leak, conflict and duplicate rows: each member of a group against its first image."""
    out = []
    for number, group in enumerate(groups, 1):
        rep = records[group[0]]
        for index in group[1:]:
            other = records[index]
            distance = pair_distance(rep.fingerprint, other.fingerprint)
            copy = "identical pixels" if distance == 0 and rep.fingerprint.sha256 == other.fingerprint.sha256 \
                else f"near copy (pHash {distance} bits)"
            if other.label != rep.label:
                kind = "conflict"
                where = f"both in {rep.split}" if other.split == rep.split else f"splits {rep.split} and {other.split}"
                detail = f"labels {rep.label} and {other.label}, {where}; {copy}"
            elif other.split != rep.split:
                kind, detail = "leak", f"{copy} in {rep.split} and {other.split}"
            else:
                kind, detail = "duplicate", f"{copy} within {rep.split}"
            out.append(Finding(kind, rep.path, rep.split, rep.label, other.path, other.split, other.label, distance,
                               detail, number))
    return out


def image_findings(records: Sequence[ImageRecord], min_size: int, max_aspect: float) -> list[Finding]:
    """unreadable, tiny, aspect, constant and mode_mix rows, one per image and kind."""
    out = []
    voters = [r for r in records if r.fingerprint is not None and not r.fingerprint.flat]  # a flat image has no mode
    grays = sum(r.gray for r in voters)
    minority = None
    if 0 < min(grays, len(voters) - grays) < MODE_MIX_SHARE * len(voters):
        minority = grays < len(voters) - grays  # True: the grayscale images are the minority
        majority = f"{len(voters) - grays if minority else grays} of {len(voters)} images are " \
                   f"{'colour' if minority else 'grayscale'}"
    for r in records:
        one = (r.path, r.split, r.label)
        if r.error:
            out.append(Finding("unreadable", *one, detail=r.error))
            continue
        size = f"{r.width}x{r.height} px"
        if min(r.width, r.height) < min_size:
            out.append(Finding("tiny", *one, detail=f"{size}, under --min_size {min_size}"))
        ratio = max(r.width, r.height) / min(r.width, r.height)
        if ratio > max_aspect:
            out.append(Finding("aspect", *one, detail=f"{size}, aspect {ratio:.1f} over --max_aspect {max_aspect:g}"))
        if r.fingerprint is not None and r.fingerprint.flat:
            out.append(Finding("constant", *one, detail=f"one flat colour (pixel std {r.fingerprint.std:.1f})"))
        if minority is not None and r.gray == minority and not r.fingerprint.flat:
            own = f"grayscale (file mode {r.mode})" if r.gray else f"colour (file mode {r.mode})"
            out.append(Finding("mode_mix", *one, detail=f"{own}; {majority}"))
    return out


def audit_findings(records: Sequence[ImageRecord], groups: Sequence[Sequence[int]], min_size: int,
                   max_aspect: float) -> list[Finding]:
    """Every finding, ordered by KINDS, then as the images were scanned.

    Args:
        records: the inspected images (inspect_images).
        groups: groups of copies, indices into records (utils.data.duplicates.duplicate_groups).
        min_size: --min_size.
        max_aspect: --max_aspect.
    """
    found = duplicate_findings(records, groups) + image_findings(records, min_size, max_aspect)
    return sorted(found, key=lambda f: KINDS.index(f.kind))  # stable: scan order within a kind
