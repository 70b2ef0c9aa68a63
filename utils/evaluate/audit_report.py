"""What audit.py writes: findings.csv, the self-contained report.html, and the summary table.

    write_findings_csv(folder / "findings.csv", findings)
    write_report(folder / "report.html", records, findings, title="raw/", max_shown=200)
    print(summary_table(findings))

report.html is one file that opens offline anywhere: inline CSS, no script, every picture a
base64 data URI (the histograms as PNG drawn by matplotlib, each thumbnail as a small JPEG). It
holds the counts per class and split, histograms of image size, aspect ratio and mode, and a card
per finding: the two images of a pair side by side with their paths, splits, labels and pHash
distance, or an image with what is wrong with it (a file that cannot be decoded: its name and
the error). At most `max_shown` cards per kind; the rest are counted and left to findings.csv.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

from prettytable import PrettyTable

from utils.core.files import atomic_write_text
from utils.data.decode import load_image
from utils.data.quality import KINDS, Finding, ImageRecord
from utils.draw.figures import subplots

CSV_FIELDS = ("kind", "path_a", "path_b", "split_a", "split_b", "label_a", "label_b", "distance", "detail", "group")
THUMB_SIDE = 128
KIND_HELP = {
    "leak": "an exact or near copy in another split",
    "conflict": "copies with different labels (whatever their splits)",
    "duplicate": "an exact or near copy in the same split",
    "unreadable": "the file cannot be decoded",
    "tiny": "shorter side under --min_size",
    "aspect": "longer side over --max_aspect times the shorter",
    "constant": "one flat colour",
    "mode_mix": "grayscale among mostly colour images, or the reverse",
}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 10px;text-align:left}
td.n,th.n{text-align:right}thead th{background:#eee}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.finding{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:330px;font-size:12px}
.finding .head{font-weight:600;margin-bottom:4px}.pair{display:flex;gap:6px}
figure{margin:0;width:158px;overflow-wrap:anywhere}figure img{max-width:158px;max-height:128px;display:block}
.noimg{width:128px;height:96px;background:#f3d6d6;display:flex;align-items:center;justify-content:center;color:#900}
.more{margin:8px 0;font-style:italic}.muted{color:#666}
"""


