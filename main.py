"""Train an image classifier on a folder of class folders.

    python main.py --model_name resnet18 --image_size 224 --epoch 50       # dataset/train, val, test
    python main.py --model_name convnext_tiny --pretrained --amp --warmup
    python main.py --save_path runs/exp --resume                           # continue an interrupted run
    python main.py --kfold 5 --save_path runs/cv                           # 5-fold cross-validation (utils.train.kfold)
    python main.py --list_models                                           # the model zoo
    python main.py --lr_find --optimizer SGD                               # learning-rate range test (utils.train.lr_find)

Everything the run writes goes into its own folder (--save_path, incremented if it exists:
runs/exp -> runs/exp2): args.yaml, label.txt, train.log, best.pt, last.pt, plots, TensorBoard.
The library behind it is utils.train.trainer (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.core.config import (
    CONFIG_ONLY_KEYS,
    DEFAULT_CONFIG,
    ArgumentParser,
    finite_float,
    group_flags,
    parse_with_config,
)
from utils.core.device import default_workers
from utils.core.files import check_writable
from utils.core.log import UserError, script_main, settle_heap
from utils.core.names import (
    CACHE_MODES,
    CLASS_BALANCE,
    OPTIMIZERS,
    SAMPLERS,
    TRACKERS,
    optimizer_name,
)
from utils.core.options import Options
from utils.core.run import RunFolder
from utils.core.schema import Checkpoint
from utils.core.task import ALL_LOSSES, ALL_METRICS, MULTICLASS, MULTILABEL, TASK_TYPES
from utils.train.flags import add_lr_find_flags, add_recipe_flags, check_inputs, check_values

# PyTorch and the library behind it are imported in main(): `--help` and a mistyped flag answer at once.

LOGGER = logging.getLogger("main")

# Options a resumed run may change; every other option is the run's own (as pytorch-classifier did).
RESUME_OVERRIDES = ("epoch", "device", "workers", "cache_images", "patience", "compile", "deterministic", "save_period")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Train an image classifier (pytorch-classifier's flags).")
    p = parser.add_argument
    p("--model_name", default="resnet18", help="zoo name (see --list_models), any timm model, or a model/ model")
    p("--list_models", action="store_true", help="print the model zoo and exit")
    p("--pretrained", action="store_true", help="start from ImageNet weights (timm/torchvision caches)")
    p("--weight", default="", help="start from this state_dict or checkpoint (mismatched tensors are skipped)")
    p("--config", default=str(DEFAULT_CONFIG), help="YAML file: flag defaults and lr_scheduler, random_seed ...")
    p("--device", default="", help="'' (GPU if any), cpu, a GPU index such as 0, or mps (Apple silicon)")
    p("--seed", type=int, default=None, help="seed of python, numpy and torch (default: the config's random_seed)")
    p("--tracker", default="none", choices=list(TRACKERS), help="also log to Weights & Biases or MLflow (offline unless WANDB_MODE or MLFLOW_TRACKING_URI say otherwise)")
    p("--tracker_project", default="pytorch-classifier", help="the tracker's project (wandb) or experiment (mlflow)")
    p("--data", default=None, metavar="ROOT", help="dataset root holding train/, val/, test/ and label.txt (timm's "
      "--data-dir): the default of the four paths below; those given win")
    p("--train_path", default="dataset/train", help="training images: <train_path>/<class>/<images>, or a CSV / text list")
    p("--val_path", default="dataset/val", help="validation images (chooses best.pt); may be absent")
    p("--test_path", default="dataset/test", help="test images, evaluated with best.pt when training ends")
    p("--label_path", default="dataset/label.txt", help="class names of numbered class folders or of a list's numeric labels")
    p("--list_sep", default=None, help="separator of text lists given as --train_path etc. (default: any whitespace)")
    p("--image_column", default="image", help="an hf:PATH split's image column (default image, else its one Image column)")
    p("--label_column", default="label", help="an hf:PATH split's label column (ClassLabel, ints, strings, or lists of them)")
    p("--image_size", type=int, default=224, help="model input size in pixels")
    p("--image_channel", type=int, default=3, choices=[1, 3], help="1 = grayscale, 3 = RGB")
    p("--workers", type=int, default=default_workers(), help="data loader processes (0 = main process)")
    p("--cache_images", default="auto", choices=list(CACHE_MODES),
      help="decode and resize each image once and keep it in memory for every epoch: auto (if the set fits in a quarter of the "
           "free memory), ram (as many as fit), off")
    p("--batch_size", type=int, default=64, help="images per step; -1 picks one filling ~80%% of GPU memory")
    p("--epochs", "--epoch", dest="epoch", metavar="N", type=int, default=100, help="epochs to train")
    p("--save_path", default="runs/exp", help="run folder (incremented if it exists, unless --resume)")
    p("--resume", action="store_true", help="continue the run in --save_path from its last.pt")
    p("--save_period", type=int, default=1, metavar="N", help="write last.pt every N epochs (and where training ends "
      "or stops); a crash then resumes up to N epochs back")
    p("--kfold", type=int, default=0, metavar="K",
      help="cross-validation: train K models on K stratified folds of the training set into one run folder (fold1 ... "
           "foldK) and write every training image's out-of-fold probabilities (oof.csv); multiclass; 0 = off")
    p("--loss", default=None, choices=list(ALL_LOSSES), help=f"loss function: {', '.join(MULTICLASS.losses)} (multiclass; "
      f"default {MULTICLASS.losses[0]}), {', '.join(MULTILABEL.losses)} (multilabel; default {MULTILABEL.losses[0]})")
    p("--optimizer", default="AdamW", type=optimizer_name, metavar="NAME",
      help=f"{', '.join(OPTIMIZERS)}, or any timm optimizer (lion, lamb, adamp, sgdp, ...: timm.optim.list_optimizers()); any case")
    p("--layer_decay", type=finite_float, default=None, help="layer-wise lr decay of timm models, e.g. 0.75 (off when not given)")
    p("--lr", type=finite_float, default=1e-3, help="peak learning rate")
    p("--label_smoothing", type=finite_float, default=0.1, help="label smoothing of the loss")
    p("--class_balance", nargs="?", const="sqrt", default="none", choices=list(CLASS_BALANCE),
      help="class weights in the loss against imbalance: sqrt (alone: --class_balance) of the balanced weights, "
           "inverse (the balanced weights), effective (effective number of samples, --class_balance_beta)")
    p("--class_balance_beta", type=finite_float, default=0.999, help="beta of --class_balance effective")
    p("--sampler", default="shuffle", choices=list(SAMPLERS),
      help="training order: shuffle, or balanced (images drawn by inverse class frequency, with replacement)")
    p("--shard_buffer", type=int, default=1000, metavar="N",
      help="a --train_path streamed from URLs: images in each loader worker's shuffle buffer (0: the shards' order)")
    p("--task_type", default="auto", choices=["auto", *TASK_TYPES],
      help="multiclass (one class per image, softmax) or multilabel (any number, a sigmoid per class); auto: "
           "multilabel when a training list gives several labels per image")
    p("--weight_decay", type=finite_float, default=5e-4, help="weight decay (not on biases and norm layers)")
    p("--momentum", type=finite_float, default=0.9, help="momentum of SGD / RMSProp")
    p("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU")
    p("--channels_last", action="store_true", help="model and batches in channels-last memory (faster convolutions on "
      "recent GPUs with --amp)")
    p("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
      help="torch.compile the training model (backend inductor, or one of torch._dynamo.list_backends())")
    p("--deterministic", action="store_true", help="deterministic kernels (CUDA: no cudnn.benchmark autotuning); slower")
    p("--warmup", action="store_true", help="linear learning-rate warm-up, per optimizer step")
    p("--warmup_ratios", type=finite_float, default=0.05, help="fraction of the training steps spent warming up")
    p("--warmup_minlr", type=finite_float, default=1e-6, help="warm-up start lr and the end of the default decay")
    p("--metric", "--metrice", dest="metrice", metavar="METRIC", default=None, choices=list(ALL_METRICS),
      help=f"validation metric that picks best.pt: {', '.join(MULTICLASS.metrics)} (multiclass; default "
           f"{MULTICLASS.metrics[0]}; mean_acc = balanced_acc, f1 = macro F1); {', '.join(MULTILABEL.metrics)} (multilabel; "
           f"default {MULTILABEL.metrics[0]})")
    p("--patience", type=int, default=30, help="stop after this many epochs without improvement (0 = never)")
    p("--imagenet_meanstd", action="store_true", help="normalise with ImageNet's mean/std, not the train set's")
    p("--reject_tpr", type=finite_float, default=0.95, help="share of the val images the unknown-image thresholds keep "
      "known (predict.py --reject)")
    add_recipe_flags(parser)
    p("--lr_find", action="store_true", help="learning-rate range test instead of training: lr_find.png/csv, the lr "
      "suggested and the command to train with it; no weights saved")
    add_lr_find_flags(parser)
    return group_flags(parser, "main")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and validate the options (config file, then command line)."""
    args = parse_with_config(get_args_parser(), argv, CONFIG_ONLY_KEYS | {"custom_augment": []})
    if args.list_models:
        return args
    if args.seed is not None:  # the flag wins over the config's random_seed
        if args.seed < 0:
            raise UserError(f"--seed must be 0 or more, got {args.seed}")
        args.random_seed = args.seed
    check_values(args)
    return Options.of(args)


