"""metrice.py's report.html (utils.evaluate.html_report): one page that opens offline, whose numbers
are results.json's, whose pictures are all data: URIs, whose mistakes are exactly the misclassified
images, and which escapes every name (a class called <script>...).

The case: the tiny test split, plus copies of the red test images filed under the second class (which
--label_path renames to a name holding a <script> tag), so there are mistakes whatever the run learnt;
which images are misclassified is worked out apart, image by image through predict_pil.
"""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import TINY_CLASSES, assert_ok, run_inprocess

from utils.core.run import RunFolder

EVIL = '<script>alert("x")</script> & co'


class Page(HTMLParser):
    """Every tag with its attributes, and the text of each td / th cell with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.cells: list[tuple[dict[str, str], str]] = []
        self._cell: tuple[dict[str, str], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag in ("td", "th"):
            self._cell = ({k: v or "" for k, v in attrs}, [])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append((self._cell[0], "".join(self._cell[1])))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)


@pytest.fixture(scope="module")
def report(trained_run, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("html_report")
    run = root / "run"
    run.mkdir()  # metrice writes run/test: not into the shared run. Its files only: another test of this
    for file in trained_run.path.iterdir():  # process may have left a test/ (or predict/) folder in the shared run,
        if file.is_file():  # and this one's output must be run/test, not test2
            shutil.copy2(file, run / file.name)
    split = root / "test"
    shutil.copytree(tiny_data / "test", split)
    swapped = []
    for image in sorted((split / "red").iterdir()):
        copy = split / TINY_CLASSES[1] / f"swapped_{image.name}"  # a red image filed under the second class
        shutil.copy(image, copy)
        swapped.append(copy)
    labels = root / "labels.txt"
    labels.write_text("\n".join([TINY_CLASSES[0], EVIL, TINY_CLASSES[2]]) + "\n", encoding="utf-8")
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "test", "--test_path", split, "--label_path", labels,
                         "--device", "cpu", "--workers", "0", "--visual")
    assert_ok(proc)
    out = run / "test"
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return {"out": out, "text": text, "page": page, "swapped": swapped, "split": split,
            "results": json.loads((out / RunFolder.RESULTS).read_text(encoding="utf-8"))}


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def test_metric_tables_are_results_json(report: dict) -> None:
    results, cells = report["results"], report["page"].cells
    overall = {(a["data-model"], a["data-metric"]): text for a, text in cells if "data-metric" in a}
    model = next(iter(results["metrics"]))
    assert {m for _, m in overall} >= {"images", "acc", "mean_acc", "f1"}
    for (name, metric), text in overall.items():
        value = results["metrics"][name][metric]
        assert text == (str(int(value)) if metric == "images" else fmt(value)), (metric, text, value)
    assert overall[model, "images"] == str(len(list(report["split"].rglob("*.png"))))
    per_class = [(a["data-field"], text) for a, text in cells if "data-field" in a]
    expected = [(field, fmt(value)) for row in results["per_class"] for field, value in row.items()]
    assert per_class == expected  # every class, every column, in order (the class names unescaped by the parser)
    shown = {a["data-key"]: text for a, text in cells if "data-key" in a}
    for key in ("ece_before", "ece_after", "nll_after", "brier_after", "temperature"):
        assert shown[key] == fmt(results["calibration"][key]), key


def test_self_contained_every_picture_a_data_uri(report: dict) -> None:
    tags = report["page"].tags
    images = [a for tag, a in tags if tag == "img"]
    pngs = sorted(p.name for p in report["out"].glob("*.png"))
    assert {"confusion_matrix.png", "calibration.png", "incorrect.png"} <= set(pngs)
    mistakes = [a for tag, a in tags if tag == "figure" and "mistake" in a.get("class", "")]
    assert mistakes and len(images) == len(pngs) + len(mistakes)  # the plots and one thumbnail per mistake
    assert all(a["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) and len(a["src"]) > 200
               for a in images)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert not [v for _, a in tags for v in a.values() if "http://" in v or "https://" in v]


def test_mistakes_are_exactly_the_misclassified_images_worst_first(report: dict) -> None:
    shown = [a for tag, a in report["page"].tags if tag == "figure" and "mistake" in a.get("class", "")]
    from utils.data.decode import load_image
    from utils.infer.ensemble import load_ensemble, predict_pil

    ensemble = load_ensemble([report["out"].parent], "torch", "cpu")
    files = sorted(report["split"].rglob("*.png"))
    predicted = predict_pil(ensemble, [load_image(str(f)) for f in files]).argmax(axis=1)
    wrong = {str(f) for f, p in zip(files, predicted) if TINY_CLASSES[int(p)] != f.parent.name}
    assert wrong and {a["data-path"] for a in shown} == wrong and len(shown) == len(wrong)
    probs = [float(a["data-prob"]) for a in shown]
    assert probs == sorted(probs, reverse=True)
    acc = report["results"]["metrics"][next(iter(report["results"]["metrics"]))]["acc"]
    assert acc == pytest.approx(1 - len(shown) / report["results"]["metrics"][next(iter(report["results"]["metrics"]))]["images"])


def test_class_names_are_escaped(report: dict) -> None:
    text = report["text"]
    assert "<script>" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in text
    assert EVIL in [text for _, text in report["page"].cells]  # the per-class row names it, as text