def write_findings_csv(path: Path, findings: Sequence[Finding]) -> None:
    """findings.csv: one row per finding (CSV_FIELDS), written atomically."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for f in findings:
        writer.writerow(["" if getattr(f, k) is None else getattr(f, k) for k in CSV_FIELDS])
    atomic_write_text(path, out.getvalue())


def summary_table(findings: Sequence[Finding]) -> PrettyTable:
    """kind, count (every kind, zeros included) and what the kind means."""
    counts = Counter(f.kind for f in findings)
    table = PrettyTable(["kind", "count", "meaning"])
    table.align = "l"
    table.align["count"] = "r"
    for kind in KINDS:
        table.add_row([kind, counts[kind], KIND_HELP[kind]])
    return table


def _figure_uri(fig: object) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histograms_uri(records: Sequence[ImageRecord]) -> str:
    """One PNG (as a data URI): histograms of the shorter side, of the aspect ratio, and the modes."""
    fig, axes = subplots(1, 3, figsize=(13, 3.2))
    readable = [r for r in records if r.width and r.height]
    sides = [min(r.width, r.height) for r in readable] or [0]
    aspects = [max(r.width, r.height) / min(r.width, r.height) for r in readable] or [1]
    axes[0].hist(sides, bins=min(40, max(5, len(set(sides)))), color="#4c72b0")
    axes[0].set(title="shorter side (px)", ylabel="images")
    axes[1].hist(aspects, bins=min(40, max(5, len(set(aspects)))), color="#55a868")
    axes[1].set(title="aspect ratio (long / short side)")
    modes = Counter(f"{r.mode} {'gray' if r.gray else 'colour'}" for r in records if not r.error)
    modes.update({"unreadable": sum(1 for r in records if r.error)} if any(r.error for r in records) else {})
    names = sorted(modes, key=lambda m: -modes[m])
    axes[2].bar(range(len(names)), [modes[n] for n in names], color="#c44e52")
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[2].set(title="file mode and pixels")
    return _figure_uri(fig)


class Thumbnails:
    """Small JPEG data URIs of images, each made once (a representative shows in many cards)."""

    def __init__(self) -> None:
        self.made: dict[str, tuple[str, str] | None] = {}

    def uri(self, path: str) -> tuple[str, str] | None:
        """(data URI, "width x height" of the image), or None when it cannot be decoded."""
        if path not in self.made:
            try:
                img = load_image(path, 3)
                size = f"{img.width}x{img.height}"
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buffer = io.BytesIO()
                img.save(buffer, format="JPEG", quality=80)
                self.made[path] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), size
            except Exception:  # noqa: BLE001 - a file that changed since it was inspected: no thumbnail
                self.made[path] = None
        return self.made[path]


def _figure(thumbs: Thumbnails, path: str, split: str, label: str, error: str = "") -> str:
    made = None if error else thumbs.uri(path)
    picture = (f'<img src="{made[0]}" alt="{html.escape(Path(path).name)}">' if made
               else f'<div class="noimg">{"cannot be decoded" if error else "no image"}</div>')
    size = f" · {made[1]}" if made else ""
    return (f"<figure>{picture}<figcaption>{html.escape(path)}<br><span class=muted>{html.escape(split)} · "
            f"{html.escape(label)}{size}</span></figcaption></figure>")


def finding_card(f: Finding, thumbs: Thumbnails) -> str:
    """One finding as an HTML card: the pair side by side, or the image and what is wrong."""
    head = f.kind + (f" · distance {f.distance}" if f.distance is not None else "")
    if f.path_b:
        body = f'<div class="pair">{_figure(thumbs, f.path_a, f.split_a, f.label_a)}' \
               f'{_figure(thumbs, f.path_b, f.split_b, f.label_b)}</div>'
    else:
        body = _figure(thumbs, f.path_a, f.split_a, f.label_a, f.detail if f.kind == "unreadable" else "")
    return (f'<div class="finding" data-kind="{f.kind}"><div class="head">{html.escape(head)}</div>{body}'
            f'<div class="detail">{html.escape(f.detail)}</div></div>')


def counts_table(records: Sequence[ImageRecord]) -> str:
    """Images per class (rows) and split (columns), with totals, as an HTML table."""
    splits = list(dict.fromkeys(r.split for r in records))
    labels = list(dict.fromkeys(r.label for r in records))
    counts = Counter((r.label, r.split) for r in records)
    rows = ["<table id=counts><thead><tr><th>class</th>" + "".join(f"<th class=n>{html.escape(s)}</th>" for s in splits)
            + "<th class=n>total</th></tr></thead><tbody>"]
    for label in labels:
        cells = [counts[label, s] for s in splits]
        rows.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td class=n>{c}</td>" for c in cells)
                    + f"<td class=n>{sum(cells)}</td></tr>")
    totals = [sum(counts[label, s] for label in labels) for s in splits]
    rows.append("<tr><th>total</th>" + "".join(f"<th class=n>{t}</th>" for t in totals)
                + f"<th class=n>{sum(totals)}</th></tr></tbody></table>")
    return "".join(rows)


def write_report(path: Path, records: Sequence[ImageRecord], findings: Sequence[Finding], title: str,
                 max_shown: int = 200) -> None:
    """report.html: the counts, the histograms and a card per finding (at most max_shown per kind).

    Args:
        path: the file to write (atomically).
        records: every image audited.
        findings: what was found (ordered by kind).
        title: what was audited (the data paths), for the heading.
        max_shown: cards shown per kind; the rest are counted, and findings.csv has them.
    """
    thumbs = Thumbnails()
    by_kind = {kind: [f for f in findings if f.kind == kind] for kind in KINDS}
    summary = "".join(f'<tr><td><a href="#{k}">{k}</a></td><td class=n>{len(v)}</td><td>{html.escape(KIND_HELP[k])}</td></tr>'
                      for k, v in by_kind.items())
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Data audit: {html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>Data audit: {html.escape(title)}</h1>",
             f"<p>{len(records)} images in {len({r.split for r in records})} split(s), "
             f"{len({r.label for r in records})} classes; {len(findings)} findings.</p>",
             f"<table id=summary><thead><tr><th>kind</th><th>count</th><th>meaning</th></tr></thead><tbody>{summary}"
             "</tbody></table>", "<h2>Images per class and split</h2>", counts_table(records),
             "<h2>Sizes, aspect ratios and modes</h2>", f'<img id=histograms alt="histograms" src="{histograms_uri(records)}">']
    for kind, found in by_kind.items():
        if not found:
            continue
        parts.append(f'<h2 id="{kind}">{kind}: {len(found)}</h2><p class=muted>{html.escape(KIND_HELP[kind])}</p><div class="cards">')
        parts.extend(finding_card(f, thumbs) for f in found[:max_shown])
        parts.append("</div>")
        if len(found) > max_shown:
            parts.append(f'<p class="more">and {len(found) - max_shown} more, see findings.csv</p>')
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))

