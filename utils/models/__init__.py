"""Networks: model names to timm / torchvision / model/ architectures, weights into models
(checkpoints, --weight files, pretrained caches), penultimate features and feature taps.
"""
