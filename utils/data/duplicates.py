"""Exact and near-duplicate images: each image's fingerprint, an index over 64-bit perceptual hashes,
and the groups of copies (union-find).

    prints = [fingerprint(load_image(p)) for p in paths]            # sha256 of the pixels, hashes, colour layout
    groups = duplicate_groups(prints, HASH_DISTANCE)                 # [[0, 7, 9], [3, 4]]: indices of copies
    qi, ci, dist = hamming_pairs(queries, codes, radius=12)          # every pair within 12 bits (no all-pairs scan)

What counts as a copy:
- exact: the same decoded pixels (sha256 of the RGB pixels after EXIF orientation, and the size), so
  a PNG saved again as BMP, or with other metadata, is an exact copy; a JPEG re-encoding is not.
- near: pHash (imagehash's 8x8 DCT hash, 64 bits) within --hash_distance bits, confirmed by two
  checks that cut false matches: dHash (gradients, 64 bits) within --hash_distance + 4 bits, and the
  colour layout (chromaticity of a 3x3 grid: brightness cancels out) within 0.06. pHash and dHash
  see only luminance: two differently coloured images with the same layout match both, and the
  colour check is what tells them apart (grayscale images fall back on the two hashes alone).
  Each image is also hashed with 3.5% and 7% cut off every border, so a copy cropped by up to
  ~9% per border meets one of them nearly unchanged.
  Images of one flat colour have no structure to hash, and in an image under 16 px the 64 bits
  are the whole picture, detail included (distinct 8x8 digits collide): both match only exactly.

Measured on 800 generated images (random shapes over noise and gradients, 64-128 px) and their
copies, threshold 12: found 799/800 JPEG quality 60, 800/800 half size, 796/800 brightened 20%,
800/800 cropped 5% and 7.5% per border, 790-796/800 for two of those combined; no match among
the 319,600 pairs of distinct images (pHash alone: 49; in grayscale, where colour cannot help,
5 with dHash, 49 without). A missed copy is nearly always an image of two flat regions whose
luminance order the change flipped (a clipped bright green).

Why imagehash: a small BSD-licensed package (Pillow, numpy, scipy, PyWavelets) with the standard
perceptual hashes. imagededup offers the same hashes (it wraps the same algorithms) but pulls in
TensorFlow/torch CNN code and heavier dependencies for its CNN mode, which the audit does not use.

The index is multi-index hashing (Norouzi et al.): the 64 bits are cut into m chunks; two codes
within r bits differ by at most r // m bits in one chunk (pigeonhole), so each code's chunk values
with up to r // m bits flipped are looked up in a table per chunk, and only those bucket-mates are
compared (numpy popcount). m is chosen from the counts by a cost model (lookups vs candidates).
A BK-tree (the usual alternative, pure Python) visits nearly the whole tree at radius 12 in 64
bits (26,211 of 30,000 nodes per query on random hashes): on the pHashes of 10,000 generated
images it needed 280 s (1,000 queries, extrapolated) where this whole search took 2.6 s, and
100,000 images take 64 s (benchmarks/audit_speed.py). No package: the index is 40 lines of numpy.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

HASH_DISTANCE = 12        # default --hash_distance: pHash bits (of 64) between near copies
DHASH_MARGIN = 4          # dHash may differ by --hash_distance + this many bits
COLOUR_DISTANCE = 0.06    # largest chromaticity difference of one grid cell and channel
CROP_LEVELS = (0.0, 0.035, 0.07)  # fraction cut off each border before hashing (0: the whole image)
GRID = 3                  # colour layout: GRID x GRID cells
HASH_SIDE = 256           # images are shrunk to this side before hashing (the hashes see 32 px)
FLAT_STD = 2.0            # pixel standard deviation (0-255) under which an image is one flat colour
MIN_HASH_SIDE = 16        # images with a shorter side under this are matched only exactly


@dataclass(frozen=True)
class Fingerprint:
    """What duplicate search knows of one image.

    Attributes:
        sha256: of the size and the decoded RGB pixels (exact copies).
        phash: 64-bit pHash at each of CROP_LEVELS.
        dhash: 64-bit dHash at each of CROP_LEVELS.
        colour: chromaticity of a GRID x GRID grid at each level, (len(CROP_LEVELS), GRID*GRID*3) float32.
        std: pixel standard deviation (0-255) of the image shrunk to HASH_SIDE, of its most varied channel.
        side: the image's shorter side in pixels.
    """

    sha256: str
    phash: tuple[int, ...]
    dhash: tuple[int, ...]
    colour: np.ndarray
    std: float
    side: int

    @property
    def flat(self) -> bool:
        """One flat colour."""
        return self.std < FLAT_STD

    @property
    def searchable(self) -> bool:
        """Worth a near-copy search: not flat (nothing to hash) and not under MIN_HASH_SIDE (a 64-bit
        hash of an 8x8 image is the whole picture, detail included: 7,014 pairs of distinct 8x8
        handwritten digits of the digits sample are within 12 bits). Others match only exactly."""
        return not self.flat and self.side >= MIN_HASH_SIDE


def _code(image_hash: object) -> int:
    """An imagehash.ImageHash (8x8 bits) as an unsigned 64-bit integer."""
    bits = np.packbits(np.asarray(image_hash.hash, dtype=bool).ravel())
    return int.from_bytes(bits.tobytes(), "big")


def crop_borders(img: Image.Image, fraction: float) -> Image.Image:
    """`img` with `fraction` of its width and height cut off each border."""
    if not fraction:
        return img
    dx, dy = round(img.width * fraction), round(img.height * fraction)
    if img.width - 2 * dx < 2 or img.height - 2 * dy < 2:
        return img
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def colour_layout(img: Image.Image) -> np.ndarray:
    """Chromaticity (r, g, b over their sum) of each cell of a GRID x GRID grid, GRID*GRID*3 float32."""
    cells = np.asarray(img.convert("RGB").resize((GRID, GRID), Image.BOX), dtype=np.float32) + 1.0
    return (cells / cells.sum(axis=-1, keepdims=True)).reshape(-1)


def shrink(img: Image.Image) -> Image.Image:
    """`img` shrunk to at most HASH_SIDE pixels a side (itself when smaller): what the hashes and the
    image statistics look at, so a 12-megapixel photo costs little more than a thumbnail."""
    if max(img.size) <= HASH_SIDE:
        return img
    work = img.copy()
    work.thumbnail((HASH_SIDE, HASH_SIDE), Image.BILINEAR, reducing_gap=2.0)
    return work


def fingerprint(img: Image.Image, work: Image.Image | None = None) -> Fingerprint:
    """The fingerprint of an RGB image (utils.data.decode.load_image(path, 3)).

    Args:
        img: the decoded image (its pixels give the sha256).
        work: shrink(img) when the caller has it already.
    """
    import imagehash

    sha = hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).hexdigest()
    work = shrink(img) if work is None else work
    phash, dhash, colour = [], [], []
    for level in CROP_LEVELS:
        part = crop_borders(work, level)
        phash.append(_code(imagehash.phash(part)))
        dhash.append(_code(imagehash.dhash(part)))
        colour.append(colour_layout(part))
    std = float(np.asarray(work, dtype=np.float32).reshape(-1, 3).std(axis=0).max())  # per channel: a flat red is flat
    return Fingerprint(sha, tuple(phash), tuple(dhash), np.stack(colour), std, min(img.size))


# ------------------------------------------------------------------------------------ index
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy's bitwise_count where there is one, numpy < 2 a byte table)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int64)


def _chunk_bounds(chunks: int) -> list[tuple[int, int]]:
    """(low bit, width) of `chunks` near-equal chunks of 64 bits."""
    widths = [64 // chunks + (1 if i < 64 % chunks else 0) for i in range(chunks)]
    starts = np.cumsum([0] + widths[:-1])
    return [(int(s), w) for s, w in zip(starts, widths)]


def _flip_masks(width: int, flips: int) -> np.ndarray:
    """Every integer of `width` bits with at most `flips` bits set (0 first)."""
    masks = [sum(1 << b for b in bits) for k in range(flips + 1) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.int64)


def choose_chunks(n_queries: int, n_codes: int, radius: int) -> int:
    """The chunk count m (3..8) of least estimated work: table lookups (queries x flipped chunk values)
    plus candidates (lookups x codes per bucket, each a popcount), assuming uniform hash bits."""
    def cost(m: int) -> float:
        total = 0.0
        for _, width in _chunk_bounds(m):
            probes = sum(math.comb(width, k) for k in range(radius // m + 1))
            total += probes * n_queries * (1.0 + n_codes / 2.0 ** width)
        return total

    return min(range(3, 9), key=cost)


def hamming_pairs(queries: np.ndarray, codes: np.ndarray, radius: int, chunks: int | None = None,
                  batch: int = 1 << 21) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, code) pair of 64-bit codes within `radius` bits, by multi-index hashing.

    Args:
        queries: uint64 codes to look up.
        codes: uint64 codes of the index.
        radius: the largest Hamming distance kept (0..63).
        chunks: chunk count m (None: choose_chunks).
        batch: table lookups per numpy step (bounds memory).

    Returns:
        (query indices, code indices, distances), int64, sorted by query then code; each pair once.
    """
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    empty = np.zeros(0, dtype=np.int64)
    if not len(queries) or not len(codes):
        return empty, empty, empty
    m = chunks or choose_chunks(len(queries), len(codes), radius)
    found: list[np.ndarray] = []
    for low, width in _chunk_bounds(m):
        keys = ((codes >> np.uint64(low)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        offsets = np.zeros((1 << width) + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys, minlength=1 << width), out=offsets[1:])
        qkeys = ((queries >> np.uint64(low)) & np.uint64((1 << width) - 1)).astype(np.int64)
        masks = _flip_masks(width, radius // m)
        step = max(1, batch // len(queries))
        for first in range(0, len(masks), step):
            probe = (qkeys[None, :] ^ masks[first:first + step, None]).ravel()
            start, count = offsets[probe], offsets[probe + 1] - offsets[probe]
            total = int(count.sum())
            if not total:
                continue
            qi = np.repeat(np.tile(np.arange(len(queries)), len(probe) // len(queries)), count)
            within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
            ci = order[np.repeat(start, count) + within]
            dist = popcount(queries[qi] ^ codes[ci])
            keep = dist <= radius
            found.append(qi[keep] * len(codes) + ci[keep])
    pairs = np.unique(np.concatenate(found)) if found else empty
    qi, ci = pairs // len(codes), pairs % len(codes)
    return qi, ci, popcount(queries[qi] ^ codes[ci])


# ----------------------------------------------------------------------------------- groups
class UnionFind:
    """Disjoint sets of 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            if self.size[a] < self.size[b]:
                a, b = b, a
            self.parent[b] = a
            self.size[a] += self.size[b]

    def groups(self) -> list[list[int]]:
        """Sets of two or more, each sorted, ordered by their first member."""
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


def near_pairs(prints: Sequence[Fingerprint | None], radius: int) -> list[tuple[int, int]]:
    """The pairs (i < j) of near copies among searchable images (None: an image not decoded): pHash
    within `radius` through the index (image i whole against image j at any crop level, and the
    reverse), confirmed by dHash and the colour layout at the same level."""
    searchable = np.array([i for i, f in enumerate(prints) if f is not None and f.searchable], dtype=np.int64)
    if len(searchable) < 2:
        return []
    levels = len(CROP_LEVELS)
    phash = np.array([prints[i].phash for i in searchable], dtype=np.uint64)
    dhash = np.array([prints[i].dhash for i in searchable], dtype=np.uint64)
    colour = np.stack([prints[i].colour for i in searchable])
    qi, ci, _ = hamming_pairs(phash[:, 0], phash.reshape(-1), radius)
    other, level = ci // levels, ci % levels
    keep = other != qi
    qi, other, level = qi[keep], other[keep], level[keep]
    keep = popcount(dhash[qi, 0] ^ dhash[other, level]) <= radius + DHASH_MARGIN
    keep &= np.abs(colour[qi, 0] - colour[other, level]).max(axis=-1) <= COLOUR_DISTANCE
    a, b = searchable[qi[keep]], searchable[other[keep]]
    return sorted({(int(min(x, y)), int(max(x, y))) for x, y in zip(a, b)})


def duplicate_groups(prints: Sequence[Fingerprint | None], radius: int = HASH_DISTANCE) -> list[list[int]]:
    """Groups of exact or near copies (indices into `prints`, two or more each, sorted): the
    connected sets of exact matches and near pairs (a chain of near copies is one group). None (an
    image not decoded) is in no group."""
    sets = UnionFind(len(prints))
    first: dict[str, int] = {}
    for i, f in enumerate(prints):
        if f is not None:
            sets.union(first.setdefault(f.sha256, i), i)
    for i, j in near_pairs(prints, radius):
        sets.union(i, j)
    return sets.groups()


def pair_distance(a: Fingerprint, b: Fingerprint) -> int:
    """pHash bits between two images, the closer of their crop levels (one whole, the other at any
    level); 0 for identical pixels."""
    if a.sha256 == b.sha256:
        return 0
    whole_a, whole_b = np.uint64(a.phash[0]), np.uint64(b.phash[0])
    return int(min(popcount(np.array([whole_a ^ np.uint64(h) for h in b.phash] +
                                     [whole_b ^ np.uint64(h) for h in a.phash], dtype=np.uint64))))
