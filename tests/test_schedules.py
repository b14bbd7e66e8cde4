"""Learning-rate schedules, read back from the optimizer before each step."""

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from largeml import schedules
from largeml.errors import ConfigError

pytestmark = pytest.mark.unit

LR = 0.1


def _optimizer(lr: float = LR) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, n: int) -> list[float]:
    """The lr used by each of the first n optimizer steps."""
    seen = []
    for _ in range(n):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_constant_with_warmup() -> None:
    opt = _optimizer()
    lrs = _lrs(opt, schedules.constant(opt, total_steps=20, l2=0.0, warmup_steps=4), 10)
    assert lrs == pytest.approx([0.025, 0.05, 0.075] + [0.1] * 7)


def test_constant_without_warmup() -> None:
    opt = _optimizer()
    assert _lrs(opt, schedules.constant(opt, total_steps=5, l2=0.0), 5) == pytest.approx([LR] * 5)


def test_cosine_from_lr_to_min_ratio() -> None:
    opt = _optimizer()
    lrs = _lrs(opt, schedules.cosine(opt, total_steps=100, l2=0.0, min_lr_ratio=0.1), 101)
    assert lrs[0] == pytest.approx(LR)
    assert lrs[50] == pytest.approx(0.1 * LR + 0.9 * LR / 2)
    assert lrs[100] == pytest.approx(0.1 * LR)
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_cosine_half_way_is_half_lr() -> None:
    opt = _optimizer()
    lrs = _lrs(opt, schedules.cosine(opt, total_steps=100, l2=0.0), 101)
    assert lrs[50] == pytest.approx(LR / 2)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)


def test_step_milestones() -> None:
    opt = _optimizer()
    sched = schedules.step(opt, total_steps=100, l2=0.0, milestones=(0.5, 0.75), gamma=0.1)
    lrs = _lrs(opt, sched, 100)
    assert lrs[:50] == pytest.approx([0.1] * 50)
    assert lrs[50:75] == pytest.approx([0.01] * 25)
    assert lrs[75:] == pytest.approx([0.001] * 25)


def test_step_rejects_milestone_outside_unit_interval() -> None:
    with pytest.raises(ConfigError, match="scheduler.milestones"):
        schedules.step(_optimizer(), total_steps=100, l2=0.0, milestones=(0.5, 1.5))


def test_pegasos_is_one_over_lambda_t() -> None:
    l2, lr0 = 0.01, 0.5
    opt = _optimizer(lr0)
    lrs = _lrs(opt, schedules.pegasos(opt, total_steps=1000, l2=l2), 1001)
    t0 = 1 / (l2 * lr0)  # 200
    for t in (0, 1, 10, 200, 1000):
        assert lrs[t] == pytest.approx(1 / (l2 * (t + t0)))
    assert lrs[0] == pytest.approx(lr0)
    assert lrs[200] == pytest.approx(lr0 / 2)


def test_pegasos_needs_l2() -> None:
    with pytest.raises(ConfigError, match="regularization.l2"):
        schedules.pegasos(_optimizer(), total_steps=10, l2=0.0)
