"""The names the command line offers, in one torch-free place.

The scripts build their parsers from these, so `--help` (and a mistyped flag) answers at once,
without importing PyTorch. The modules that implement each name import it from here and check
at import that their registry covers exactly these names (utils.data.augment.POLICIES ...). The
model formats are their own table (utils.deploy.formats), and the losses and metrics belong to the
task types (utils.core.task).
"""
from __future__ import annotations

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
