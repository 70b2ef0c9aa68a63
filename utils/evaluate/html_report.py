"""metrice.py's report.html: one self-contained page of an evaluation that opens offline anywhere.

    write_html_report(out, ensemble, split, class_names, run_args, flags)   # after results.json and the plots

What it holds: the run (models, architecture, input, classes, the run's own options from its args.yaml,
and metrice.py's flags), the metrics tables read back from the output folder's results.json (overall,
per class, calibration, unknown images: the very numbers metrice.py printed and stored, at its 4
decimals), every plot the folder holds (confusion matrices, reliability, t-SNE, mistakes, histograms),
and a gallery of the misclassified images (a multi-label model: the images whose labels are not all
right), the most confident first, at most MAX_MISTAKES, each with its true and predicted class and
probability.

One file: CSS inline, no script, no link, each picture a base64 data: URI (the plots as the PNG files
metrice.py wrote, each mistake as a thumbnail). Every string from the user (class names, paths,
options) is escaped with html.escape.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.core.files import atomic_write_text
from utils.core.run import Run, RunFolder
from utils.evaluate.label_report import data_uri, thumbnail
from utils.evaluate.metrics import METRIC_LABELS
from utils.evaluate.split import SplitPredictions

REPORT = "report.html"
MAX_MISTAKES = 100  # thumbnails in the gallery; incorrect.csv (--visual) lists them all
STYLE = ("body{font-family:system-ui,-apple-system,Segoe UI,Roboto,'Noto Sans CJK SC','Microsoft YaHei',sans-serif;"
         "margin:24px;color:#1d1d1f;background:#fafafa}h1{font-size:22px}h2{font-size:18px;margin-top:28px;"
         "border-bottom:1px solid #ddd;padding-bottom:4px}table{border-collapse:collapse;margin:8px 0}"
         "th,td{border:1px solid #ccc;padding:3px 10px;text-align:left;vertical-align:top}td.n{text-align:right}"
         "thead th{background:#eee}.plots img{max-width:100%;margin:8px 0;display:block}"
         ".cards{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:150px;font-size:12px;overflow-wrap:anywhere;"
         "background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}figure img{width:96px;height:96px}"
         ".true{color:#070}.pred{color:#b00}.muted{color:#666}details{margin:8px 0}")


def cell(value: Any) -> str:
    """A value as metrice.py prints it: floats to 4 decimals (nan as '-'), the rest as text, escaped."""
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.4f}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value, ensure_ascii=False))
    return html.escape(str(value))


def key_value_table(table_id: str, rows: dict[str, Any]) -> str:
    """A two-column table: each key and its value (nested dicts flattened as a.b)."""
    def flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
        if isinstance(value, dict) and value:
            return [item for k, v in value.items() for item in flat(f"{prefix}.{k}" if prefix else str(k), v)]
        return [(prefix, value)]

    items = [item for k, v in rows.items() for item in flat(str(k), v)]
    body = "".join(f'<tr><th>{html.escape(k)}</th><td data-key="{html.escape(k)}">{cell(v)}</td></tr>' for k, v in items)
    return f'<table id="{table_id}"><tbody>{body}</tbody></table>'


def overall_table(metrics: dict[str, dict[str, Any]]) -> str:
    """The overall metrics: a row per metric, a column per model (the ensemble's first)."""
    models = list(metrics)
    keys = [k for k in METRIC_LABELS if any(k in m for m in metrics.values())]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = []
    for key in keys:
        cells = "".join(f'<td class=n data-model="{html.escape(m)}" data-metric="{key}">'
                        f'{cell(int(metrics[m][key]) if key == "images" else metrics[m].get(key, float("nan")))}</td>'
                        for m in models)
        rows.append(f"<tr><th>{html.escape(METRIC_LABELS[key])}</th>{cells}</tr>")
    return f'<table id="overall"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def per_class_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-class metrics, the columns of per_class.csv."""
    if not rows:
        return ""
    fields = list(rows[0])
    head = "".join(f"<th>{html.escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f'<td{"" if f == "class" else " class=n"} data-field="{html.escape(f)}">{cell(r[f])}</td>'
                                    for f in fields) + "</tr>" for r in rows)
    return f'<table id="per_class"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def mistakes(split: SplitPredictions, thresholds: Sequence[float] | None) -> list[int]:
    """The rows predicted wrong, the most confident first (a multi-label model: any label wrong at its
    threshold; confidence: the highest probability)."""
    probs = split.probs
    if split.targets.ndim == 2:
        wrong = ((probs >= np.asarray(thresholds)) != (split.targets > 0.5)).any(axis=1)
    else:
        wrong = probs.argmax(axis=1) != split.targets
    order = np.argsort(-probs.max(axis=1), kind="stable")
    return [int(r) for r in order if wrong[r]]