def resume_options(args: Options) -> tuple[Options, Checkpoint | None]:
    """The options of the run being resumed, with the few a resume may change, and its last.pt (a
    --kfold run: the options in its args.yaml and a checkpoint of a fold, utils.train.kfold)."""
    from utils.core.checkpoint import load_checkpoint
    from utils.train.kfold import kfold_resume_source

    save_path = Path(args.save_path)
    kfold = RunFolder(save_path).is_kfold
    if kfold or args.kfold:
        run_args, ckpt = kfold_resume_source(save_path, args)
    else:
        last = RunFolder(save_path).last
        ckpt = load_checkpoint(last, what="--resume: last checkpoint")
        if ckpt.kind != "last" or ckpt.train_state is None:
            raise UserError(f"{last} holds no training state ({ckpt.kind} checkpoint): it cannot be resumed")
        if ckpt.args.get("fold"):
            raise UserError(f"{save_path} is fold {ckpt.args['fold']} of the --kfold run {save_path.parent}: resume the "
                            f"whole run with --save_path {save_path.parent} --resume")
        run_args = dict(ckpt.args)
    # options added since the run was written take their defaults (a version-1 run has no --sync_bn)
    defaults = {a.dest: a.default for a in get_args_parser()._actions if a.dest not in ("help", "version")}
    saved = defaults | dict(CONFIG_ONLY_KEYS) | run_args
    if isinstance(saved.get("class_balance"), bool):  # runs from before --class_balance took a mode
        saved["class_balance"] = "sqrt" if saved["class_balance"] else "none"
    ignored = sorted(k for k in args.explicit if k not in RESUME_OVERRIDES + ("resume", "save_path", "config"))
    if ignored:
        LOGGER.warning("--resume keeps the run's own options; ignored: %s", ", ".join(f"--{k}" for k in ignored))
    for key in RESUME_OVERRIDES:
        if key in args.explicit:
            saved[key] = getattr(args, key)
    saved.update(resume=True, save_path=str(save_path))
    saved["explicit"] = {k for k in args.explicit if k in RESUME_OVERRIDES}  # what this command line chose
    resumed = Options(saved)
    if not kfold and ckpt.epoch >= resumed.epoch:
        raise UserError(f"{save_path} already trained all {ckpt.epoch} epochs; pass --epoch N (N > {ckpt.epoch}) to train longer")
    return resumed, ckpt


