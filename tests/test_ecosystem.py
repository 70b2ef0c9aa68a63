"""The toolkit in its ecosystem: timm's optimizers and schedules, timm/Hub model names, the safetensors
Hub folder, experiment trackers, and the command-line polish (progress bars, help, --version, --seed)."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (REPO, TINY_MODEL, assert_ok, assert_user_error, built_trainer, describe, load_ckpt, make_split_dataset,
                      run_inprocess, run_main_stopped_after, run_many, train_args)
from utils.core.log import UserError
from utils.core.names import OPTIMIZERS, TIMM_OPTIMIZERS, TIMM_SCHEDULERS


# ------------------------------------------------------------------------------- optimizers
def test_timm_optimizer_names_are_timms() -> None:
    import timm.optim

    assert TIMM_OPTIMIZERS == tuple(timm.optim.list_optimizers()), "regenerate utils/names.py TIMM_OPTIMIZERS"


def test_vit_position_embedding_and_class_token_get_no_weight_decay() -> None:
    from utils.models.registry import create_model
    from utils.train.optim import build_optimizer

    model = create_model("test_vit", 3)
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    for layer_decay in (None, 0.75):
        optimizer = build_optimizer(model, "AdamW", 1e-3, 0.05, 0.9, layer_decay)
        decay_of = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert len(decay_of) == len(names)  # every parameter once
        assert decay_of["pos_embed"] == decay_of["cls_token"] == 0.0, layer_decay
        assert decay_of["blocks.0.attn.qkv.weight"] == 0.05 and decay_of["blocks.0.attn.qkv.bias"] == 0.0
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == pytest.approx(1.0)  # --layer_decay: the head learns at the full lr


CLASSIC_TIMM = {"SGD": "sgd", "AdamW": "adamw", "RMSProp": "rmsprop"}


def _cannot_run_here(name: str) -> str:
    """Why an optimizer is refused on this machine ('' if it runs)."""
    import timm.optim

    info = timm.optim.get_optimizer_info(name.lower())
    if info.second_order:
        return "second-order"
    if isinstance(info.opt_class, str) and not torch.cuda.is_available():
        return "CUDA"
    return ""


@pytest.mark.parametrize("name", [*OPTIMIZERS, *TIMM_OPTIMIZERS])
def test_each_optimizer_is_the_named_class_and_runs_one_step(name: str) -> None:
    import timm.optim

    from utils.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(36, 3))
    refused = _cannot_run_here(CLASSIC_TIMM.get(name, name))
    if refused:  # bitsandbytes/APEX without a GPU, adahessian: one clear line, not a traceback
        with pytest.raises(UserError, match="CUDA" if refused == "CUDA" else "second-order"):
            build_optimizer(model, name.upper(), 1e-2, 0.01, 0.9)
        return
    optimizer = build_optimizer(model, name.upper(), 1e-2, 0.01, 0.9)  # any case
    # the class timm registers under that name, with the settings timm gives the name (clion: Lion with caution)
    info = timm.optim.get_optimizer_info(CLASSIC_TIMM.get(name, name))
    assert type(optimizer) is info.opt_class, (name, type(optimizer), info.opt_class)
    if name.lower() not in {n.lower() for n in CLASSIC_TIMM}:  # (pytorch-classifier's names keep their own settings)
        group = optimizer.param_groups[0]
        assert {k: group[k] for k in info.defaults or {} if k in group} == \
            {k: v for k, v in (info.defaults or {}).items() if k in group}, name
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # ADOPT only sets its second moment in the first step
        model(torch.randn(4, 3, 5, 5)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{name} did not move the weights"


def test_optimizer_flag_builds_that_optimizer_for_the_run(monkeypatch: pytest.MonkeyPatch, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    """What main.py builds for --optimizer: timm's Lion for lion, torch's SGD (Nesterov, --momentum) for SGD."""
    import timm.optim

    lion = built_trainer(monkeypatch, *train_args(tiny_data, tmp_path / "lion", "--optimizer", "lion"))
    assert type(lion.optimizer) is timm.optim.Lion
    sgd = built_trainer(monkeypatch, *train_args(tiny_data, tmp_path / "sgd", "--optimizer", "sgd", "--momentum", "0.8"))
    assert type(sgd.optimizer) is torch.optim.SGD
    assert all(g["nesterov"] is True and g["momentum"] == 0.8 for g in sgd.optimizer.param_groups)


def test_optimizer_flag_is_case_insensitive_and_keeps_pytorch_classifier_names() -> None:
    import main

    assert main.parse_args(["--optimizer", "LION"]).optimizer == "lion"
    assert main.parse_args(["--optimizer", "sgd"]).optimizer == "SGD"  # pytorch-classifier's SGD, not timm's
    assert main.parse_args(["--optimizer", "rmsprop"]).optimizer == "RMSProp"
    proc = run_inprocess("main.py", "--optimizer", "lamd")
    assert proc.returncode == 2 and "did you mean lamb" in proc.stderr, describe(proc)


# ------------------------------------------------------------------------------- schedules
def test_warmup_moves_every_step_and_timm_schedules_build() -> None:
    from utils.train.schedule import LRSchedule

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=5.0)

    schedule = LRSchedule(optimizer(), 0.1, 10, warmup=True, warmup_ratios=0.15, min_lr=0.0, steps_per_epoch=4)
    assert schedule.warmup_updates == 6
    lrs = [schedule.start_epoch(0)]
    for step in range(8):
        schedule.after_step()
        lrs.append(schedule.current())
    assert lrs[:7] == pytest.approx([0.1 * u / 6 for u in range(7)])  # one step at a time, across the epoch boundary
    assert lrs[7] < lrs[6]  # then the default cosine decays, per step too
    for name in TIMM_SCHEDULERS:  # every timm name builds, in any case, and steps
        s = LRSchedule(optimizer(), 0.1, 10, warmup=True, scheduler=name.upper(), steps_per_epoch=3,
                       scheduler_params={"decay_epochs": 2} if name in ("step",) else {})
        assert s.timm_scheduler is not None and s.start_epoch(5) > 0
    assert LRSchedule(optimizer(), 0.1, 10, scheduler="steplr", scheduler_params={"step_size": 1}).kind == "torch"
    with pytest.raises(UserError, match="ReduceLROnPlateau"):
        LRSchedule(optimizer(), 0.1, 10, scheduler="plateau")
    with pytest.raises(UserError, match="--warmup"):
        LRSchedule(optimizer(), 0.1, 10, scheduler="cosine", scheduler_params={"warmup_epochs": 3})


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # stepped here without training
def test_layer_decay_scales_each_group_under_a_torch_scheduler(monkeypatch: pytest.MonkeyPatch, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    """--layer_decay 0.75 with the config's StepLR: each layer's lr is the scheduled lr times 0.75 per
    layer below the head, in every epoch (the torch scheduler scales the groups, it does not flatten them)."""
    config = tmp_path / "steplr.yaml"
    config.write_text("lr_scheduler: StepLR\nlr_scheduler_params: {step_size: 1, gamma: 0.5}\nrandom_seed: 0\n"
                      "plot_train_batch_count: 0\n")
    trainer = built_trainer(monkeypatch, *train_args(tiny_data, tmp_path / "run", "--layer_decay", "0.75", "--lr", "0.01",
                                                     "--epoch", "3", "--config", config))
    assert trainer.schedule.torch_scheduler is not None
    groups = trainer.optimizer.param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    depth = len(scales)
    assert depth > 2 and scales == pytest.approx([0.75 ** k for k in reversed(range(depth))])
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of["fc.weight"] == 1.0 and scale_of["conv1.0.weight"] == pytest.approx(0.75 ** (depth - 1))
    for epoch, scheduled in enumerate([0.01, 0.005, 0.0025]):
        assert trainer.schedule.start_epoch(epoch) == pytest.approx(scheduled)
        assert [g["lr"] for g in groups] == pytest.approx([scheduled * g["lr_scale"] for g in groups]), epoch


def test_seed_sets_the_initial_weights(monkeypatch: pytest.MonkeyPatch, tiny_data: Path, tmp_path: Path) -> None:
    """The same --seed builds the same model, bit for bit (the second run takes its mean/std from the
    scan cache); another --seed builds other weights."""
    def first_weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        trainer = built_trainer(monkeypatch, *train_args(tiny_data, tmp_path / name, "--seed", seed))
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    one, again, two = first_weights(1, "one"), first_weights(1, "again"), first_weights(2, "two")
    assert [k for k in one if not torch.equal(one[k], again[k])] == []
    weights = [k for k, v in one.items() if v.is_floating_point() and v.ndim > 1]
    assert weights and [k for k in weights if torch.equal(one[k], two[k])] == []


RESUME_CONFIG = "lr_scheduler: cosine\nlr_scheduler_params: {k_decay: 1.5}\nrandom_seed: 0\nplot_train_batch_count: 0\n"
def test_resume_with_timm_optimizer_and_schedule_is_exact(tmp_path: Path) -> None:
    """lamb + timm's cosine with per-step warm-up: 2 epochs, stopped, resumed for 2 more, is bit-identical
    to 4 epochs straight (same weights, same train.log)."""
    from concurrent.futures import ThreadPoolExecutor

    data = make_split_dataset(tmp_path / "data", ["blue", "green", "red"], train=4, val=1, test=0)  # 12 images
    (tmp_path / "cfg.yaml").write_text(RESUME_CONFIG)

    def args(name: str) -> list[str]:  # batch 4: 3 updates per epoch; warm-up 0.2 x 12 = 2.4 -> 2 updates
        return train_args(data, tmp_path / name, "--config", tmp_path / "cfg.yaml", "--batch_size", "4", "--epoch", "4",
                          "--optimizer", "lamb", "--warmup", "--warmup_ratios", "0.2", "--warmup_minlr", "1e-5")

    with ThreadPoolExecutor(max_workers=1) as pool:
        ref = pool.submit(run_many, [{"script": "main.py", "args": args("ref")}], 1)
        two = run_main_stopped_after(6, args("two"))  # SIGTERM after the last update of epoch 2
        ref = ref.result()[0]
    assert_ok(ref)
    assert "stopped after epoch 2" in two.stdout, describe(two)
    assert load_ckpt(tmp_path / "two" / "last.pt")["epoch"] == 2
    (resumed_proc,) = run_many([{"script": "main.py", "args": ["--save_path", tmp_path / "two", "--resume"]}])
    assert_ok(resumed_proc)
    reference, resumed = load_ckpt(tmp_path / "ref" / "last.pt"), load_ckpt(tmp_path / "two" / "last.pt")
    assert reference["train_state"]["scheduler"]["update"] == resumed["train_state"]["scheduler"]["update"] == 12
    different = [k for k, v in reference["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert (tmp_path / "two" / "train.log").read_text() == (tmp_path / "ref" / "train.log").read_text()
    lrs = [float(line.split(",")[1]) for line in (tmp_path / "ref" / "train.log").read_text().splitlines()[1:]]
    assert lrs[0] == pytest.approx(1e-5) and 1e-3 > lrs[1] > lrs[2] > lrs[3]  # warm-up start, then the cosine


def test_schedule_resumes_mid_epoch_on_the_same_update() -> None:
    """A last.pt written in the middle of an epoch: the restored schedule continues update by update."""
    from utils.train.schedule import LRSchedule

    def fresh() -> tuple[torch.optim.Optimizer, LRSchedule]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        return opt, LRSchedule(opt, 0.1, 5, warmup=True, warmup_ratios=0.3, min_lr=1e-4, scheduler="tanh",
                               steps_per_epoch=4)

    opt, straight = fresh()
    first = straight.start_epoch(1)
    for _ in range(3):
        straight.after_step()
    saved, opt_saved = straight.state_dict(), opt.state_dict()
    expected = []
    for _ in range(5):
        straight.after_step()
        expected.append(straight.current())
    opt2, resumed = fresh()
    opt2.load_state_dict(opt_saved)
    resumed.load_state_dict(saved)
    assert resumed.resume(1, 3) == pytest.approx(first)  # train.log keeps the epoch's first lr
    got = []
    for _ in range(5):
        resumed.after_step()
        got.append(resumed.current())
    assert got == expected and len(set(got)) == 5


# ------------------------------------------------------------------------------ model names
def test_timm_names_with_tags_and_sources() -> None:
    from utils.models.registry import create_model, resolve_name

    model = create_model("resnet18.a1_in1k", 3).eval()  # no pretrained weights needed
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(UserError, match="a1_in1k"):  # an unknown tag lists the real ones
        resolve_name("resnet18.a9_in1k")
    with pytest.raises(UserError) as err:
        resolve_name("resnt18")
    hint = str(err.value).split("did you mean ", 1)[1].split("?")[0].split(", ")
    assert "resnet18" in hint and len(hint) == len(set(hint)), hint  # each name once
    assert resolve_name("hf-hub:timm/resnet18.a1_in1k") == ("timm", "hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(UserError, match="config.json not found"):
        resolve_name("local-dir:/nonexistent/folder")


def test_hub_model_offline_is_one_line(tiny_data: Path, tmp_path: Path) -> None:
    from conftest import run_script

    proc = run_script("main.py", *train_args(tiny_data, tmp_path / "run", "--model_name", "hf-hub:timm/resnet18.a1_in1k"))
    assert_user_error(proc, "hf-hub:timm/resnet18.a1_in1k", "hf download")


# ------------------------------------------------------------------------ safetensors folder
@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
    from utils.deploy.export import ExportOptions, export_checkpoint
    from utils.models.registry import create_model

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(7)  # not main.py's default seed: a run that ignored the folder's weights would not start from them
    model = create_model(TINY_MODEL, 3, 1).eval()  # grayscale: in_chans must travel in config.json
    spec = PreprocessSpec.create(32, 1, [0.4], [0.2], "letterbox")
    meta = ModelMeta(TINY_MODEL, ("cat", "dog", "bird"), spec)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(Checkpoint("best", meta, state, epoch=3).to_dict(), root / "best.pt")
    (info,) = export_checkpoint(root / "best.pt", ExportOptions(formats=["safetensors"], device="cpu", parity_images=4))
    return {"root": root, "model": model, "info": info, "folder": Path(info["path"])}


def test_safetensors_folder_loads_with_timm_create_model(hub_folder: dict) -> None:
    import timm

    folder = hub_folder["folder"]
    assert folder == hub_folder["root"] / "export" / "best_hub"
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == TINY_MODEL and config["num_classes"] == 3
    assert config["label_names"] == ["cat", "dog", "bird"]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.4] and cfg["std"] == [0.2] and cfg["crop_mode"] == "border"
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), hub_folder["model"](x), atol=1e-6)
    assert tuple(timm.data.resolve_data_config({}, model=loaded)["mean"]) == (0.4,)
    # through the format table like every export: checked against the checkpoint, its JSON beside it
    info = hub_folder["info"]
    assert info["model_type"] == "safetensors" and info["parity"]["ok"] and info["parity"]["max_abs_diff"] <= 1e-6
    assert json.loads((folder.parent / "best_hub.json").read_text())["class_names"] == ["cat", "dog", "bird"]


def test_safetensors_folder_runs_as_a_model_of_its_own(hub_folder: dict) -> None:
    """predict.py / metrice.py --weight export/best_hub: the folder is a model format like the others."""
    from utils.infer.backends import load_backend, model_type_of, predict_probs

    folder = hub_folder["folder"]
    assert model_type_of(folder) == "safetensors"
    backend = load_backend(folder, None, "cpu")
    assert backend.meta.class_names == ("cat", "dog", "bird") and backend.meta.preprocess.resize_mode == "letterbox"
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    x = (torch.from_numpy(images).float() / 255 - 0.4) / 0.2
    with torch.no_grad():
        want = hub_folder["model"](x).softmax(1).numpy()
    assert np.allclose(predict_probs(backend, images), want, atol=1e-6)


def test_safetensors_folder_crop_pct_gives_timm_our_resize(tmp_path: Path) -> None:
    """A model that resizes to 25 and crops 14: config.json's crop_pct makes timm resize to 25 too
    (floor(14 / (14 / 25)) is 24), and timm's preprocessing from the folder gives our pixels."""
    import timm
    from PIL import Image

    from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
    from utils.data.transforms import image_transform
    from utils.deploy.export import ExportOptions, export_checkpoint
    from utils.models.registry import create_model

    spec = PreprocessSpec.from_dict({"resize": 25, "crop": 14, "channels": 3, "mean": [0.5, 0.4, 0.3],
                                     "std": [0.25, 0.2, 0.3], "resize_mode": "crop", "interpolation": "bilinear"})
    model = create_model(TINY_MODEL, 3, 3)
    torch.save(Checkpoint("best", ModelMeta(TINY_MODEL, ("a", "b", "c"), spec), dict(model.state_dict())).to_dict(),
               tmp_path / "best.pt")
    (info,) = export_checkpoint(tmp_path / "best.pt", ExportOptions(formats=["safetensors"], device="cpu", parity_images=2))
    cfg = json.loads((Path(info["path"]) / "config.json").read_text())["pretrained_cfg"]
    assert cfg["crop_pct"] == pytest.approx(14 / 25, abs=1e-12) and cfg["input_size"] == [3, 14, 14]
    loaded = timm.create_model(f"local-dir:{info['path']}", pretrained=True)
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=loaded))
    resize = next(t for t in timm_transform.transforms if type(t).__name__ == "Resize")
    assert resize.size == 25, timm_transform
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    ours = image_transform(spec)(image).float() / 255
    ours = (ours - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    assert torch.allclose(timm_transform(image), ours, atol=1e-6)


def test_a_hub_folder_is_replaced_only_when_it_holds_only_export_pys_files(hub_folder: dict, tmp_path: Path) -> None:
    """Exporting again replaces best_hub/ whole, so a file the user put there refuses the export (the
    folder left as it was); and predict.py's results on a Hub folder go beside it, never inside it."""
    from utils.core.log import UserError
    from utils.deploy.export import ExportOptions, export_checkpoint

    shutil.copy(hub_folder["root"] / "best.pt", tmp_path / "best.pt")
    options = ExportOptions(formats=["safetensors"], device="cpu", parity_images=2)
    folder = Path(export_checkpoint(tmp_path / "best.pt", options)[0]["path"])
    (folder / "README.md").write_text("edited", encoding="utf-8")
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match=r"best_hub holds files export.py did not write \(notes.txt\)"):
        export_checkpoint(tmp_path / "best.pt", options)
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine" and (folder / "model.safetensors").is_file()
    (folder / "notes.txt").unlink()
    export_checkpoint(tmp_path / "best.pt", options)  # only its own files: replaced whole
    assert (folder / "README.md").read_text(encoding="utf-8").startswith("---")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best_hub", "best_hub.json"]  # no leftover
    from PIL import Image

    Image.new("L", (32, 32), 90).save(tmp_path / "img.png")
    proc = run_inprocess("predict.py", "--source", tmp_path / "img.png", "--weight", folder, "--device", "cpu")
    assert_ok(proc)
    assert not (folder / "predict").exists() and (folder.parent / "predict" / "exp" / "predictions.csv").is_file()


