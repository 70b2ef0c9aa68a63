"""The names the command line offers, in one torch-free place.

The scripts build their parsers from these, so `--help` (and a mistyped flag) answers at once,
without importing PyTorch. The modules that implement each name import it from here and check
at import that their registry covers exactly these names (utils.losses.LOSSES,
utils.augment.POLICIES, utils.export.EXPORT_FORMATS ...).
"""
from __future__ import annotations

LOSSES = ("CrossEntropyLoss", "FocalLoss", "PolyLoss", "BCEWithLogitsLoss", "AsymmetricLoss")
MULTICLASS_LOSSES = ("CrossEntropyLoss", "FocalLoss", "PolyLoss")   # one softmax over the classes
MULTILABEL_LOSSES = ("BCEWithLogitsLoss", "AsymmetricLoss")         # a sigmoid per class
TASK_TYPES = ("auto", "multiclass", "multilabel")
OPTIMIZERS = ("SGD", "AdamW", "RMSProp")
AUGMENT_POLICIES = ("RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix")
AUGMENT_CHOICES = (*AUGMENT_POLICIES, "none")
MIXUP_CHOICES = ("mixup", "cutmix", "none")
KD_METHODS = ("SoftTarget", "MGD", "SP", "AT")
# --metrice: the validation metric that picks best.pt. mean_acc = balanced_acc (mean recall per
# class); f1 = macro F1; map = mean average precision (multi-label)
METRICS = ("loss", "acc", "mean_acc", "balanced_acc", "f1", "map")
MULTILABEL_METRICS = ("loss", "map", "f1")
SAMPLERS = ("shuffle", "balanced")
CLASS_BALANCE = ("none", "sqrt", "inverse", "effective")
MODEL_TYPES = ("torch", "torchscript", "onnx", "tensorrt", "openvino")
ENSEMBLE_METHODS = ("mean", "vote", "weighted")
CLASSICAL = ("svm", "rf", "knn", "logreg", "mlp")  # classifiers on CNN features (metrice.py --task features)
CAM_TYPES = ("GradCAM", "HiResCAM", "ScoreCAM", "GradCAMPlusPlus", "AblationCAM", "XGradCAM", "EigenCAM", "FullGrad")
EXPORT_NAMES = ("torchscript", "onnx", "openvino", "tensorrt")
DEFAULT_OPSET = 17  # run by onnxruntime >= 1.13, TensorRT >= 8.6 and OpenVINO; the legacy exporter writes up to 20
