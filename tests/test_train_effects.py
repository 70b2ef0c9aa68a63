"""main.py's flags checked by what they do to training, not by args.yaml.

Runs of main.py in subprocesses, as a user runs it (two at a time, a module fixture per pair), read
back through the run folder: train.log, last.pt, best.pt, swa.pt (torch.load(weights_only=True)).
A few flags whose effect is inside the process (--amp's autocast dtype, the batch that
--batch_size -1 picks, --image_channel 1's input) run main.py's command line in this process with
a global forward hook that records what the convolutions see.

Each expected value is worked out here: SWA's average from the epochs' weights, the validation loss
from the weights in last.pt and the named loss (class-weighted with --class_balance), the warm-up
and plateau learning rates from their rules.
"""
from __future__ import annotations

import copy
import csv
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import (TINY_CLASSES, assert_ok, assert_user_error, describe, load_ckpt, make_class_folders, run_inprocess,
                      run_many, train_args)

STEPLR = "lr_scheduler: StepLR\nlr_scheduler_params: {step_size: 1, gamma: 0.8}\nrandom_seed: 0\nplot_train_batch_count: 0\n"
# eps 0: the lr of the static run below is tiny, and the default eps (1e-8) skips smaller reductions
PLATEAU = ("lr_scheduler: ReduceLROnPlateau\nlr_scheduler_params: {mode: min, factor: 0.5, patience: 0, eps: 0.0}\n"
           "random_seed: 0\nplot_train_batch_count: 0\n")
QUIET = "plot_train_batch_count: 0\n"  # the default config, without drawing training batches
# torchvision: a Dropout(0.2) in its classifier (resnet10t has none). Not mnasnet0_5: its best.pt does not
# load back (torchvision MNASNet wants the state_dict version metadata, which the checkpoints drop).
DROPOUT_MODEL = "mobilenet_v3_small"


def read_log(run: Path) -> list[dict[str, str]]:
    with (run / "train.log").open(newline="") as fh:
        return list(csv.DictReader(fh))


def column(run: Path, name: str) -> list[float]:
    return [float(row[name]) for row in read_log(run)]