def test_safetensors_export_refuses_a_model_timm_cannot_build(tmp_path: Path) -> None:
    from utils.core.log import UserError
    from utils.core.schema import Checkpoint, ModelMeta, PreprocessSpec
    from utils.deploy.export import ExportOptions, export_checkpoint
    from utils.models.registry import create_model

    model = create_model("mobilenet_v3_small", 2, 3)  # torchvision's
    meta = ModelMeta("mobilenet_v3_small", ("a", "b"), PreprocessSpec.create(32, 3, [0.5] * 3, [0.25] * 3))
    torch.save(Checkpoint("best", meta, dict(model.state_dict())).to_dict(), tmp_path / "best.pt")
    with pytest.raises(UserError, match="torchvision model, which timm cannot build"):
        export_checkpoint(tmp_path / "best.pt", ExportOptions(formats=["safetensors"], device="cpu"))
    assert not (tmp_path / "export").exists()  # refused before any work


def test_safetensors_folder_trains_again_and_uploads_offline(hub_folder: dict, tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.deploy.hub import push_to_hub

    from safetensors.torch import load_file

    from utils.train.trainer import Trainer

    folder = hub_folder["folder"]
    # local-dir: as --model_name: fine-tune the exported model, starting from its weights with --pretrained
    build, first = Trainer._build_model, {}

    def recorded_build(self: Trainer, pretrained: bool) -> torch.nn.Module:
        model = build(self, pretrained)
        first.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(Trainer, "_build_model", recorded_build)
    proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "again", "--model_name", f"local-dir:{folder}",
                                                "--pretrained", "--image_channel", "1"))
    assert_ok(proc)
    stored = load_file(str(folder / "model.safetensors"))
    assert [k for k in stored if not torch.equal(first[k], stored[k])] == []  # before any step: the folder's weights
    from utils.models.registry import create_model

    torch.manual_seed(0)  # what the run would have started from without them
    random_start = create_model(TINY_MODEL, 3, 1).state_dict()
    assert [k for k, v in stored.items() if v.ndim > 1 and torch.equal(v, random_start[k])] == []

    class FakeApi:  # records what would be sent: nothing leaves the machine
        calls: list = []

        def create_repo(self, repo_id: str, **kw: object) -> object:
            self.calls.append(("create_repo", repo_id, kw))
            return type("Url", (), {"repo_id": "me/" + repo_id.split("/")[-1]})()

        def upload_folder(self, **kw: object) -> object:
            self.calls.append(("upload_folder", kw))
            return type("Commit", (), {"commit_url": "https://hub/me/flowers/commit/1"})()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert push_to_hub(folder, "flowers", api=FakeApi()) == "https://hub/me/flowers/commit/1"
    (_, repo, kw), (_, upload) = FakeApi.calls
    assert repo == "flowers" and kw["exist_ok"] is True
    assert upload["repo_id"] == "me/flowers" and upload["folder_path"] == str(folder) and upload["repo_type"] == "model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # export.py offline: the folder is written, the push says why not
    proc = run_inprocess("export.py", "--save_path", hub_folder["root"] / "best.pt", "--export", "safetensors",
                         "--push_to_hub", "me/flowers", "--device", "cpu")
    assert_user_error(proc, "HF_HUB_OFFLINE", "hf upload me/flowers")
    assert (folder / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------- trackers
@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_tracker_runs_offline_and_writes_its_files(tracker: str, tiny_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(tracker, reason=f"{tracker} is an optional extra (pip install -r requirements/trackers.txt)")
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var))  # nothing in the user's home
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    proc = run_inprocess("main.py", *train_args(tiny_data, run, "--epoch", "2", "--tracker", tracker,
                                                "--tracker_project", "eco"))
    assert_ok(proc)
    assert "train 1" not in proc.stderr  # no progress bar in a captured (non-terminal) stream
    if tracker == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
        (found,) = client.search_runs([client.get_experiment_by_name("eco").experiment_id])
        assert found.data.params["model_name"] == TINY_MODEL and found.data.params["epoch"] == "2"
        assert [m.step for m in client.get_metric_history(found.info.run_id, "val/acc")] == [1, 2]
        assert "test/acc" in found.data.metrics and found.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
        assert {"best.pt", "train.log", "args.yaml"} <= artifacts
    else:
        (offline,) = list((run / "wandb").glob("offline-run-*"))
        (log,) = list(offline.glob("run-*.wandb"))
        data = log.read_bytes()
        for needle in (b"val/acc", b"train/loss", b"test/acc", TINY_MODEL.encode(), b"best.pt"):
            assert needle in data, needle