def main(args: Options) -> dict[str, Any]:
    """Train; returns the final metrics (best epoch, best value, test metrics if a test set exists; with
    --kfold the summary of utils.train.kfold.train_kfold)."""
    if args.list_models:
        from utils.models.registry import model_zoo_text

        print(model_zoo_text())
        return {}
    from utils.core import distributed

    distributed.refuse_device_list(args.device)  # a flag's mistake before the paths are looked at
    check_inputs(args)  # paths and the model name: one line now, before PyTorch loads and the data is scanned

    save_path = Path(args.save_path)  # a new run goes beside an existing --save_path; --resume writes into it
    check_writable(save_path.parent if save_path.exists() and not args.resume else save_path, "--save_path")
    resumed = None
    if args.resume:
        args, resumed = resume_options(args)
    try:
        result = train(args, resumed)
    except distributed.LostProcess:
        raise  # not leaving the process group: that would wait for the process that is gone
    except BaseException as err:
        lost = distributed.lost_process_error(err, distributed.resume_command(args.save_path) if args.resume else None)
        if lost is not None:  # (lost before training started)
            raise lost from None
        distributed.shutdown()
        raise
    distributed.shutdown()
    return result


def train(args: Options, resumed: Checkpoint | None,
          on_epoch: Callable[[int, float], bool | None] | None = None) -> dict[str, Any]:
    """One training run (in each process under torchrun); on_epoch: utils.train.trainer.Trainer's (tune.py)."""
    from utils.core import distributed
    from utils.core.device import select_device, share_cpu
    from utils.core.run import claimed_run
    from utils.train.setup import load_data, resolve_options
    from utils.train.trainer import Trainer, seed_everything, set_determinism

    device = distributed.init_from_env(args.device) or select_device(args.device)
    if args.sync_bn and not distributed.launched_by_torchrun():
        LOGGER.warning("--sync_bn applies to runs started with torchrun; ignored in one process")
    elif args.sync_bn and device.type != "cuda":
        raise UserError("--sync_bn synchronises batch norm across GPUs (NCCL); with --device cpu drop it")
    seed_everything(args.random_seed)
    set_determinism(device, args.deterministic)
    data = load_data(args, resumed)
    args = resolve_options(args, data, device)  # the task, loss, metric, loader processes, batch size: fixed from here on
    share_cpu(device, args.workers)
    if args.kfold:  # K runs in one folder: the loop, its resume and its summary are utils.train.kfold's
        from utils.train.kfold import train_kfold

        return train_kfold(args, data, device, resume=bool(args.resume))
    if args.lr_find:  # a range test in a run folder of its own; nothing is trained to keep
        from utils.train.lr_find import lr_find

        return lr_find(args, data, device)
    with claimed_run(args.save_path, fresh=resumed is None) as run:
        trainer = Trainer(args, data, run, device, resumed, on_epoch)
    settle_heap()  # the libraries, data and model: out of the collector's walks from here on
    try:
        result = trainer.fit()
        test = trainer.test_best()
        if test is not None:
            result["test"] = test
        trainer.write_results(result, test)  # results.json, results.png
    except BaseException as err:
        trainer.close_tracker()
        lost = distributed.lost_process_error(err, trainer.resume_command())
        if lost is not None:
            raise lost from None
        raise
    trainer.close_tracker(result)
    print(f"done: {run.path}", flush=True)
    return result


if __name__ == "__main__":
    script_main(main, parse_args)
