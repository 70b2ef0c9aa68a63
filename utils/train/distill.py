"""Knowledge distillation (--kd): a training objective that owns a frozen teacher.

    loss = criterion(student(x), y) + kd_ratio * kd_loss

The teacher is another run's best.pt (any architecture or size, the same classes), frozen and in
eval mode. SoftTarget matches the logits; AT and SP match the feature maps at strides 4, 8, 16 and
32, taken with forward hooks (utils.models.features.feature_taps), so no model file needs editing; MGD
regenerates the teacher's last two stages from masked student features through small learnable
layers, which join the optimizer and the checkpoints.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.core.checkpoint import load_checkpoint
from utils.core.log import UserError
from utils.core.names import KD_METHODS
from utils.core.run import RunFolder
from utils.core.schema import Checkpoint
from utils.models.features import FeatureRecorder, feature_taps
from utils.models.weights import model_from_checkpoint

LOGGER = logging.getLogger(__name__)

STRIDES = (4, 8, 16, 32)


class SoftTarget(nn.Module):
    """Hinton et al. (2015): KL(teacher || student) of temperature-softened predictions, times T^2.

    Multi-label models: the per-class Bernoulli KL of the temperature-softened sigmoids (each class
    is its own two-way distribution), averaged over classes, times T^2.
    """

    def __init__(self, temperature: float = 4.0, multilabel: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.multilabel = multilabel

    def forward(self, s_logits: torch.Tensor, t_logits: torch.Tensor, s_feats: list, t_feats: list) -> torch.Tensor:
        t = self.temperature
        if self.multilabel:
            s, q = s_logits.float() / t, t_logits.float() / t
            p = torch.sigmoid(q)
            kl = p * (F.logsigmoid(q) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-q) - F.logsigmoid(-s))
            return kl.mean() * t * t
        return F.kl_div(F.log_softmax(s_logits.float() / t, dim=1), F.log_softmax(t_logits.float() / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t


class AT(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, 2017): match the normalised spatial maps of
    squared activations, summed over channels, at each stride (channel counts may differ)."""

    @staticmethod
    def attention(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float().pow(2).mean(dim=1).flatten(1), dim=1)

    def forward(self, s_logits: torch.Tensor, t_logits: torch.Tensor, s_feats: list, t_feats: list) -> torch.Tensor:
        return sum((self.attention(s) - self.attention(t)).pow(2).mean() for s, t in zip(s_feats, t_feats)) / len(s_feats)


class SP(nn.Module):
    """Similarity-preserving distillation (Tung & Mori, 2019): match the batch's pairwise
    similarity matrices of the feature maps at each stride."""

    @staticmethod
    def similarity(f: torch.Tensor) -> torch.Tensor:
        f = f.float().flatten(1)
        return F.normalize(f @ f.t(), dim=1)

    def forward(self, s_logits: torch.Tensor, t_logits: torch.Tensor, s_feats: list, t_feats: list) -> torch.Tensor:
        n = s_feats[0].shape[0]
        return sum((self.similarity(s) - self.similarity(t)).pow(2).sum() / (n * n) for s, t in zip(s_feats, t_feats)) / len(s_feats)


class MGD(nn.Module):
    """Masked generative distillation (Yang et al., 2022): mask random pixels of the (channel-
    aligned) student map and regenerate the teacher's map from it with conv-ReLU-conv.

    Args:
        s_channels: student channels per stage used.
        t_channels: teacher channels per stage used.
        alpha: loss weight (the paper's alpha_mgd).
        mask_ratio: fraction of pixels masked (the paper's lambda_mgd).
    """

    def __init__(self, s_channels: list[int], t_channels: list[int], alpha: float = 2e-5, mask_ratio: float = 0.65) -> None:
        super().__init__()
        self.alpha = alpha
        self.mask_ratio = mask_ratio
        self.align = nn.ModuleList(nn.Conv2d(s, t, 1) if s != t else nn.Identity() for s, t in zip(s_channels, t_channels))
        self.generate = nn.ModuleList(
            nn.Sequential(nn.Conv2d(t, t, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 3, padding=1)) for t in t_channels)

    def forward(self, s_logits: torch.Tensor, t_logits: torch.Tensor, s_feats: list, t_feats: list) -> torch.Tensor:
        total = s_feats[0].new_zeros((), dtype=torch.float32)
        for align, generate, s, t in zip(self.align, self.generate, s_feats, t_feats):
            s = align(s)
            keep = (torch.rand(s.shape[0], 1, s.shape[2], s.shape[3], device=s.device) >= self.mask_ratio).to(s.dtype)
            total = total + F.mse_loss(generate(s * keep).float(), t.float(), reduction="sum") / s.shape[0]
        return total * self.alpha


