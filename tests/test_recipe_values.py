"""The recipes' arithmetic, by value on fixed tensors: distillation losses (SoftTarget, AT, SP, MGD)
and their gradients into the student, R-Drop, EMA, SWA's average, and the ensemble combinations.

Each expected value is computed here from the published formula with plain tensor operations
(loops, explicit sums), not by calling the code under test a second time.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from utils.core.log import UserError
from utils.infer.ensemble import combine_probs
from utils.models.registry import create_model
from utils.train.distill import AT, MGD, SP, Distiller, SoftTarget
from utils.train.ema import EMA, SWA
from utils.train.losses import RDrop, build_loss


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor | float, b: torch.Tensor | float, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ distillation
def test_soft_target_is_temperature_scaled_kl_of_teacher_to_student() -> None:
    s, t = torch.randn(5, 4, generator=gen(0)) * 3, torch.randn(5, 4, generator=gen(1)) * 3
    for temperature in (1.0, 4.0):
        p_t, p_s = (t / temperature).softmax(1).double(), (s / temperature).softmax(1).double()
        expected = sum(float((p_t[i] * (p_t[i].log() - p_s[i].log())).sum()) for i in range(5)) / 5 * temperature ** 2
        close(SoftTarget(temperature)(s, t, [], []), expected)
    assert float(SoftTarget(4.0)(t, t, [], [])) == pytest.approx(0.0, abs=1e-6)


def features(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = gen(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def test_attention_transfer_matches_its_formula() -> None:
    s = features(0, [(3, 8, 6, 6), (3, 16, 3, 3)])
    t = features(1, [(3, 4, 6, 6), (3, 32, 3, 3)])  # other channel counts, same grids
    per_stride = []
    for fs, ft in zip(s, t):
        total = 0.0
        for i in range(3):
            a_s = (fs[i] ** 2).mean(0).flatten()
            a_t = (ft[i] ** 2).mean(0).flatten()
            total += float(((a_s / a_s.norm() - a_t / a_t.norm()) ** 2).sum())
        per_stride.append(total / (3 * fs.shape[2] * fs.shape[3]))  # mean over images and positions
    close(AT()(None, None, s, t), sum(per_stride) / 2)
    assert float(AT()(None, None, s, [f * 5 for f in s])) == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_similarity_preserving_matches_its_formula() -> None:
    s = features(0, [(4, 8, 5, 5), (4, 16, 3, 3)])
    t = features(1, [(4, 2, 5, 5), (4, 32, 3, 3)])
    per_stride = []
    for fs, ft in zip(s, t):
        g_s = fs.flatten(1) @ fs.flatten(1).t()
        g_t = ft.flatten(1) @ ft.flatten(1).t()
        g_s = torch.stack([row / row.norm() for row in g_s])
        g_t = torch.stack([row / row.norm() for row in g_t])
        per_stride.append(float(((g_s - g_t) ** 2).sum()) / 4 ** 2)
    close(SP()(None, None, s, t), sum(per_stride) / 2)


def test_mgd_matches_its_formula_with_no_and_with_every_pixel_masked() -> None:
    torch.manual_seed(0)
    s = features(0, [(2, 8, 4, 4), (2, 16, 2, 2)])
    t = features(1, [(2, 12, 4, 4), (2, 16, 2, 2)])
    mgd = MGD([8, 16], [12, 16], alpha=0.5)
    assert isinstance(mgd.align[0], nn.Conv2d) and isinstance(mgd.align[1], nn.Identity)

    def expected(masked: bool) -> float:
        total = 0.0
        for align, generate, fs, ft in zip(mgd.align, mgd.generate, s, t):
            x = align(fs)
            x = torch.zeros_like(x) if masked else x
            total += float(((generate(x) - ft) ** 2).sum().detach()) / fs.shape[0]
        return 0.5 * total

    with torch.no_grad():
        mgd.mask_ratio = 0.0  # keep every pixel
        close(mgd(None, None, s, t), expected(False), rtol=1e-4)
        mgd.mask_ratio = 1.0  # mask every pixel: the teacher is regenerated from nothing
        close(mgd(None, None, s, t), expected(True), rtol=1e-4)
        mgd.mask_ratio = 0.65
        torch.manual_seed(1)
        partial = float(mgd(None, None, s, t))
    assert partial not in (pytest.approx(expected(False)), pytest.approx(expected(True)))


@pytest.fixture(scope="module")
def kd_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = create_model("test_resnet", 3).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return create_model("resnet10t", 3), teacher


def student_grads(kd_models: tuple[nn.Module, nn.Module], method: str, ratio: float) -> dict[str, torch.Tensor]:
    """Gradients of the student's parameters under ratio * (the distillation term) alone: the
    classification loss is replaced by 0, so only the KD term can move the student."""
    student, teacher = copy.deepcopy(kd_models[0]), kd_models[1]
    norm = ([0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)  # the same MGD layers and mask for every ratio
    kd = Distiller(lambda logits, targets: logits.sum() * 0.0, student, teacher, method, ratio, 3, norm, norm)
    torch.manual_seed(1)
    loss, _, parts = kd(student, torch.randn(4, 3, 32, 32, generator=gen(2)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert parts["kd_loss"] > 0
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in student.named_parameters()}


@pytest.mark.parametrize("method", ["SoftTarget", "AT", "SP", "MGD"])
def test_the_kd_term_reaches_the_student_gradients(kd_models: tuple[nn.Module, nn.Module], method: str) -> None:
    one, two = student_grads(kd_models, method, 1.0), student_grads(kd_models, method, 2.0)
    # the first convolution is upstream of every hooked feature map and of the logits (inside the
    # blocks, timm zero-initialises the last norm of each residual branch: no gradient there at init)
    stem = one["conv1.0.weight"]
    assert stem.abs().max() > 0, f"{method}: the KD term does not reach the student's first convolution"
    # and it enters scaled by kd_ratio
    for name in one:
        torch.testing.assert_close(two[name], 2 * one[name], rtol=1e-4, atol=1e-4 * float(one[name].abs().max()) + 1e-12)


# --------------------------------------------------------------------------------------- R-Drop
class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_rdrop_is_mean_loss_plus_alpha_times_symmetric_kl() -> None:
    torch.manual_seed(0)
    net = DropoutNet().train()
    x, y = torch.randn(8, 6, generator=gen(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    criterion = build_loss("CrossEntropyLoss", label_smoothing=0.1)
    torch.manual_seed(5)
    loss, logits, parts = RDrop(criterion, alpha=0.3)(net, x, y)
    torch.manual_seed(5)  # the same two dropout masks
    with torch.no_grad():
        first, second = net(x), net(x)
    p, q = first.softmax(1).double(), second.softmax(1).double()
    kl = 0.5 * (float((p * (p.log() - q.log())).sum()) + float((q * (q.log() - p.log())).sum())) / 8
    ce = (criterion(first, y) + criterion(second, y)) / 2
    assert kl > 1e-3  # dropout: the two passes differ
    close(parts["rdrop_kl"], kl)
    close(loss.detach(), float(ce) + 0.3 * kl)
    torch.testing.assert_close(logits, first)

    net.eval()  # no dropout: the passes agree and the consistency term vanishes
    _, _, parts = RDrop(criterion, alpha=0.3)(net, x, y)
    assert float(parts["rdrop_kl"]) == pytest.approx(0.0, abs=1e-7)


def test_rdrop_kl_term_changes_the_gradients() -> None:
    x, y = torch.randn(8, 6, generator=gen(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grads = []
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        net = DropoutNet().train()
        torch.manual_seed(5)
        loss, _, _ = RDrop(build_loss("CrossEntropyLoss"), alpha=alpha)(net, x, y)
        loss.backward()
        grads.append(net.body[0].weight.grad.clone())
    assert (grads[1] - grads[0]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ EMA
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_ema_follows_its_update_rule_with_warmup() -> None:
    """ema_u = d_u * ema_(u-1) + (1 - d_u) * model_u, d_u = min(decay, 1 - u ** -0.75), u = 1, 2 ..."""
    torch.manual_seed(0)
    model = BNNet()
    ema = EMA(model, decay=0.6)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()}
    resumed = None
    for u in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen(u)))
            model.bn.running_mean.add_(float(u))  # a float buffer: averaged too
            model.bn.num_batches_tracked.add_(1)  # an integer buffer: copied
        d = min(0.6, 1 - u ** -0.75)
        ema.update(model)
        if resumed is not None:
            resumed.update(model)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v.double() if v.is_floating_point() else v.double().clone()
        for k, v in ema.module.state_dict().items():
            close(v, expected[k], rtol=1e-5, atol=1e-6)
        if u == 3:  # a resumed run continues the same average
            resumed = EMA(BNNet(), decay=0.6)
            resumed.load_state_dict(ema.state_dict())
    assert ema.updates == 7 and resumed.updates == 7
    assert 1 - 3 ** -0.75 < 0.6 < 1 - 4 ** -0.75  # the warm-up reaches the cap within these steps
    for k, v in resumed.module.state_dict().items():
        torch.testing.assert_close(v, ema.module.state_dict()[k])


# ------------------------------------------------------------------------------------------ SWA
def test_swa_averages_the_epochs_from_its_start_and_not_the_buffers() -> None:
    torch.manual_seed(0)
    model = BNNet()
    swa = SWA(model, start_epoch=1)
    snapshots = []
    for epoch in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen(10 + epoch)))
            model.bn.running_mean.fill_(float(epoch + 1))
        added = swa.end_epoch(model, epoch)
        assert added == (epoch >= 1)
        if added:
            snapshots.append({k: v.clone() for k, v in model.named_parameters()})
    assert swa.count == 3
    for name, value in swa.module.named_parameters():
        close(value, torch.stack([s[name] for s in snapshots]).mean(0))
    for name, value in swa.module.named_buffers():  # not averaged: the last model's, until update_bn recomputes them
        torch.testing.assert_close(value, dict(model.named_buffers())[name])


# ------------------------------------------------------------------------------------ ensembles
def rows(*probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32)


def test_mean_and_weighted_ensembles_by_value() -> None:
    a = rows([0.7, 0.2, 0.1], [0.1, 0.1, 0.8])
    b = rows([0.05, 0.6, 0.35], [0.3, 0.4, 0.3])
    c = rows([0.2, 0.5, 0.3], [0.6, 0.2, 0.2])
    close(combine_probs([a, b, c], "mean"), (a + b + c) / 3)
    close(combine_probs([a, b, c], "weighted", [3, 1, 0]), (3 * a + b) / 4)
    # weights are normalised: only their ratios count
    close(combine_probs([a, b, c], "weighted", [6, 2, 0]), (3 * a + b) / 4)
    close(combine_probs([a, b, c], "weighted", [0.75, 0.25, 0.0]), (3 * a + b) / 4)
    close(combine_probs([a, b, c], "weighted", [1, 1, 1]), combine_probs([a, b, c], "mean"))
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(UserError):
            combine_probs([a, b, c], "weighted", bad)


def test_vote_majority_beats_a_confident_minority() -> None:
    confident = rows([0.9, 0.05, 0.05])
    unsure = rows([0.3, 0.4, 0.3])
    probs = [confident, unsure, unsure.clone()]
    assert int(combine_probs(probs, "mean").argmax()) == 0  # the mean follows the confident model
    vote = torch.as_tensor(combine_probs(probs, "vote"))  # combine_probs works in numpy (no torch in deployment)
    assert int(vote.argmax()) == 1  # two votes of three
    close(vote.sum(), 1.0)
    votes = torch.tensor([[1 / 3, 2 / 3, 0.0]])
    assert (vote - votes).abs().max() < 1 / (3 * 4)  # the vote share, up to a tie-break smaller than one vote
    assert vote[0, 0] > vote[0, 2]  # a vote outweighs any mean probability


def test_vote_tie_is_broken_by_the_mean_probability() -> None:
    a = rows([0.7, 0.2, 0.1], [0.2, 0.3, 0.5])  # image 2: a votes for class 2
    b = rows([0.05, 0.6, 0.35], [0.45, 0.5, 0.05])  # image 2: b votes for class 1
    vote = torch.as_tensor(combine_probs([a, b], "vote"))
    # image 1: one vote each for 0 and 1; the mean is [0.375, 0.4, 0.225]: class 1 (not the most confident model's 0)
    # image 2: one vote each for 2 and 1; the mean is [0.325, 0.4, 0.275]: class 1
    assert vote.argmax(1).tolist() == [1, 1]
    assert vote[0, 0] > vote[0, 2] > 0 and vote[1, 2] > vote[1, 0]  # voted classes above the unvoted one
    close(vote.sum(1), torch.ones(2))
    assert ((vote - torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])).abs() < 1 / (2 * 3)).all()
