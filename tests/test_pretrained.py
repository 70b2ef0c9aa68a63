"""--pretrained offline: weights come from the standard caches (made here), or a clear error.

timm reads the Hugging Face hub cache (HF_HUB_CACHE); torchvision reads TORCH_HOME. The tests
write a 1000-class state_dict where each library expects it, so nothing is downloaded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from conftest import TINY_MODEL, assert_ok, assert_user_error, load_ckpt, run_many, train_args
from utils.core.log import UserError
from utils.models.registry import create_model


def fake_hf_cache(cache: Path, model_name: str) -> dict[str, torch.Tensor]:
    """Put a 1000-class state_dict of `model_name` into a Hugging Face cache layout; returns it."""
    from safetensors.torch import save_file

    repo = timm.get_pretrained_cfg(model_name).hf_hub_id  # e.g. timm/resnet10t.c3_in1k
    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model(model_name, num_classes=1000).state_dict().items()}
    commit = hashlib.sha1(repo.encode()).hexdigest()
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    save_file(state, str(repo_dir / "snapshots" / commit / "model.safetensors"))
    return state


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    return cache


def backbone_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.ndim == 4]


def test_timm_pretrained_from_hf_cache(offline_hf: Path) -> None:
    saved = fake_hf_cache(offline_hf, TINY_MODEL)
    model = create_model(TINY_MODEL, num_classes=3, pretrained=True)
    own = model.state_dict()
    keys = backbone_tensors(saved)
    assert keys
    for key in keys:
        assert torch.equal(own[key], saved[key]), key
    assert own["fc.weight"].shape == (3, saved["fc.weight"].shape[1])  # new head for 3 classes


def test_timm_pretrained_missing_is_user_error(offline_hf: Path) -> None:
    with pytest.raises(UserError, match="--weight"):
        create_model(TINY_MODEL, num_classes=3, pretrained=True)


def test_torchvision_pretrained_from_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "shufflenet_v2_x0_5"
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    torch.manual_seed(7)
    saved = torchvision.models.get_model(name, weights=None).state_dict()
    target = tmp_path / "hub" / "checkpoints" / Path(url).name
    target.parent.mkdir(parents=True)
    torch.save(saved, target)

    model = create_model(name, num_classes=3, pretrained=True)
    own = model.state_dict()
    for key in backbone_tensors(saved):
        assert torch.equal(own[key], saved[key]), key
    assert own["fc.weight"].shape[0] == 3


@pytest.fixture(scope="module")
def pretrained_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """main.py --pretrained with the weights in a (fake) HF cache, and with an empty cache."""
    root = tmp_path_factory.mktemp("pretrained")
    cache = root / "hf"
    saved = fake_hf_cache(cache, TINY_MODEL)
    empty = root / "hf_empty"
    empty.mkdir()
    with_cache, without = run_many([
        # lr 1e-30: updates far below a float32 ulp, so best.pt must hold the cached weights exactly
        {"script": "main.py", "env": {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
         "args": train_args(tiny_data, root / "runs" / "cached", "--pretrained", "--lr", "1e-30")},
        {"script": "main.py", "env": {"HF_HUB_CACHE": str(empty), "HF_HUB_OFFLINE": "1"}, "timeout": 60,
         "args": train_args(tiny_data, root / "runs" / "missing", "--pretrained")},
    ])
    return {"root": root, "saved": saved, "with_cache": with_cache, "without": without}


def test_cli_pretrained_loads_cached_weights(pretrained_runs: dict) -> None:
    assert_ok(pretrained_runs["with_cache"])
    best = load_ckpt(pretrained_runs["root"] / "runs" / "cached" / "best.pt")["model"]
    saved = pretrained_runs["saved"]
    for key in backbone_tensors(saved):
        assert torch.equal(best[key], saved[key].half()), key


def test_cli_pretrained_offline_without_weights(pretrained_runs: dict) -> None:
    line = assert_user_error(pretrained_runs["without"], "--weight", TINY_MODEL)
    assert "offline" in line or "cache" in line
