"""A trained run as a Hugging Face Hub folder in timm's layout, and its upload (export.py --export safetensors).

    folder = export_hub(Path("runs/exp/best.pt"), "")            # runs/exp/export/best_hub/
    timm.create_model(f"local-dir:{folder}", pretrained=True)     # the trained model: our classes, our input
    push_to_hub(folder, "user/flowers")                           # export.py --push_to_hub user/flowers

The folder is what timm's own save_for_hf writes: model.safetensors (the trained weights, float32,
no pickle) and config.json (architecture, num_classes, label_names, model_args such as in_chans,
and pretrained_cfg with input_size, mean, std, interpolation, crop_pct), plus a README.md model card.
config.json also carries this toolkit's ModelMeta under "pytorch_classifier", so predict.py's
preprocessing can be rebuilt exactly. Only models that timm builds can be written this way
(pytorch-classifier's zoo names that map to timm, any timm name, the models in model/).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils import __version__
from utils.core.checkpoint import load_checkpoint
from utils.core.log import UserError
from utils.core.schema import FORMAT, Checkpoint, PreprocessSpec
from utils.infer.backends import EXPORT_DIR
from utils.models.weights import model_from_checkpoint

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# resize_mode -> timm's crop_mode (resize the short side and crop / resize both sides / fit and pad)
CROP_MODES = {"crop": "center", "squash": "squash", "letterbox": "border"}
SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "description", "notes", "hf_hub_id", "url")


def data_config(spec: PreprocessSpec) -> dict[str, Any]:
    """timm's data config (input_size, mean, std, interpolation, crop_pct, crop_mode) of our preprocessing."""
    return {"input_size": (spec.channels, spec.crop, spec.crop), "mean": tuple(spec.mean), "std": tuple(spec.std),
            "interpolation": spec.interpolation, "crop_pct": spec.crop / spec.resize,
            "crop_mode": CROP_MODES.get(spec.resize_mode, "center")}


def model_card(ckpt: Checkpoint, architecture: str) -> str:
    """README.md of the folder: what the model is, its classes, and how to load it."""
    meta = ckpt.meta
    val = (ckpt.metrics or {}).get("val") or (ckpt.metrics or {}).get("train") or {}
    score = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, (int, float)) and k in ("acc", "mean_acc", "loss"))
    return "\n".join([
        "---", "tags:", "- image-classification", "- timm", "- pytorch-classifier-ng", "library_name: timm", "---", "",
        f"# {architecture} ({meta.num_classes} classes)", "",
        f"Trained with pytorch-classifier-ng {__version__} (--model_name {meta.model_name}), epoch {ckpt.epoch}"
        + (f": {score}." if score else "."), "",
        f"Classes: {', '.join(meta.class_names)}", "",
        f"Input: {meta.image_channel}x{meta.image_size}x{meta.image_size}, mean {list(meta.preprocess.mean)}, "
        f"std {list(meta.preprocess.std)}, resize mode {meta.preprocess.resize_mode}.", "",
        "```python", "import timm", "model = timm.create_model('hf-hub:REPO', pretrained=True).eval()  # or 'local-dir:FOLDER'",
        "config = timm.data.resolve_data_config({}, model=model)", "transform = timm.data.create_transform(**config)",
        "```", ""])


def save_hub_folder(ckpt: Checkpoint, model: nn.Module, folder: Path, source: str) -> None:
    """Write model.safetensors, config.json and README.md of `model` into `folder` (timm.models.save_for_hf)."""
    from timm.models import save_for_hf

    meta = ckpt.meta
    extra = {"label_names": list(meta.class_names),
             "pytorch_classifier": {"format": FORMAT, "version": __version__, "source": source, "epoch": ckpt.epoch,
                                    **meta.to_dict()}}
    save_for_hf(model, str(folder), model_config=extra, safe_serialization=True, data_config=data_config(meta.preprocess))
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    for key in SOURCE_KEYS:  # they describe timm's ImageNet weights, not these
        config["pretrained_cfg"].pop(key, None)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "README.md").write_text(model_card(ckpt, config["architecture"]), encoding="utf-8")


