"""The names the command line offers, in one torch-free place.

The scripts build their parsers from these, so `--help` (and a mistyped flag) answers at once,
without importing PyTorch. The modules that implement each name import it from here and check
at import that their registry covers exactly these names (utils.data.augment.POLICIES ...). The
model formats are their own table (utils.deploy.formats), and the losses and metrics belong to the
task types (utils.core.task).
"""
from __future__ import annotations

from pathlib import Path

OPTIMIZERS = ("SGD", "AdamW", "RMSProp")  # pytorch-classifier's names (utils.train.optim maps them onto timm's)
# timm.optim.list_optimizers() of timm 1.0.31 (tests/test_ecosystem.py checks it against the installed timm).
# --optimizer takes these and OPTIMIZERS, in any case; utils.train.optim refuses the few that cannot run here.
TIMM_OPTIMIZERS = (
    "adabelief", "adadelta", "adafactor", "adafactorbv", "adafactorbvc", "adagrad", "adahessian", "adam",
    "adamax", "adamc", "adamp", "adamuon", "adamw", "adamwlegacy", "adan", "adanw", "adopt", "adoptc",
    "adoptw", "bnbadam", "bnbadam8bit", "bnbadamw", "bnbadamw8bit", "bnbademamix", "bnbademamix8bit",
    "bnblion", "bnblion8bit", "bnbsgd", "bnbsgd8bit", "cadafactor", "cadafactorbv", "cadafactorbvc", "cadamc",
    "cadamp", "cadamw", "cadan", "cadanw", "cadopt", "cadoptc", "cadoptw", "clamb", "clambw", "claprop",
    "clion", "clionc", "cmars", "cnadamc", "cnadamw", "crmsproptf", "csgdc", "csgdp", "csgdw", "fusedadam",
    "fusedadamw", "fusedlamb", "fusednovograd", "fusedsgd", "kron", "kronc", "kronw", "lamb", "lambc",
    "lambcd", "lambcw", "lambw", "laprop", "lapropc", "larc", "lars", "lion", "lionc", "madgrad", "madgradw",
    "mars", "momentum", "muon", "nadam", "nadamc", "nadamlegacy", "nadamuon", "nadamw", "nesterov",
    "nesterovw", "nlarc", "nlars", "nmuon", "novograd", "novogradc", "novogradw", "radabelief", "radam",
    "radamlegacy", "radamw", "rmsprop", "rmsproptf", "rmsproptfc", "rmsproptfw", "sgd", "sgdc", "sgdp", "sgdw",
)
# The config's lr_scheduler: a torch.optim.lr_scheduler class (stepped per epoch, as pytorch-classifier did) or
# one of timm's schedules (timm.scheduler.create_scheduler_v2, stepped per optimizer update), in any case.
TIMM_SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")
TRACKERS = ("none", "wandb", "mlflow")
CACHE_MODES = ("auto", "ram", "off")  # main.py --cache_images (utils.data.image_cache)
AUGMENT_POLICIES = ("RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix")
AUGMENT_CHOICES = (*AUGMENT_POLICIES, "none")
MIXUP_CHOICES = ("mixup", "cutmix", "none")
KD_METHODS = ("SoftTarget", "MGD", "SP", "AT")
SAMPLERS = ("shuffle", "balanced")
CLASS_BALANCE = ("none", "sqrt", "inverse", "effective")
ENSEMBLE_METHODS = ("mean", "vote", "weighted")
CLASSICAL = ("svm", "rf", "knn", "logreg", "mlp")  # classifiers on CNN features (metrice.py --task features)
CAM_TYPES = ("GradCAM", "HiResCAM", "ScoreCAM", "GradCAMPlusPlus", "AblationCAM", "XGradCAM", "EigenCAM", "FullGrad")
DEFAULT_OPSET = 17  # run by onnxruntime >= 1.13, TensorRT >= 8.6 and OpenVINO; the legacy exporter writes up to 20


