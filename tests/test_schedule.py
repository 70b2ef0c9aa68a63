"""utils.train.schedule.LRSchedule: warm-up, the default cosine decay, a config scheduler, bad names."""
from __future__ import annotations

import pytest
import torch

from utils.core.log import UserError
from utils.train.schedule import LRSchedule

LR, MIN_LR = 0.1, 1e-4
# schedules are stepped here without training steps in between: torch warns about the order
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=123.0)


def lrs(schedule: LRSchedule, epochs: int) -> list[float]:
    return [schedule.start_epoch(e) for e in range(epochs)]


def test_warmup_rises_linearly_from_min_lr_to_lr() -> None:
    values = lrs(LRSchedule(optimizer(), LR, 20, warmup=True, warmup_ratios=0.25, min_lr=MIN_LR), 20)
    assert values[:6] == pytest.approx([MIN_LR + (LR - MIN_LR) * e / 5 for e in range(5)] + [LR])
    assert values[0] == pytest.approx(MIN_LR)


def test_default_cosine_decays_to_near_min_lr() -> None:
    values = lrs(LRSchedule(optimizer(), LR, 50, min_lr=MIN_LR), 50)
    assert values[0] == pytest.approx(LR)
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing
    assert MIN_LR < values[-1] < MIN_LR + 0.01 * LR
    assert values[25] == pytest.approx((LR + MIN_LR) / 2)  # cosine: half-way at half-time


def test_schedule_sets_the_optimizer_lr() -> None:
    opt = optimizer()
    schedule = LRSchedule(opt, LR, 10, min_lr=MIN_LR)
    value = schedule.start_epoch(3)
    assert opt.param_groups[0]["lr"] == value == schedule.current()


def test_config_step_lr_follows_warmup() -> None:
    schedule = LRSchedule(optimizer(), LR, 10, warmup=True, warmup_ratios=0.2, min_lr=MIN_LR,
                       scheduler="StepLR", scheduler_params={"step_size": 1, "gamma": 0.5})
    values = lrs(schedule, 6)
    assert values == pytest.approx([MIN_LR, (MIN_LR + LR) / 2, LR, LR / 2, LR / 4, LR / 8])


def test_config_scheduler_does_not_depend_on_epoch_count() -> None:
    def run(epochs: int) -> list[float]:
        return lrs(LRSchedule(optimizer(), LR, epochs, scheduler="StepLR", scheduler_params={"step_size": 2, "gamma": 0.1}), 4)

    assert run(4) == run(40) == pytest.approx([LR, LR, LR * 0.1, LR * 0.1])


def test_state_dict_round_trip_continues_the_schedule() -> None:
    params = {"step_size": 1, "gamma": 0.5}
    first = LRSchedule(optimizer(), LR, 10, scheduler="StepLR", scheduler_params=params)
    full = lrs(first, 5)
    opt = optimizer()
    part = LRSchedule(opt, LR, 10, scheduler="StepLR", scheduler_params=params)
    lrs(part, 3)
    state, opt_state = part.state_dict(), opt.state_dict()
    opt2 = optimizer()
    resumed = LRSchedule(opt2, LR, 10, scheduler="StepLR", scheduler_params=params)
    opt2.load_state_dict(opt_state)
    resumed.load_state_dict(state)
    assert [resumed.start_epoch(e) for e in (3, 4)] == pytest.approx(full[3:])


def test_unknown_scheduler_is_user_error() -> None:
    with pytest.raises(UserError, match="StepLR"):  # the message lists the known ones
        LRSchedule(optimizer(), LR, 10, scheduler="StepLRR")
    with pytest.raises(UserError, match="step_size"):
        LRSchedule(optimizer(), LR, 10, scheduler="StepLR", scheduler_params={"stepsize": 1})