def gallery(split: SplitPredictions, class_names: Sequence[str], thresholds: Sequence[float] | None) -> str:
    """The misclassified images as thumbnails (at most MAX_MISTAKES), with true and predicted class and probability."""
    rows = mistakes(split, thresholds)
    esc = html.escape
    parts = [f'<h2 id="mistakes">Mistakes: {len(rows)} of {len(split.probs)} images</h2>']
    if len(rows) > MAX_MISTAKES:
        parts.append(f"<p class=muted>The {MAX_MISTAKES} most confident; metrice.py --visual writes incorrect.csv with all.</p>")
    parts.append('<div class="cards">')
    for r in rows[:MAX_MISTAKES]:
        path, p = split.path(r), split.probs[r]
        if split.targets.ndim == 2:
            true = ", ".join(class_names[c] for c in np.flatnonzero(split.targets[r] > 0.5)) or "(none)"
            pred = ", ".join(class_names[c] for c in np.flatnonzero(p >= np.asarray(thresholds))) or "(none)"
        else:
            true, pred = class_names[int(split.targets[r])], class_names[int(p.argmax())]
        parts.append(f'<figure class="mistake" data-path="{esc(path)}" data-prob="{float(p.max()):.6f}">'
                     f'<img alt="{esc(Path(path).name)}" src="{data_uri(thumbnail(path))}"><figcaption>{esc(path)}<br>'
                     f'<span class=true>true: {esc(true)}</span><br><span class=pred>predicted: {esc(pred)}</span> '
                     f'{float(p.max()):.4f}</figcaption></figure>')
    parts.append("</div>")
    return "".join(parts)


def plots(folder: Path) -> str:
    """Every PNG of the output folder, embedded."""
    parts = []
    for png in sorted(folder.glob("*.png")):
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<h3>{html.escape(png.name)}</h3><img alt="{html.escape(png.stem)}" src="{uri}">')
    return f'<div class="plots">{"".join(parts)}</div>' if parts else "<p class=muted>no plots</p>"


def write_html_report(out: Run, ensemble: Any, split: SplitPredictions, class_names: Sequence[str],
                      run_args: dict[str, Any], flags: dict[str, Any]) -> Path | None:
    """report.html in the output folder, from its results.json and plots and the split's mistakes.

    Args:
        out: metrice.py's output folder (results.json and the plots written).
        ensemble: the models (names, architecture, preprocessing, thresholds).
        split: the split's predictions.
        class_names: the names shown (--label_path's, else the model's).
        run_args: the first run's args.yaml.
        flags: metrice.py's options.

    Returns:
        The file (None on a process that does not write).
    """
    if not out.main:
        return None
    results = json.loads((out / RunFolder.RESULTS).read_text(encoding="utf-8"))
    meta = ensemble.meta
    thresholds = meta.task_type.thresholds(meta.num_classes, meta.thresholds) if meta.task_type.multilabel else None
    title = f"{', '.join(m.name for m in ensemble.members)}: {flags.get('task')}"
    run = {"models": [m.name for m in ensemble.members], "architecture": meta.model_name, "task": meta.task,
           "image_size": meta.preprocess.crop, "image_channel": meta.preprocess.channels, "classes": list(class_names),
           "split": flags.get("split"), "images": len(split.probs)}
    extra = "".join(f"<h2>{html.escape(name)}</h2>{key_value_table(name, results[name])}"
                    for name in ("calibration", "ood") if isinstance(results.get(name), dict))
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>Evaluation: {html.escape(title)}</h1>",
             "<h2>Run</h2>", key_value_table("run", run),
             "<h2>Overall</h2>", overall_table(results.get("metrics", {})),
             "<h2>Per class</h2>", per_class_table(results.get("per_class") or []), extra,
             "<h2>Plots</h2>", plots(out.path), gallery(split, class_names, thresholds),
             "<h2>Options</h2><details><summary>the run's args.yaml</summary>", key_value_table("run_args", run_args),
             "</details><details><summary>metrice.py's options</summary>", key_value_table("flags", flags),
             "</details></body></html>\n"]
    path = out / REPORT
    atomic_write_text(path, "".join(parts))
    return path