class Distiller(nn.Module):
    """The distillation objective: owns the teacher, the feature hooks and the method's layers.

    Args:
        criterion: the student's classification loss.
        student: the model being trained (hooks are placed on it).
        teacher: the frozen teacher.
        method: SoftTarget, MGD, SP or AT.
        ratio: weight of the distillation term (--kd_ratio).
        in_chans: input channels (for the probe pass that finds the feature maps).
        student_norm: (mean, std) the student's inputs are normalised with.
        teacher_norm: (mean, std) the teacher was trained with.
        temperature: SoftTarget temperature.
    """

    def __init__(self, criterion: nn.Module, student: nn.Module, teacher: nn.Module, method: str, ratio: float,
                 in_chans: int, student_norm: tuple[list[float], list[float]], teacher_norm: tuple[list[float], list[float]],
                 temperature: float = 4.0, multilabel: bool = False) -> None:
        super().__init__()
        if method not in KD_METHODS:
            raise UserError(f"unknown --kd_method '{method}'; choose one of {', '.join(KD_METHODS)}")
        self.criterion = criterion
        self.teacher = [teacher]  # a list keeps the teacher out of this module's parameters and state_dict
        self.method_name = method
        self.ratio = ratio
        # student inputs are normalised with the student's mean/std; the teacher expects its own
        s_mean, s_std = (torch.tensor(v).view(1, -1, 1, 1) for v in student_norm)
        t_mean, t_std = (torch.tensor(v).view(1, -1, 1, 1) for v in teacher_norm)
        self.register_buffer("t_scale", s_std / t_std)
        self.register_buffer("t_shift", (s_mean - t_mean) / t_std)
        self.student_rec = self.teacher_rec = None
        if method == "SoftTarget":
            self.method: nn.Module = SoftTarget(temperature, multilabel)
            return
        s_taps, t_taps = feature_taps(student, in_chans), feature_taps(teacher, in_chans)
        common = [s for s in STRIDES if s in s_taps and s in t_taps]
        s_shapes = self._shapes(student, in_chans, [s_taps[s] for s in common])
        t_shapes = self._shapes(teacher, in_chans, [t_taps[s] for s in common])
        # only real feature maps (N, C, H, W) of the same size in both models (transformer tokens are not)
        strides = [s for s, a, b in zip(common, s_shapes, t_shapes) if len(a) == 4 and len(b) == 4 and a[2:] == b[2:]]
        if method == "MGD":
            strides = strides[-2:]
        if not strides:
            raise UserError(f"--kd_method {method} needs feature maps at strides {STRIDES} in both models; found "
                            f"student {sorted(s_taps)}, teacher {sorted(t_taps)} (transformers have none): use --kd_method SoftTarget")
        LOGGER.info("--kd %s: student maps %s, teacher maps %s", method, [s_taps[s] for s in strides], [t_taps[s] for s in strides])
        self.student_rec = FeatureRecorder(student, [s_taps[s] for s in strides])
        self.teacher_rec = FeatureRecorder(teacher, [t_taps[s] for s in strides])
        if method == "MGD":
            pick = [common.index(s) for s in strides]
            self.method = MGD([s_shapes[i][1] for i in pick], [t_shapes[i][1] for i in pick])
        else:
            self.method = AT() if method == "AT" else SP()

    @staticmethod
    @torch.no_grad()
    def _shapes(model: nn.Module, in_chans: int, names: list[str]) -> list[tuple[int, ...]]:
        """Output shapes of the named modules for a 64x64 input."""
        recorder = FeatureRecorder(model, names)
        was_training = model.training
        try:
            model.eval()
            model(torch.zeros(1, in_chans, 64, 64, device=next(model.parameters()).device))
            return [tuple(f.shape) for f in recorder.features()]
        finally:
            recorder.remove()
            model.train(was_training)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(images)
        s_feats = self.student_rec.features() if self.student_rec else []
        with torch.no_grad():
            t_logits = self.teacher[0](images * self.t_scale + self.t_shift)
            t_feats = [f.detach() for f in self.teacher_rec.features()] if self.teacher_rec else []
        kd = self.method(logits, t_logits, s_feats, t_feats)
        return self.criterion(logits, targets) + self.ratio * kd, logits, {"kd_loss": kd.detach()}


def load_teacher(teacher_path: str | Path, class_names: list[str], image_channel: int, device: torch.device,
                 task: str = "multiclass") -> tuple[nn.Module, Checkpoint]:
    """The teacher model of another run (its best.pt), frozen and in eval mode.

    Returns:
        (teacher, its checkpoint)
    """
    if not teacher_path:
        raise UserError("--kd needs --teacher_path RUN_FOLDER (a run of main.py whose best.pt is the teacher)")
    path = Path(teacher_path)
    ckpt = load_checkpoint(RunFolder.checkpoint(path, "--teacher_path"), what="--teacher_path")
    meta = ckpt.meta
    if list(meta.class_names) != list(class_names):
        raise UserError(f"--teacher_path {teacher_path} was trained on other classes ({meta.num_classes}) than this "
                        f"train set ({len(class_names)}), or in another order: the teacher must know the same classes")
    if meta.task != task:
        raise UserError(f"--teacher_path {teacher_path} is a {meta.task} model and this run is {task}: the teacher "
                        "must predict the same way (one class per image, or several labels)")
    if meta.image_channel != image_channel:
        raise UserError(f"--teacher_path {teacher_path} takes {meta.image_channel}-channel images, the student "
                        f"{image_channel}: train both with the same --image_channel")
    teacher = model_from_checkpoint(ckpt).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, ckpt
