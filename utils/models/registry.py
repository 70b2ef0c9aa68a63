"""Model names -> models: pytorch-classifier's zoo, every timm model, torchvision, and model/.

`create_model(name, num_classes, in_chans, pretrained)` is the one factory. A name is looked up in
ZOO (pytorch-classifier's names, mapped to a timm or torchvision implementation), then in timm's
registry (which model/ registers into), then in torchvision's. Pretrained ImageNet weights come
from the standard caches (Hugging Face hub cache for timm, TORCH_HOME for torchvision); offline,
a missing file is one clear error instead of a long retrying download.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

import model as _custom_models  # noqa: F401  (registers model/ architectures into timm)
from utils.core.log import UserError
from utils.core.names import MODEL_SOURCES, unknown_model_message
from utils.models.online import TORCHVISION_WEIGHTS, weights_server_online

LOGGER = logging.getLogger(__name__)


# family -> [(pytorch-classifier name, source, implementation name)], smallest member first.
ZOO_FAMILIES: dict[str, list[tuple[str, str, str]]] = {
    "resnet": [(n, "timm", n) for n in ("resnet18", "resnet34", "resnet50", "resnet101")],
    "wide_resnet": [("wide_resnet50", "timm", "wide_resnet50_2"), ("wide_resnet101", "timm", "wide_resnet101_2")],
    "resnext": [("resnext50", "timm", "resnext50_32x4d"), ("resnext101", "timm", "resnext101_32x8d")],
    "resnest": [("resnest50", "timm", "resnest50d"), ("resnest101", "timm", "resnest101e"),
                ("resnest200", "timm", "resnest200e"), ("resnest269", "timm", "resnest269e")],
    "shufflenet": [(n, "torchvision", n) for n in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0")],
    "mobilenet": [("mobilenetv3_small", "timm", "mobilenetv3_small_100"), ("mobilenetv2", "timm", "mobilenetv2_100"),
                  ("mobilenetv3_large", "timm", "mobilenetv3_large_100")],
    "densenet": [(n, "timm", n) for n in ("densenet121", "densenet169", "densenet201", "densenet161")],
    "vgg": [(n, "timm", n) for n in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")],
    "efficientnet": [(f"efficientnet_b{i}", "torchvision", f"efficientnet_b{i}") for i in range(8)],
    "efficientnet_v2": [(n, "torchvision", n) for n in ("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l")],
    "mnasnet": [("mnasnet1_0", "torchvision", "mnasnet1_0")],
    "vovnet": [("vovnet39", "timm", "vovnet39a"), ("vovnet59", "timm", "vovnet57a")],
    "convnext": [(n, "timm", n) for n in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge")],
    "ghostnet": [("ghostnet", "timm", "ghostnet_100")],
    "repvgg": [(f"RepVGG-{v}", "timm", f"repvgg_{v.lower()}") for v in
               ("A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g4", "B3", "B3g4", "D2se")],
    "sequencer": [(n, "timm", n) for n in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")],
    "darknet": [(n, "timm", n) for n in ("darknet53", "darknetaa53")],
    "cspnet": [(n, "timm", n) for n in (
        "cs3darknet_m", "cs3darknet_focus_m", "cspresnet50", "cspresnext50", "cspdarknet53", "cs3darknet_l",
        "cs3darknet_x", "cs3darknet_focus_l", "cs3sedarknet_l", "cs3sedarknet_x", "cs3edgenet_x", "cs3se_edgenet_x")],
    "dpn": [(n, "timm", n) for n in ("dpn68", "dpn68b", "dpn92", "dpn98", "dpn107", "dpn131")],
}


# repghostnet_0_5x -> timm's repghostnet_050, 0_58x -> 058, 1_11x -> 111
ZOO_FAMILIES["repghost"] = [
    (f"repghostnet_{s}x", "timm", "repghostnet_" + (s.replace("_", "") + "0")[:3]) for s in
    ("0_5", "0_58", "0_8", "1_0", "1_11", "1_3", "1_5", "2_0")
]


ZOO: dict[str, tuple[str, str]] = {name: (src, impl) for fam in ZOO_FAMILIES.values() for name, src, impl in fam}


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


SOURCE_PREFIXES = MODEL_SOURCES  # timm's model sources: a Hub repo, a local folder


def _tagged(name: str) -> str:
    """A timm name with a pretrained tag (resnet18.a1_in1k), checked against the tags timm knows.

    Raises:
        UserError: an unknown tag, with the architecture's tags.
    """
    arch, tag = name.split(".", 1)
    tags = sorted(n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*"))
    if tag not in tags:
        known = f"its tags: {', '.join(tags)}" if tags else "timm has no pretrained tags for it"
        raise UserError(f"unknown pretrained tag '{tag}' in --model_name {name}; {known}")
    return name


def _source_name(name: str) -> str:
    """hf-hub:<repo> and local-dir:<folder> pass to timm; a folder must hold timm's config.json.

    Raises:
        UserError: a local folder without config.json.
    """
    prefix, _, where = name.partition(":")
    if not where:
        raise UserError(f"--model_name {name}: nothing after '{prefix}:' (hf-hub:timm/resnet18.a1_in1k, local-dir:FOLDER)")
    if prefix == "local-dir" and not (Path(where) / "config.json").is_file():
        raise UserError(f"--model_name {name}: {Path(where) / 'config.json'} not found; a local-dir: model is a folder "
                        "in timm's Hub layout (export.py --export safetensors writes one)")
    return name


def resolve_name(name: str) -> tuple[str, str]:
    """Map a user-facing model name to (source, implementation name).

    Zoo names first, then timm's (with or without a pretrained tag, or an hf-hub: / local-dir: source),
    then torchvision's.

    Raises:
        UserError: unknown name, with distinct close matches.
    """
    if name in ZOO:
        return ZOO[name]
    if name.lower().startswith(SOURCE_PREFIXES):
        return "timm", _source_name(name)
    if timm.is_model(name):
        return "timm", _tagged(name) if "." in name else name
    if name in _torchvision_names():
        return "torchvision", name
    raise UserError(unknown_model_message(name, all_model_names()))


def all_model_names() -> list[str]:
    """Every name resolve_name takes without a tag or source: the zoo's, timm's (model/ included, and
    the deprecated names timm still maps), torchvision's; each once. utils/core/model_names.txt holds
    them for the check before PyTorch loads (utils.core.names.unknown_model_name)."""
    timm_names = timm.list_models() + sorted(timm.models.get_deprecated_models())
    return list(dict.fromkeys(list(ZOO) + timm_names + _torchvision_names()))


def model_table() -> list[tuple[str, str, str]]:
    """(family, pytorch-classifier names, implementation) rows for --list_models and the README."""
    rows = []
    for family, members in ZOO_FAMILIES.items():
        for name, src, impl in members:
            rows.append((family, name, f"{src}:{impl}"))
    return rows


def model_zoo_text() -> str:
    """main.py --list_models: the zoo (model_table) as a table, and what else a name may be."""
    from prettytable import PrettyTable

    table = PrettyTable(["family", "model_name", "implementation"])
    for row in model_table():
        table.add_row(row)
    table.align = "l"
    return f"{table}\nAny timm model name works as well (timm.list_models()), and the models in model/."


# -------------------------------------------------------------------------- pretrained weights
def _timm_weight_file(impl: str) -> tuple[str | None, str]:
    """Find timm's ImageNet weights for `impl` in the local caches.

    Returns:
        (path or None, a description of where they are expected).
    """
    cfg = timm.get_pretrained_cfg(impl)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UserError(f"timm has no ImageNet weights for '{impl}': drop --pretrained, or pass --weight FILE")
    if cfg.file and Path(cfg.file).is_file():
        return cfg.file, cfg.file
    where = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return found, found
        repo_dir = Path(HF_HUB_CACHE) / ("models--" + cfg.hf_hub_id.replace("/", "--"))
        where.append(f"the Hugging Face cache {repo_dir} (hf download {cfg.hf_hub_id})")
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if local.is_file():
            return str(local), str(local)
        where.append(f"{local} (from {cfg.url})")
    return None, " or ".join(where)


def _torchvision_weight_file(impl: str) -> tuple[Any, str | None, str]:
    """torchvision's DEFAULT weights enum for `impl`, the cached file if present, and where it goes."""
    try:
        weights = torchvision.models.get_model_weights(impl).DEFAULT
    except (ValueError, AttributeError):
        raise UserError(f"torchvision has no ImageNet weights for '{impl}': drop --pretrained, or pass --weight FILE") from None
    local = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return weights, (str(local) if local.is_file() else None), f"{local} (from {weights.url})"