# Each script's flags by concern (utils.core.config.group_flags): --help's sections and the docs' table
# sections. A new flag goes into one of its script's groups (tests/test_cli.py checks that none is left out).
FLAG_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "main": {
        "data": ("data", "train_path", "val_path", "test_path", "label_path", "list_sep", "image_column", "label_column",
                 "task_type", "image_size", "image_channel", "resize_mode", "imagenet_meanstd", "workers", "cache_images",
                 "sampler", "shard_buffer"),
        "model": ("model_name", "list_models", "pretrained", "weight"),
        "training": ("epoch", "batch_size", "loss", "optimizer", "lr", "layer_decay", "weight_decay", "momentum",
                     "label_smoothing", "class_balance", "class_balance_beta", "warmup", "warmup_ratios", "warmup_minlr",
                     "metrice", "patience", "kfold", "reject_tpr"),
        "learning-rate finder": ("lr_find", "lr_find_steps", "lr_find_start", "lr_find_end"),
        "recipes": ("Augment", "mixup", "test_tta", "ema", "ema_decay", "rdrop", "rdrop_alpha", "accumulate", "freeze",
                    "clip_grad", "swa", "swa_start", "kd", "teacher_path", "kd_method", "kd_ratio", "kd_temperature"),
        "run and machine": ("config", "save_path", "resume", "save_period", "device", "seed", "deterministic", "amp", "channels_last",
                            "compile", "sync_bn", "tracker", "tracker_project"),
    },
    "metrice": {
        "model": ("save_path", "weight", "model_type", "ensemble", "ensemble_weights"),
        "task": ("task", "visual", "tsne", "classical", "ood_path", "write_fixed_list"),
        "data": ("data", "train_path", "val_path", "test_path", "label_path", "list_sep", "image_column", "label_column", "image_size", "test_tta"),
        "machine": ("device", "half", "batch_size", "workers"),
    },
    "predict": {
        "input": ("source",),
        "model": ("save_path", "weight", "model_type", "ensemble", "ensemble_weights", "classical"),
        "decisions": ("conf_threshold", "reject", "ood_score", "test_tta"),
        "output": ("save_images", "cam_visual", "cam_type", "cam_layer", "cam_class", "feature_maps"),
        "machine": ("device", "half", "batch_size", "workers", "streams"),
    },
    "export": {
        "model": ("save_path", "image_size", "image_channel"),
        "formats": ("export", "list_formats", "dynamic", "batch_size", "simplify", "half", "int8", "opset", "workspace",
                    "push_to_hub"),
        "checks": ("val_path", "train_path", "parity_images", "calibration_images"),
        "output": ("output_path", "device", "verbose"),
    },
    "serve": {
        "model": ("save_path", "model_type", "device", "half", "threads", "conf_threshold", "reject"),
        "batching": ("max_batch", "max_wait_ms"),
        "http": ("host", "port", "api_key", "max_bytes", "max_images", "max_pixels", "max_decode_mb", "timeout",
                 "body_timeout", "access_log"),
        "queue": ("queue", "queue_name", "worker", "heartbeat_s", "max_deliveries"),
    },
    "processing": {
        "data": ("data_path", "sample", "output_path", "label_path", "write_lists", "write_shards", "shard_size", "link",
                 "force"),
        "split": ("val_size", "test_size", "seed", "allow_duplicates_across_splits", "hash_distance", "workers"),
    },
    "audit": {
        "data": ("data_path", "train_path", "val_path", "test_path", "label_path", "list_sep", "image_column", "label_column"),
        "checks": ("hash_distance", "min_size", "max_aspect", "workers"),
        "output": ("save_path", "max_shown"),
    },
}

# Every model name utils.models.registry takes (its all_model_names()), for the check before PyTorch loads;
# the first line names the timm and torchvision it lists (tests/test_cli.py checks it against the installed ones).
MODEL_NAMES_FILE = Path(__file__).with_name("model_names.txt")
MODEL_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm's model sources: a Hub repo, a local folder


def unknown_model_message(name: str, known: list[str]) -> str:
    """The one line for an unknown --model_name: the close names, and where the names are listed."""
    import difflib

    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"unknown --model_name '{name}'{hint} (python main.py --list_models shows the zoo; any timm model name "
            "works too, with a pretrained tag such as resnet18.a1_in1k, or hf-hub:REPO / local-dir:FOLDER)")


def unknown_model_name(name: str) -> str | None:
    """--model_name checked in milliseconds, before PyTorch loads, against MODEL_NAMES_FILE.

    Returns:
        The error line for a name that is no model; None for a known name (a pretrained tag and the
        hf-hub: / local-dir: sources are checked when the model is made), and None when the
        installed timm or torchvision is not the one the file lists (then utils.models.registry
        decides, before the data is scanned).
    """
    from importlib import metadata

    if name.lower().startswith(MODEL_SOURCES):
        return None
    try:
        header, *names = MODEL_NAMES_FILE.read_text(encoding="utf-8").splitlines()
        installed = f"# timm {metadata.version('timm')} torchvision {metadata.version('torchvision')}"
    except (OSError, ValueError, metadata.PackageNotFoundError):
        return None
    if header != installed or name in names or name.split(".", 1)[0] in names:
        return None
    return unknown_model_message(name, names)


def lookup(name: str, names: tuple[str, ...] | list[str]) -> str | None:
    """`name` as spelled in `names`, ignoring case (None if absent): --optimizer lion, lr_scheduler: steplr."""
    folded = {n.lower(): n for n in reversed(names)}  # the first spelling wins (SGD before timm's sgd)
    return folded.get(name.lower())


def optimizer_name(text: str) -> str:
    """argparse type of --optimizer: pytorch-classifier's names and timm's, in any case.

    Raises:
        argparse.ArgumentTypeError: an unknown name, with the close ones.
    """
    import argparse
    import difflib

    found = lookup(text, OPTIMIZERS + TIMM_OPTIMIZERS)
    if found is None:
        close = difflib.get_close_matches(text.lower(), [n.lower() for n in OPTIMIZERS + TIMM_OPTIMIZERS], n=4)
        raise argparse.ArgumentTypeError(f"unknown optimizer '{text}'" + (f" (did you mean {', '.join(close)}?)" if close else "")
                                         + f"; choose {', '.join(OPTIMIZERS)} or one of timm's: {', '.join(TIMM_OPTIMIZERS)}")
    return found
