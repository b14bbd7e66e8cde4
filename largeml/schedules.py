"""Learning-rate schedules, stepped once per optimizer step.

Every schedule takes (optimizer, total_steps, l2) plus its own settings from
`configs/scheduler/*.yaml`, and returns a `LambdaLR` whose factor multiplies `optimizer.lr`. All
accept `warmup_steps`: a linear ramp from lr/warmup_steps up to lr.
"""

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from largeml.errors import ConfigError


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def constant(optimizer: Optimizer, total_steps: int, l2: float, warmup_steps: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))


def cosine(
    optimizer: Optimizer,
    total_steps: int,
    l2: float,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Half a cosine from lr down to min_lr_ratio·lr over the steps after warm-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step(
    optimizer: Optimizer,
    total_steps: int,
    l2: float,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> LambdaLR:
    """Multiplies lr by `gamma` at each milestone, given as a fraction of the total steps."""
    if any(not 0 < m < 1 for m in milestones):
        raise ConfigError(f"scheduler.milestones must be fractions in (0, 1), got {milestones}")
    boundaries = [round(m * total_steps) for m in milestones]

    def factor(step: int) -> float:
        return _warmup(step, warmup_steps) * gamma ** sum(step >= b for b in boundaries)

    return LambdaLR(optimizer, factor)


def pegasos(optimizer: Optimizer, total_steps: int, l2: float, warmup_steps: int = 0) -> LambdaLR:
    """Pegasos' step size 1/(λt) for strongly convex objectives, offset so it starts at lr:

        lr_t = 1 / (λ · (t + t0)),  t0 = 1 / (λ · lr)

    which is lr at t = 0 and 1/(λt) for large t (Bottou's "optimal" rate; scikit-learn's
    SGDClassifier uses the same form). Needs an L2 strength λ > 0.
    """
    if l2 <= 0:
        raise ConfigError(
            "scheduler=pegasos needs L2 regularisation: set regularization.l2 > 0 "
            "or regularization.C"
        )
    lr0 = optimizer.param_groups[0]["lr"]
    return LambdaLR(
        optimizer, lambda step: _warmup(step, warmup_steps) / (1 + l2 * lr0 * step)
    )