def _missing_weights(name: str, where: str) -> UserError:
    return UserError(
        f"ImageNet weights for {name} are not in the local cache and cannot be downloaded (offline): "
        f"put them at {where}, or pass --weight FILE (a state_dict or checkpoint)"
    )


# ------------------------------------------------------------------------------ construction
def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the last nn.Linear (torchvision's classifier, wherever it sits) for a new one."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (module_name, module)
    if last is None:
        raise UserError(f"cannot find the classifier (a Linear layer) of {type(model).__name__}")
    module_name, layer = last
    if layer.out_features != num_classes:
        model.set_submodule(module_name, nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None))


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Make the first 3-channel convolution take `in_chans` channels (weights summed/repeated)."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_chans, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None, module.padding_mode)
            with torch.no_grad():
                w = module.weight
                new.weight.copy_(w.sum(dim=1, keepdim=True) if in_chans == 1 else w.repeat(1, in_chans // 3 + 1, 1, 1)[:, :in_chans])
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            model.set_submodule(module_name, new)
            return
    raise UserError(f"cannot find the first convolution of {type(model).__name__} to set --image_channel {in_chans}")


def create_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: a zoo name (resnet18, RepVGG-A0 ...), a timm name (with or without a pretrained tag:
            resnet18.a1_in1k), hf-hub:REPO or local-dir:FOLDER (timm's sources), or a torchvision name.
        num_classes: outputs of the classifier.
        in_chans: input channels (1 or 3).
        pretrained: load ImageNet weights from the local caches (or download when online).

    Returns:
        The model (train mode), with `model.toolkit_source` set to "timm" or "torchvision".
    """
    source, impl = resolve_name(name)
    if source == "timm" and impl.lower().startswith(SOURCE_PREFIXES):
        model = _create_from_source(impl, num_classes, in_chans, pretrained)
    elif source == "timm":
        kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
        if pretrained:
            path, where = _timm_weight_file(impl)
            if path is None and not weights_server_online():  # HF_HUB_OFFLINE, HF_ENDPOINT and proxies honoured
                raise _missing_weights(name, where)
            if path is not None:
                kwargs["pretrained_cfg_overlay"] = {"file": path}
                LOGGER.info("pretrained: %s <- %s", name, path)
        model = timm.create_model(impl, pretrained=pretrained, **kwargs)
    else:
        model = torchvision.models.get_model(impl, weights=None)
        if pretrained:
            weights, path, where = _torchvision_weight_file(impl)
            if path is None and not weights_server_online(TORCHVISION_WEIGHTS):  # HF_HUB_OFFLINE applies here too
                raise _missing_weights(name, where)
            state = torch.load(path, map_location="cpu", weights_only=True) if path else weights.get_state_dict(progress=True)
            model.load_state_dict(state)
            LOGGER.info("pretrained: %s <- %s", name, path or weights.url)
        _replace_classifier(model, num_classes)
        if in_chans != 3:
            _adapt_first_conv(model, in_chans)
    model.toolkit_source = source
    return model


def _create_from_source(name: str, num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    """timm.create_model for hf-hub: and local-dir: names; offline, a missing Hub file is one line.

    Raises:
        UserError: the Hub repo's files are neither cached nor downloadable, or the folder has no weights.
    """
    if name.lower().startswith("local-dir:") and pretrained:
        folder = Path(name.partition(":")[2])
        if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")):
            raise UserError(f"--pretrained: {folder} has no model.safetensors (or pytorch_model.bin) beside its config.json")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types for "not here and not reachable"
        kind = type(err).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError", "GatedRepoError",
                    "HfHubHTTPError", "EntryNotFoundError") or isinstance(err, (OSError, ConnectionError)):
            repo = name.partition(":")[2]
            raise UserError(f"--model_name {name}: its config.json{' and weights' if pretrained else ''} are not in the "
                            f"Hugging Face cache and cannot be downloaded ({kind}); on a machine with network run "
                            f"`hf download {repo}`, or use local-dir:FOLDER") from None
        raise
