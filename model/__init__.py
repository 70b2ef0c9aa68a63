"""Architectures that timm and torchvision lack, registered into timm's registry.

Importing this package registers them; utils.registry imports it, so every script sees them.
To add one: write model/<name>.py with a function decorated by timm's @register_model that
returns an nn.Module taking num_classes and in_chans (see repvgg.py), and import it below.
"""
from model import repvgg  # noqa: F401
