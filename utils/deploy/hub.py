"""The safetensors format: a trained run as a Hugging Face Hub folder in timm's layout, its runtime,
and its upload (export.py --export safetensors [--push_to_hub REPO]).

    python export.py --save_path runs/exp --export safetensors    # runs/exp/export/best_hub/ (+ best_hub.json)
    timm.create_model(f"local-dir:{folder}", pretrained=True)     # the trained model: our classes, our input
    backend = Backend(folder, torch.device("cpu"))                # predict.py / metrice.py --weight best_hub
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
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils import __version__
from utils.core.log import UserError
from utils.core.schema import FORMAT, Checkpoint, ModelMeta, PreprocessSpec
from utils.deploy.context import ExportContext
from utils.deploy.formats import FORMATS
from utils.deploy.runtime import torch_input, torch_output

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FOLDER_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)  # what export.py writes in the folder, and all it replaces there
FORMAT_SUFFIX = FORMATS["safetensors"].suffix  # best_hub/
# resize_mode -> timm's crop_mode (resize the short side and crop / resize both sides / fit and pad)
CROP_MODES = {"crop": "center", "squash": "squash", "letterbox": "border"}
SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "description", "notes", "hf_hub_id", "url")


def crop_pct(crop: int, resize: int) -> float:
    """crop / resize as timm reads it back: timm resizes to floor(crop / crop_pct), and the plain
    quotient falls a pixel short for many sizes (floor(14 / (14 / 25)) is 24), so it is lowered by
    the few units in the last place that make the floor `resize`."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def data_config(spec: PreprocessSpec) -> dict[str, Any]:
    """timm's data config (input_size, mean, std, interpolation, crop_pct, crop_mode) of our preprocessing."""
    return {"input_size": (spec.channels, spec.crop, spec.crop), "mean": tuple(spec.mean), "std": tuple(spec.std),
            "interpolation": spec.interpolation, "crop_pct": crop_pct(spec.crop, spec.resize),
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
        *calibration_lines(meta), "```", ""])


def calibration_lines(meta: ModelMeta) -> list[str]:
    """The model card's lines (inside its code block) that turn the logits into the calibrated
    probabilities, as predict.py gives them: the logits divided by the temperature (config.json:
    pytorch_classifier.temperature) before the softmax, or each class's before its sigmoid."""
    if meta.temperature is None:
        return []
    first = ["logits = model(transform(image).unsqueeze(0))  # image: a PIL image"]
    if meta.task_type.multilabel:
        values = ", ".join(f"{t:.6g}" for t in meta.temperature)
        return ["import torch", *first,
                f"probs = (logits / torch.tensor([{values}])).sigmoid()  # calibrated: a temperature per class"]
    return first + [f"probs = (logits / {meta.temperature[0]:.6g}).softmax(-1)  # calibrated: the temperature"]


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
    (folder / CARD_FILE).write_text(model_card(ckpt, config["architecture"]), encoding="utf-8")


def refusal(meta: ModelMeta) -> str | None:
    """Why this model cannot be written in timm's Hub layout (None when it can): only models that
    timm builds can be rebuilt from a config.json."""
    from utils.models.registry import resolve_name

    if resolve_name(meta.model_name)[0] != "timm":
        return (f"--export safetensors writes timm's Hub layout and {meta.model_name} is a torchvision model, which timm "
                "cannot build: export torchscript or onnx instead")
    return None


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """<stem>_hub/ (model.safetensors, config.json, README.md) of the model as trained, float32 (a Hub
    folder is rebuilt by name: the deploy form's folded layers would not fit timm's architecture)."""
    folder = ctx.file(FORMAT_SUFFIX, "fp32")
    folder.mkdir()
    save_hub_folder(ctx.checkpoint, ctx.trained, folder, ctx.info["source"]["checkpoint"])
    ctx.write_info(folder, ctx.describe("safetensors", folder, "fp32", True))
    return [(folder, "fp32")]


class Backend:
    """A Hub folder written by export.py, rebuilt by timm.create_model("local-dir:...") and run by PyTorch.

    Args:
        folder: the folder (config.json, model.safetensors).
        device: where to run.
        half: float16 weights and inputs (CUDA only).
    """

    model_type = "safetensors"

    def __init__(self, folder: Path, device: torch.device, half: bool = False) -> None:
        import timm

        from utils.data.transforms import Normalize

        self.file = Path(folder)
        try:
            config = json.loads((self.file / CONFIG_FILE).read_text(encoding="utf-8"))
            self.meta: ModelMeta = ModelMeta.from_dict(config["pytorch_classifier"], f"{self.file / CONFIG_FILE}")
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{self.file} is not a Hub folder of export.py (its {CONFIG_FILE} carries no "
                            "'pytorch_classifier' metadata): export it with python export.py --export safetensors") from None
        try:
            self.model = timm.create_model(f"local-dir:{self.file}", pretrained=True).eval().to(device)
        except Exception as err:  # noqa: BLE001 - whatever timm raises, the folder is not usable
            raise UserError(f"timm cannot load {self.file}: {str(err).splitlines()[0][:200]}") from None
        self.device, self.half = device, half
        if half:
            self.model.half()
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    def __call__(self, images: Any) -> Any:
        with torch.inference_mode():
            x = self.normalize(torch_input(images, self.device))
            return torch_output(self.model(x.half() if self.half else x), images)


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
        folder: a Hub folder export.py wrote (--export safetensors).
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
