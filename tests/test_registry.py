"""The model zoo: every family builds and runs, names resolve, in_chans=1, model/ architectures.

The smallest member of each family is built first; the `zoo`-marked test (in `make test`; alone: `make test-zoo`)
builds every pytorch-classifier name.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_ok, run_script
from utils.core.log import UserError
from utils.models.registry import ZOO, ZOO_FAMILIES, create_model, resolve_name

SMALLEST = {family: members[0][0] for family, members in ZOO_FAMILIES.items()}


def forward_32(model: nn.Module, in_chans: int = 3) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, in_chans, 32, 32, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", list(SMALLEST.values()), ids=list(SMALLEST))
def test_smallest_of_each_family_builds_and_runs(name: str) -> None:
    model = create_model(name, num_classes=3)
    out = forward_32(model)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    assert model.toolkit_source == ZOO[name][0]


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_name_builds_and_runs(name: str) -> None:
    model = create_model(name, num_classes=3)
    out = forward_32(model)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5"])  # timm, torchvision
def test_single_channel_input(name: str) -> None:
    model = create_model(name, num_classes=3, in_chans=1)
    assert first_conv(model).in_channels == 1
    out = forward_32(model, in_chans=1)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_torchvision_head_is_replaced() -> None:
    model = create_model("efficientnet_b0", num_classes=5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 5


def test_zoo_names_map_to_timm_and_torchvision() -> None:
    assert resolve_name("RepVGG-A0") == ("timm", "repvgg_a0")
    assert resolve_name("repghostnet_0_58x") == ("timm", "repghostnet_058")
    assert resolve_name("shufflenet_v2_x1_0") == ("torchvision", "shufflenet_v2_x1_0")
    assert resolve_name("resnet10t") == ("timm", "resnet10t")  # any timm name
    assert resolve_name("squeezenet1_0") == ("torchvision", "squeezenet1_0")  # any torchvision name


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(UserError) as err:
        create_model("resnet19", num_classes=3)
    message = str(err.value)
    assert "resnet19" in message and "did you mean" in message and "resnet18" in message


def test_repvgg_b1g2_from_model_folder() -> None:
    model = create_model("RepVGG-B1g2", num_classes=3)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 2]
    assert grouped, "RepVGG-B1g2 has 2-group convolutions"
    out = forward_32(model)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_list_models_prints_the_zoo() -> None:
    proc = run_script("main.py", "--list_models")
    assert_ok(proc)
    for name, (source, impl) in ZOO.items():
        assert name in proc.stdout and f"{source}:{impl}" in proc.stdout
    for family in ZOO_FAMILIES:
        assert family in proc.stdout