# ------------------------------------------------------------------------------ command line
def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.core.log import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress(range(3)).disable  # CI logs, redirected output
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not progress(range(3)).disable
    assert progress(range(3), disable=True).disable  # rank > 0
    direct = [f.name for f in sorted(REPO.glob("*.py")) + sorted((REPO / "utils").rglob("*.py"))
              if f.name != "log.py" and "from tqdm import" in f.read_text(encoding="utf-8")]
    assert not direct, f"progress bars outside utils.core.log.progress: {direct}"


SCRIPTS = ("main", "metrice", "predict", "audit", "processing", "export", "serve", "tune")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_each_default_once_and_version(script: str) -> None:
    import importlib

    from utils import __version__
    from utils.core.config import HelpFormatter

    parser = importlib.import_module(script).get_args_parser()
    assert parser.formatter_class is HelpFormatter
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        entry = parser._get_formatter()._get_help_string(action)
        assert entry.count("(default") - entry.count("%(default)") <= 1, entry  # "(default: %(default)s)" is one
    assert "(default: )" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert "(default: [" not in text  # lists print as the command line takes them
    proc = run_inprocess(f"{script}.py", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"pytorch-classifier-ng {__version__}", describe(proc)


def test_seed_flag_wins_over_the_config(tmp_path: Path) -> None:
    import main

    config = tmp_path / "c.yaml"
    config.write_text("random_seed: 3\n")
    assert main.parse_args(["--config", str(config)]).random_seed == 3
    assert main.parse_args(["--config", str(config), "--seed", "11"]).random_seed == 11
    assert main.parse_args([]).random_seed == 0


# ------------------------------------------------------------------------------ requirements
# import name -> the distribution that provides it, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "pytorch_grad_cam": "grad-cam",
                 "python_multipart": "python-multipart", "swagger_ui_bundle": "swagger-ui-bundle",
                 "mlflow": "mlflow-skinny", "starlette": "fastapi"}