def bomb_png(path: Path, width: int = 16385, height: int = 16384) -> Path:
    """A PNG whose header claims width x height pixels (just over 268 million), with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------- runs
# Runs in pairs (two at a time on two cores), one module fixture per pair, so that a test (or a
# -k selection) starts only the runs it reads.
@pytest.fixture(scope="module")
def effects_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("effects")
    (root / "steplr.yaml").write_text(STEPLR)
    (root / "plateau.yaml").write_text(PLATEAU)
    (root / "quiet.yaml").write_text(QUIET)
    return root


def run_pair(root: Path, jobs: dict[str, list[str]]) -> dict[str, Any]:
    procs = dict(zip(jobs, run_many([{"script": "main.py", "args": args} for args in jobs.values()])))
    for proc in procs.values():
        assert_ok(proc)
    return {"runs": root / "runs", "procs": procs}


@pytest.fixture(scope="module")
def swa_runs(effects_root: Path, tiny_data: Path) -> dict[str, Any]:
    """SWA over epochs 2 and 3 (--swa_start 0.34 of 3 epochs), and the same run stopped after epoch 2.
    One step per epoch (batch 24 of 24 images): the epochs' batch-norm running statistics stay far
    from the data's, which SWA's recompute fixes."""
    runs = effects_root / "runs"
    common = ("--batch_size", "24", "--metrice", "loss", "--config", effects_root / "steplr.yaml")
    return run_pair(effects_root, {
        "swa": train_args(tiny_data, runs / "swa", *common, "--swa", "--swa_start", "0.34", "--epoch", "3"),
        "swa_ref": train_args(tiny_data, runs / "swa_ref", *common, "--epoch", "2"),
    }) | {"tiny": tiny_data}


@pytest.fixture(scope="module")
def rdrop_runs(effects_root: Path, tiny_data: Path) -> dict[str, Any]:
    runs, quiet = effects_root / "runs", ("--config", effects_root / "quiet.yaml")
    return run_pair(effects_root, {
        "rdrop": train_args(tiny_data, runs / "rdrop", "--rdrop", "--rdrop_alpha", "0.3", *quiet, model=DROPOUT_MODEL),
        "rdrop_alpha0": train_args(tiny_data, runs / "rdrop_alpha0", "--rdrop", "--rdrop_alpha", "0", *quiet, model=DROPOUT_MODEL),
    })


@pytest.fixture(scope="module")
def frozen_runs(effects_root: Path, tiny_data: Path, trained_run: Any) -> dict[str, Any]:
    runs = effects_root / "runs"
    return run_pair(effects_root, {
        "freeze_all": train_args(tiny_data, runs / "freeze_all", "--weight", trained_run.path / "best.pt", "--freeze", "-1",
                                 "--lr", "0.05", "--epoch", "2", "--config", effects_root / "quiet.yaml"),
        # a model that cannot change (body frozen, head lr 1e-30): its val metrics stay the same every epoch
        "static": train_args(tiny_data, runs / "static", "--freeze", "-1", "--lr", "1e-30", "--epoch", "8",
                             "--patience", "3", "--config", effects_root / "plateau.yaml"),
    }) | {"start": trained_run.path / "best.pt"}


@pytest.fixture(scope="module")
def data_runs(effects_root: Path) -> dict[str, Any]:
    """One run for --warmup, --metrice loss and --class_balance, on an imbalanced train set (12/6/3)
    that also holds a decompression bomb; one val batch (16 >= 9 images)."""
    data = effects_root / "imbalanced"
    colours = {c: i for i, c in enumerate(TINY_CLASSES)}
    make_class_folders(data / "train", dict(zip(TINY_CLASSES, (12, 6, 3))), seed=0, colour_of=colours)
    make_class_folders(data / "val", dict(zip(TINY_CLASSES, (3, 3, 3))), seed=1, colour_of=colours)
    bomb_png(data / "train" / "red" / "huge.png")
    runs = effects_root / "runs"
    return run_pair(effects_root, {
        "warmup": train_args(data, runs / "warmup", "--warmup", "--warmup_ratios", "0.5", "--epoch", "4", "--metrice", "loss",
                             "--class_balance", "--batch_size", "16", "--config", effects_root / "quiet.yaml"),
    }) | {"data": data}


# ------------------------------------------------------------------------------------------ SWA
def test_swa_is_the_mean_of_the_epoch_weights(swa_runs: dict) -> None:
    runs = swa_runs["runs"]
    last, ref = load_ckpt(runs / "swa" / "last.pt"), load_ckpt(runs / "swa_ref" / "last.pt")
    assert last["epoch"] == 3 and ref["epoch"] == 2
    averaged = last["train_state"]["swa"]  # torch's AveragedModel state: module.<name> and n_averaged
    assert int(averaged["n_averaged"]) == 2
    swa_pt = load_ckpt(runs / "swa" / "swa.pt")
    assert swa_pt["swa_epochs"] == 2
    params = [k for k, v in ref["model"].items() if v.is_floating_point() and "running_" not in k]
    assert params
    for key in params:
        mean = (ref["model"][key] + last["model"][key]) / 2  # epochs 2 and 3
        torch.testing.assert_close(averaged[f"module.{key}"], mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(swa_pt["model"][key].float(), mean, rtol=2e-3, atol=1e-4)  # stored as float16
    assert any(not torch.equal(ref["model"][k], last["model"][k]) for k in params)  # the two epochs differ


def bn_stats_on(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-norm running statistics recomputed from scratch over one batch of images."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return {k: v for k, v in model.state_dict().items() if "running_" in k}


def test_swa_batch_norm_is_recomputed_on_the_training_data(swa_runs: dict) -> None:
    from utils.core.schema import Checkpoint
    from utils.models.weights import model_from_checkpoint

    swa_pt = load_ckpt(swa_runs["runs"] / "swa" / "swa.pt")
    last = load_ckpt(swa_runs["runs"] / "swa" / "last.pt")
    # the training images as the model saw them (the random 32 px crop of the 35 px resize: centred here)
    files = sorted((swa_runs["tiny"] / "train").rglob("*.png"))
    mean = torch.tensor(swa_pt["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(swa_pt["std"]).view(1, 3, 1, 1) * 255
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((35, 35), Image.BILINEAR))[1:33, 1:33] for f in files])
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - mean) / std
    expected = bn_stats_on(model_from_checkpoint(Checkpoint.from_dict(swa_pt)), images)
    layers = sorted({k.rsplit(".", 1)[0] for k in expected})
    assert len(layers) > 5

    def error(stats: dict[str, torch.Tensor], layer: str) -> float:
        """Distance to the recomputed statistics: means in units of the recomputed std, variances relative."""
        mean, var = expected[f"{layer}.running_mean"], expected[f"{layer}.running_var"]
        return float((stats[f"{layer}.running_mean"].float() - mean).abs().div(var.sqrt()).mean()
                     + (stats[f"{layer}.running_var"].float() - var).abs().div(var).mean())

    stored = {layer: error(swa_pt["model"], layer) for layer in layers}
    epoch = {layer: error(last["model"], layer) for layer in layers}  # running statistics after 3 steps of momentum 0.1
    # not exact: training saw random crops (and the deepest maps are 1x1, from 24 images)
    assert np.median(list(stored.values())) < 0.25, stored
    assert all(stored[layer] < epoch[layer] / 4 for layer in layers), {k: (round(stored[k], 3), round(epoch[k], 3)) for k in layers}


def test_swa_replaces_best_pt_when_better(swa_runs: dict) -> None:
    run = swa_runs["runs"] / "swa"
    proc = swa_runs["procs"]["swa"]
    swa_pt, best, last = load_ckpt(run / "swa.pt"), load_ckpt(run / "best.pt"), load_ckpt(run / "last.pt")
    epochs_best = last["best"]["value"]  # last.pt is written before SWA is scored
    assert min(column(run, "test_loss")) == pytest.approx(epochs_best)
    assert swa_pt["best"]["value"] < epochs_best, "this run was chosen so that SWA scores better than every epoch"
    assert "(better than the best epoch: now best.pt)" in proc.stdout
    assert best.get("swa_epochs") == 2 and best["best"]["value"] == swa_pt["best"]["value"]
    for key, value in swa_pt["model"].items():
        assert torch.equal(best["model"][key], value), key
    assert f"val loss {swa_pt['best']['value']:.4f}" in proc.stdout


# --------------------------------------------------------------------------------------- R-Drop
def test_rdrop_consistency_term_changes_training_on_a_model_with_dropout(rdrop_runs: dict) -> None:
    runs = rdrop_runs["runs"]
    a, b = load_ckpt(runs / "rdrop" / "last.pt")["model"], load_ckpt(runs / "rdrop_alpha0" / "last.pt")["model"]
    # the same seed, data and two forward passes per step: only the KL term (alpha 0.3 vs 0) differs,
    # and it is not 0 only because dropout makes the two passes differ
    different = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert len(different) > len(a) // 4, different


# ---------------------------------------------------------------------------- --freeze -1
def test_freeze_minus_one_trains_only_the_head_in_every_epoch(frozen_runs: dict) -> None:
    run = frozen_runs["runs"] / "freeze_all"
    proc = frozen_runs["procs"]["freeze_all"]
    assert proc.stdout.count("head only") == 2  # both epochs
    before, after = load_ckpt(frozen_runs["start"])["model"], load_ckpt(run / "last.pt")["model"]
    assert load_ckpt(run / "last.pt")["epoch"] == 2
    for key, value in after.items():
        if key in ("fc.weight", "fc.bias"):
            assert not torch.equal(value.half(), before[key]), f"head tensor {key} did not train"
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value.half(), before[key]), f"frozen tensor {key} changed"


# ------------------------------------------------------------ --patience, ReduceLROnPlateau
def test_patience_stops_at_the_right_epoch(frozen_runs: dict) -> None:
    run = frozen_runs["runs"] / "static"
    proc = frozen_runs["procs"]["static"]
    acc = column(run, "test_acc")
    assert len(set(acc)) == 1, "the static model's metric should not change"
    # epoch 1 is the best; epochs 2, 3 and 4 bring nothing: --patience 3 stops after epoch 4 of 8
    assert [int(r["epoch"]) for r in read_log(run)] == [1, 2, 3, 4]
    assert "early stop: no improvement of val acc for 3 epochs" in proc.stdout
    assert load_ckpt(run / "last.pt")["epoch"] == 4 and load_ckpt(run / "best.pt")["epoch"] == 1


def test_plateau_scheduler_halves_the_lr_when_val_loss_stalls(frozen_runs: dict) -> None:
    run = frozen_runs["runs"] / "static"
    losses = column(run, "test_loss")
    assert len(set(losses)) == 1
    # epoch 1: --lr; epoch 2: the first step only records the loss; then every epoch without a lower
    # val loss halves the lr (patience 0, factor 0.5)
    assert column(run, "lr") == pytest.approx([1e-30, 1e-30, 5e-31, 2.5e-31], rel=1e-6, abs=0)  # abs=0: pytest.approx allows 1e-12 by default


# -------------------------------------------------------------------- --warmup, --metrice
def test_warmup_then_cosine_learning_rates(data_runs: dict) -> None:
    lr, low = 1e-3, 1e-6
    # int(0.5 * 4) = 2 warm-up epochs rising from --warmup_minlr, then the cosine decay over the other 2
    expected = [low, low + (lr - low) / 2, lr, low + (lr - low) * (1 + np.cos(np.pi / 2)) / 2]
    assert column(data_runs["runs"] / "warmup", "lr") == pytest.approx(expected, rel=1e-9, abs=0)


def test_metrice_loss_picks_best_pt_by_val_loss(data_runs: dict) -> None:
    run = data_runs["runs"] / "warmup"
    losses, accs = column(run, "test_loss"), column(run, "test_acc")
    best = load_ckpt(run / "best.pt")
    assert best["best"]["metric"] == "loss"
    assert best["epoch"] == int(np.argmin(losses)) + 1
    assert best["best"]["value"] == pytest.approx(min(losses))
    # the run is one where the metrics disagree, so the choice shows
    assert int(np.argmin(losses)) != int(np.argmax(accs)), (losses, accs)


def test_image_over_268_megapixels_is_refused(data_runs: dict) -> None:
    proc = data_runs["procs"]["warmup"]
    lines = [ln for ln in proc.stderr.splitlines() if "huge.png" in ln]
    assert len(lines) == 1 and f"decompression-bomb limit of {16384 * 16384} pixels" in lines[0], describe(proc)
    assert "(21 train images, 3 classes" in proc.stdout  # trained on the others


# ------------------------------------------------------------- the loss and optimizer used
def val_loss(ckpt: Path, val: Path, loss: nn.Module) -> float:
    """The loss of the weights in `ckpt` on the val images, as main.py computes it (one batch)."""
    from utils.data.transforms import eval_transform
    from utils.infer.backends import load_backend

    backend = load_backend(ckpt, device="cpu")  # uint8 batch -> float32 logits
    names = list(backend.meta.class_names)
    files = [(f, names.index(f.parent.name)) for f in sorted(val.rglob("*.png"))]
    transform = eval_transform(backend.meta.preprocess)
    with torch.no_grad():
        logits = backend(torch.stack([transform(Image.open(f).convert("RGB")) for f, _ in files]))
    return float(loss(logits, torch.tensor([t for _, t in files])))


def test_class_balance_weights_the_loss(data_runs: dict) -> None:
    from utils.train.losses import build_loss

    run = data_runs["runs"] / "warmup"
    counts = np.array([12, 6, 3])
    weight = torch.tensor(np.sqrt(counts.sum() / (3 * counts)), dtype=torch.float32)  # sqrt of sklearn's "balanced"
    logged = column(run, "test_loss")[-1]
    val = data_runs["data"] / "val"
    weighted = val_loss(run / "last.pt", val, build_loss("CrossEntropyLoss", 0.1, weight))
    plain = val_loss(run / "last.pt", val, build_loss("CrossEntropyLoss", 0.1))
    assert logged == pytest.approx(weighted, rel=1e-4)
    assert abs(weighted - plain) > 1e-3 and logged != pytest.approx(plain, rel=1e-4)


OPTIMIZER_STATE = {"SGD": {"momentum_buffer"}, "AdamW": {"step", "exp_avg", "exp_avg_sq"},
                   "RMSProp": {"step", "square_avg", "momentum_buffer"}}


@pytest.mark.parametrize("loss_name", ["CrossEntropyLoss", "FocalLoss", "PolyLoss"])
def test_the_named_loss_and_optimizer_are_the_ones_used(trained_runs: dict, tiny_data: Path, loss_name: str) -> None:
    from utils.core.task import MULTICLASS
    from utils.train.losses import build_loss

    run = trained_runs[loss_name]
    last = load_ckpt(run.path / "last.pt")
    state = last["train_state"]["optimizer"]["state"]
    assert state and all(set(s) == OPTIMIZER_STATE[run.optimizer] for s in state.values()), (run.optimizer, set(state[0]))
    group = last["train_state"]["optimizer"]["param_groups"][0]
    if run.optimizer == "SGD":
        assert group["nesterov"] is True and group["momentum"] == 0.9
    # the last epoch's val loss is the named loss of last.pt's weights, and not another loss
    logged = column(run.path, "test_loss")[-1]
    values = {name: val_loss(run.path / "last.pt", tiny_data / "val", build_loss(name, 0.1)) for name in MULTICLASS.losses}
    assert logged == pytest.approx(values[loss_name], rel=1e-4), values
    for other, value in values.items():
        if other != loss_name:
            assert logged != pytest.approx(value, rel=1e-3), (other, values)


# -------------------------------------------------------------- in process: what the model sees
class ConvRecorder:
    """A global forward hook: the input shape and output dtype of every Conv2d call."""

    def __enter__(self) -> "ConvRecorder":
        self.calls: list[tuple[tuple[int, ...], torch.dtype, bool]] = []

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                self.calls.append((tuple(inputs[0].shape), output.dtype, torch.is_grad_enabled()))

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def test_amp_is_bfloat16_autocast_on_cpu_and_batch_size_minus_one_picks_16(tiny_data: Path, tmp_path: Path,
                                                                           trained_run: Any) -> None:
    from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    with ConvRecorder() as rec:
        proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "amp", "--amp", "--batch_size", "-1",
                                                    "--imagenet_meanstd", "--val_path", "none", "--test_path", "none"))
    assert_ok(proc)
    training = [c for c in rec.calls if c[2]]
    assert training and all(dtype == torch.bfloat16 for _, dtype, _ in training), {d for _, d, _ in training}
    assert training[0][0][0] == 16  # the first training batch: 16 of the 24 images
    assert "batch 16" in proc.stdout
    ckpt = load_ckpt(tmp_path / "amp" / "last.pt")
    assert ckpt["args"]["batch_size"] == 16 and ckpt["args"]["amp"] is True
    assert ckpt["mean"] == pytest.approx(list(IMAGENET_MEAN)) and ckpt["std"] == pytest.approx(list(IMAGENET_STD))

    # without --imagenet_meanstd: the train set's (without --amp, float32: test_image_channel_1_trains_on_one_channel)
    assert load_ckpt(trained_run.path / "best.pt")["mean"] != pytest.approx(list(IMAGENET_MEAN), abs=1e-3)


def test_image_channel_1_trains_on_one_channel(tiny_data: Path, tmp_path: Path) -> None:
    with ConvRecorder() as rec:
        proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "gray", "--image_channel", "1", "--test_path", "none"))
    assert_ok(proc)
    assert {dtype for _, dtype, _ in rec.calls} == {torch.float32}  # no --amp: no autocast
    first_convs = [shape for shape, _, _ in rec.calls if shape[1] == 1]
    assert first_convs and all(shape[1:] == (1, 32, 32) for shape in first_convs)
    assert all(shape[1] != 3 for shape, _, _ in rec.calls)  # no RGB input anywhere
    ckpt = load_ckpt(tmp_path / "gray" / "best.pt")
    assert ckpt["image_channel"] == 1 and len(ckpt["mean"]) == 1 and len(ckpt["std"]) == 1
    assert ckpt["model"]["conv1.0.weight"].shape[1] == 1
    from utils.core.schema import Checkpoint
    from utils.models.weights import model_from_checkpoint

    model = model_from_checkpoint(Checkpoint.from_dict(ckpt))
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_channels_last_and_deterministic_reach_the_convolutions(tiny_data: Path, tmp_path: Path) -> None:
    layouts: list[tuple[bool, bool, tuple[int, ...]]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0]
        if isinstance(module, nn.Conv2d) and torch.is_grad_enabled() and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
            nhwc = torch.channels_last
            layouts.append((x.is_contiguous(memory_format=nhwc) and not x.is_contiguous(),
                            module.weight.is_contiguous(memory_format=nhwc)  # a 1x1 kernel is both layouts at once
                            and (module.kernel_size == (1, 1) or not module.weight.is_contiguous()),
                            tuple(x.shape)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "nhwc", "--channels_last", "--deterministic",
                                                    "--test_path", "none"))
        deterministic = torch.are_deterministic_algorithms_enabled()
    finally:
        handle.remove()
        torch.use_deterministic_algorithms(False)  # this process runs the other tests
    assert_ok(proc)
    assert deterministic
    # every training convolution with a real spatial grid: NHWC input (the first one's straight from
    # Normalize) and NHWC weights
    assert layouts and any(shape[1] == 3 for _, _, shape in layouts)
    assert all(x and w for x, w, _ in layouts), [(x, w, shape) for x, w, shape in layouts if not (x and w)][:3]
    from utils.core.schema import Checkpoint
    from utils.models.weights import model_from_checkpoint

    model = model_from_checkpoint(Checkpoint.from_dict(load_ckpt(tmp_path / "nhwc" / "best.pt"))).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the saved weights work in either layout
        torch.testing.assert_close(model(x), model.to(memory_format=torch.channels_last)(x.contiguous(
            memory_format=torch.channels_last)), rtol=1e-4, atol=1e-5)


def test_set_determinism_turns_cudnn_autotuning_off() -> None:
    from utils.train.trainer import set_determinism

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        set_determinism(torch.device("cuda"), False)  # the flags are plain settings: no GPU needed to set them
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        set_determinism(torch.device("cuda"), True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def test_gpu_workers_share_the_cores_among_the_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from utils.core.device import gpu_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [gpu_workers(n) for n in (1, 2, 4, 8, 16)] == [8, 7, 3, 1, 1]  # 16 // n - 1, at most 8, at least 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert gpu_workers(1) == 1


def test_compile_trains_the_same_model_through_dynamo(tiny_data: Path, tmp_path: Path, trained_run: Any) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # the same run as trained_run (CrossEntropyLoss, SGD, 2 epochs), compiled: aot_eager traces the
    # forward and backward graphs as inductor does, without building C++ kernels
    save = tmp_path / "compiled"
    proc = run_inprocess("main.py", *train_args(tiny_data, save, "--loss", "CrossEntropyLoss", "--optimizer", "SGD",
                                                "--epoch", "2", "--compile", "aot_eager"))
    assert_ok(proc)
    assert counters["stats"]["unique_graphs"] >= 1 and counters["aot_autograd"], dict(counters["stats"])
    assert "--compile: torch.compile, backend aot_eager" in proc.stdout
    compiled, plain = load_ckpt(save / "last.pt"), load_ckpt(trained_run.path / "last.pt")
    assert list(compiled["model"]) == list(plain["model"])  # the model's own names: no _orig_mod. prefix
    assert column(save, "loss") == pytest.approx(column(trained_run.path, "loss"), rel=1e-4)
    for name, value in plain["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(compiled["model"][name], value, rtol=1e-3, atol=1e-4)
    torch._dynamo.reset()

    bad = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "bad", "--compile", "nosuchbackend"))
    assert_user_error(bad, "--compile nosuchbackend: unknown backend", "aot_eager")


def test_nan_loss_stops_training_and_keeps_the_last_good_epoch(tiny_data: Path, tmp_path: Path) -> None:
    # epoch 1 trains at --lr 1e-3; the config's StepLR (stepped per epoch) makes epoch 2's lr absurd: the weights blow up
    save = tmp_path / "nan"
    config = tmp_path / "blowup.yaml"
    config.write_text("lr_scheduler: StepLR\nlr_scheduler_params: {step_size: 1, gamma: 1.0e+33}\n")
    proc = run_inprocess("main.py", *train_args(tiny_data, save, "--lr", "1e-3", "--config", config,
                                                "--epoch", "2", "--optimizer", "SGD"))
    line = assert_user_error(proc, "training stopped: loss is", "at epoch 2", "lower --lr")
    assert "nan" in line or "inf" in line
    last, best = load_ckpt(save / "last.pt"), load_ckpt(save / "best.pt")
    assert last["epoch"] == 1 and last["train_state"]["step"] == 0 and best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert [int(r["epoch"]) for r in read_log(save)] == [1]
