"""A model format that exists only in the tests: "ts2", a TorchScript file named best.ts2.

tests/test_owners.py adds one row for it to utils.deploy.formats.FORMATS (with monkeypatch) and
nothing else, to show that a format is one row plus one module with `export(ctx)` and `Backend`.
The module reuses utils.deploy.torchscript's exporter and runtime; only the file name and the
model_type it records are its own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from utils.deploy import torchscript
from utils.deploy.context import ExportContext
from utils.deploy.formats import info_path

FLAG, SUFFIX = "ts2", ".ts2"


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """TorchScript's export, each file (and its JSON) renamed to .ts2 and recorded as model_type ts2."""
    out = []
    for file, precision in torchscript.export(ctx):
        target = file.with_suffix(SUFFIX)
        os.replace(file, target)
        info = json.loads(info_path(file).read_text(encoding="utf-8"))
        info_path(file).unlink()
        ctx.write_info(target, info | {"model_type": FLAG, "file": target.name})
        out.append((target, precision))
    return out


class Backend(torchscript.Backend):
    """TorchScript's runtime under this format's name."""

    model_type = FLAG