NOT_FROM_PYPI = {"tensorrt"}  # NVIDIA's, installed with the GPU stack (README: export.py)


def _requirements(path: Path) -> dict[str, str]:
    """name -> line of a requirements file and the files it includes (-r)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out |= _requirements(path.parent / line[3:].strip())
        elif line:
            name = line.replace(">", "=").replace("<", "=").split("=", 1)[0].strip().lower().replace("_", "-")
            out[name] = line
    return out


def test_every_import_is_declared_in_a_requirements_file() -> None:
    import ast

    optional = ("trackers.txt", "mobile.txt", "mobile-tflite.txt")  # installed beside dev.txt, not by it
    declared = _requirements(REPO / "requirements" / "dev.txt")
    for name in optional:
        declared |= _requirements(REPO / "requirements" / name)
    training = _requirements(REPO / "requirements.txt")
    assert "pytest" not in training and "onnx" not in training and "openvino" not in training  # a lean training install
    assert {"huggingface-hub", "safetensors"} <= set(training)
    assert not {"grad-cam", "albumentations", "tensorboard"} & set(training)  # optional: requirements/extras.txt
    assert declared["albumentations"].endswith(">=1.4.21")  # A.set_random_seed
    files = sorted(REPO.glob("*.py")) + sorted((REPO / "utils").rglob("*.py")) + sorted((REPO / "model").glob("*.py"))
    imported = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("utils", "model", "__future__")}
    third_party -= {f.stem for f in files}  # the scripts import each other (serve -> predict ...)
    missing = sorted(m for m in third_party - NOT_FROM_PYPI
                     if DISTRIBUTIONS.get(m, m).lower().replace("_", "-") not in declared)
    assert not missing, f"imported but not in requirements*.txt: {missing}"


# ------------------------------------------------------------------------------------ README
# The flags, commands and tables of the documentation are checked in tests/test_docs.py; the READMEs
# are the newcomer's page: what it is, the quick start, and a map of docs/.
def _doc_links(path: Path) -> list[str]:
    import re

    return re.findall(r"\]\((docs/[\w./-]+\.md)(?:#[\w-]+)?\)", path.read_text(encoding="utf-8"))


def test_readmes_map_the_same_documentation_pages_and_they_exist() -> None:
    english, chinese = _doc_links(REPO / "README.md"), _doc_links(REPO / "README.zh-CN.md")
    for link in chinese:  # the Chinese README links the Chinese page wherever there is one
        assert link.endswith(".zh.md") or not (REPO / link.replace(".md", ".zh.md")).exists(), f"README.zh-CN.md links {link}"
    chinese = [link.replace(".zh.md", ".md") for link in chinese]
    home = "docs/index.md"  # the site's home page is the README's own text (linked for a section of its own)
    english, chinese = [x for x in english if x != home], [x for x in chinese if x != home]
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md") if not p.name.endswith(".zh.md")} - {home}
    assert set(english) == pages, f"README.md's map of docs/ lacks {sorted(pages - set(english))}, or names a missing page"
    assert set(chinese) == pages, f"README.zh-CN.md's map of docs/ lacks {sorted(pages - set(chinese))}, or names a missing page"
    for readme in ("README.md", "README.zh-CN.md"):
        text = (REPO / readme).read_text(encoding="utf-8")
        assert "make demo" in text and "make test" in text and "make docs" in text, readme
    assert "README.zh-CN.md" in (REPO / "README.md").read_text(encoding="utf-8").split("\n## ", 1)[0]  # linked at the top


def _utils_mentions(text: str) -> list[tuple[str, str, list[str]]]:
    """Every mention of the library in a document, as (what the document says, module, names in it):
    `from utils.x import a, b`, `import utils.x`, a dotted `utils.x.y.name` (module and attributes
    told apart later), and a path `utils/x/y.py` or `utils/x/` (module "", the path as its name)."""
    import re

    found: list[tuple[str, str, list[str]]] = []
    for m in re.finditer(r"^\s*from\s+(utils(?:\.\w+)*)\s+import\s+([\w\s,()]+?)\s*(?:#.*)?$", text, re.M):
        found.append((m.group(0).strip(), m.group(1), [n for n in re.split(r"[\s,()]+", m.group(2)) if n]))
    for m in re.finditer(r"^\s*import\s+(utils(?:\.\w+)*)", text, re.M):
        found.append((m.group(0).strip(), m.group(1), []))
    dotted = re.sub(r"^\s*(from|import)\s+utils\b.*$", "", text, flags=re.M)  # the lines above, once
    for m in re.finditer(r"(?<![\w./-])utils(?:\.\w+)+", dotted):  # not torch.utils.x
        found.append((m.group(0), m.group(0), []))
    for m in re.finditer(r"(?<![\w./-])utils/[\w./-]*", text):
        found.append((m.group(0), "", [m.group(0).rstrip(".")]))
    return found


def _missing_utils_names(mention: tuple[str, str, list[str]]) -> str | None:
    """Why a mention names nothing that exists (None when it does)."""
    import importlib

    said, dotted, names = mention
    if not dotted:  # a path
        return None if (REPO / names[0]).exists() else f"{said}: no such file or folder"
    parts = dotted.split(".")
    # the longest prefix that is a module or package of the checkout; the rest are attributes
    depth = max(i for i in range(1, len(parts) + 1)
                if (REPO / "/".join(parts[:i])).with_suffix(".py").is_file()
                or (REPO / "/".join(parts[:i]) / "__init__.py").is_file())
    obj = importlib.import_module(".".join(parts[:depth]))
    for attr in parts[depth:]:
        if not hasattr(obj, attr):
            hint = "" if depth > 1 else " (a module path from before utils/ became packages?)"
            return f"{said}: {'.'.join(parts[:depth])} has no {attr}{hint}"
        obj = getattr(obj, attr)
    for name in names:
        if not hasattr(obj, name) and not (REPO / dotted.replace(".", "/") / f"{name}.py").is_file():
            return f"{said}: {dotted} has no {name}"
    return None


DOCUMENTS = ["README.md", "README.zh-CN.md"] + sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("readme", DOCUMENTS)
def test_readme_and_docs_name_only_library_modules_and_names_that_exist(readme: str) -> None:
    """A README's or docs page's module paths and imports (utils.a.b, from utils.x import y,
    utils/a/b.py) name what the checkout has: a moved module fails here, not in a reader's notebook."""
    mentions = _utils_mentions((REPO / readme).read_text(encoding="utf-8"))
    missing = [why for why in map(_missing_utils_names, mentions) if why]
    assert not missing, f"{readme} names what utils/ does not have: {missing}"


def test_the_docs_mention_the_library_at_all() -> None:
    """The test above checks something: the pages name the library often, imports included."""
    mentions = [m for page in DOCUMENTS for m in _utils_mentions((REPO / page).read_text(encoding="utf-8"))]
    assert len(mentions) > 100 and sum(m[0].startswith("from utils.") for m in mentions) > 5