def check_loads(folder: Path, model: nn.Module, spec: PreprocessSpec) -> float:
    """Build the folder's model with timm.create_model(local-dir:) and return the largest difference of its
    outputs from `model`'s on random input.

    Raises:
        UserError: timm cannot build it, or it computes something else.
    """
    import timm

    try:
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as err:  # noqa: BLE001 - whatever timm raises, the folder is not usable
        raise UserError(f"timm cannot load the written folder {folder}: {str(err).splitlines()[0]}") from None
    x = torch.randn(2, spec.channels, spec.crop, spec.crop, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((loaded(x) - model.eval()(x)).abs().max())
    if diff > 1e-4:
        raise UserError(f"the model timm loads from {folder} differs from the checkpoint's (max |dlogit| {diff:.2e})")
    return diff


def export_hub(weights: Path, output_path: str = "") -> dict[str, Any]:
    """Write <output>/<stem>_hub/ (default <run>/export/best_hub/) from a checkpoint and check that timm loads it.

    Returns:
        {"format": "safetensors", "path", "files", "max_abs_diff"}.

    Raises:
        UserError: a model timm does not build (torchvision's), or a folder export.py did not write.
    """
    ckpt = load_checkpoint(weights, what="checkpoint")
    model = model_from_checkpoint(ckpt)
    if getattr(model, "toolkit_source", "timm") != "timm" or not hasattr(model, "pretrained_cfg"):
        raise UserError(f"--export safetensors writes timm's Hub layout and {ckpt.meta.model_name} is a torchvision model, "
                        "which timm cannot build: export torchscript or onnx instead")
    out_dir = Path(output_path) if output_path else weights.parent / EXPORT_DIR
    folder = out_dir / f"{weights.stem}_hub"
    if folder.exists() and not _is_ours(folder):
        raise UserError(f"{folder} exists and was not written by export.py: move it away or pass another --output_path")
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".hub-", dir=out_dir))  # written whole, then put in place
    try:
        save_hub_folder(ckpt, model, staged, str(weights))
        diff = check_loads(staged, model, ckpt.meta.preprocess)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    files = sorted(p.name for p in folder.iterdir())
    print(f"safetensors: {folder} ({', '.join(files)}); timm.create_model('local-dir:{folder}', pretrained=True) "
          f"matches the checkpoint (max |dlogit| {diff:.1e})", flush=True)
    return {"format": "safetensors", "path": str(folder), "files": files, "max_abs_diff": diff}


def _is_ours(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("pytorch_classifier") or {}).get("format") == FORMAT


def upload_plan(folder: Path, repo_id: str) -> dict[str, Any]:
    """What push_to_hub sends: HfApi.upload_folder's arguments (checked before anything is sent)."""
    folder = Path(folder)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: not a Hub folder of export.py")
    if repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise UserError(f"--push_to_hub '{repo_id}' is not a Hub repo id (NAME or OWNER/NAME)")
    architecture = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["architecture"]
    return {"repo_id": repo_id, "folder_path": str(folder), "repo_type": "model",
            "commit_message": f"{architecture} from pytorch-classifier-ng {__version__}"}


def push_to_hub(folder: Path, repo_id: str, api: Any = None) -> str:
    """Create the model repo (if new) and upload the folder; returns the commit URL.

    Args:
        folder: a folder export_hub wrote.
        repo_id: NAME or OWNER/NAME (the token comes from HF_TOKEN or `hf auth login`).
        api: a huggingface_hub.HfApi (default: a new one).

    Raises:
        UserError: offline (HF_HUB_OFFLINE), or the Hub refused (one line; the folder stays).
    """
    plan = upload_plan(folder, repo_id)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, nothing was sent; the folder is ready at "
                        f"{folder}: upload it later with `hf upload {repo_id} {folder}`")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(library_name="pytorch-classifier-ng", library_version=__version__)
    try:
        url = api.create_repo(plan["repo_id"], repo_type="model", exist_ok=True)
        plan["repo_id"] = getattr(url, "repo_id", plan["repo_id"])
        commit = api.upload_folder(**plan)
    except Exception as err:  # noqa: BLE001 - network, auth and Hub errors: one line, the folder stays
        raise UserError(f"--push_to_hub {repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        f"the folder is at {folder}") from None
    print(f"pushed {folder} to the Hub: {getattr(commit, 'commit_url', commit)}", flush=True)
    return str(getattr(commit, "commit_url", commit))
