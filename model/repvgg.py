"""RepVGG-B1g2 (Ding et al., 2021): the one RepVGG variant of pytorch-classifier that timm lacks.

Built from timm's ByobNet, like timm's own RepVGG variants, so `reparameterize` (deploy form),
feature extraction and timm's tools work on it. No ImageNet weights are published for it in timm.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg


def _repvgg_stages(depths: tuple[int, ...], widths: tuple[int, ...], groups: int) -> tuple[ByoBlockCfg, ...]:
    """RepVGG stages; every second block of a stage uses grouped convolution when groups > 0."""

    def group_size(channels: int, block_index: int) -> int:
        return channels // groups if groups and (block_index + 1) % 2 == 0 else 0

    return tuple(ByoBlockCfg(type="rep", d=d, c=c, gs=group_size) for d, c in zip(depths, widths))


REPVGG_B1G2 = ByoModelCfg(
    blocks=_repvgg_stages((4, 6, 16, 1), (128, 256, 512, 2048), groups=2),
    stem_type="rep",
    stem_chs=64,
)

# Read by @register_model: input size and layer names (no weight file: url is empty).
default_cfgs = generate_default_cfgs({
    "repvgg_b1g2": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": ("stem.conv_kxk.conv", "stem.conv_1x1.conv"), "classifier": "head.fc",
    },
})


@register_model
def repvgg_b1g2(pretrained: bool = False, **kwargs: Any) -> ByobNet:
    """RepVGG-B1g2: B1 widths with 2-group convolutions in every second block."""
    return build_model_with_cfg(
        ByobNet, "repvgg_b1g2", pretrained, model_cfg=REPVGG_B1G2, feature_cfg=dict(flatten_sequential=True), **kwargs
    )
