"""The objective module and the full-batch solvers against independent float64 computations:
f itself, its gradient, Hessian products, the Hessian's diagonal and whole, the line search's
φ(t), and Newton's answer against a float64 optimum."""

import functools

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian

from largeml import losses
from largeml.models import Linear
from largeml.objective import FullBatch, value
from largeml.solvers import Newton

pytestmark = pytest.mark.unit

N, D, LAM = 300, 6, 0.05


def problem(sparse: bool, scaled: bool, seed: int = 0):
    """A small model at a random point and its data, as float32 (dense or CSR)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) * torch.tensor([1, 2, 0.5, 3, 1, 1.5])
    if sparse:
        x = x * (torch.rand(N, D, generator=g) < 0.4)
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(N, generator=g) > 0).float()
    model = Linear(D)
    with torch.no_grad():
        model.linear.weight.normal_(generator=g)
        model.linear.bias.fill_(0.3)
    if scaled:
        model.input.set(torch.zeros(D) if sparse else torch.rand(D, generator=g),
                        torch.rand(D, generator=g) + 0.5)
    batches = [(part.to_sparse_csr() if sparse else part, labels)
               for part, labels in zip(x.split(128), y.split(128), strict=True)]
    return model, x, y, batches


def reference(model: Linear, x: torch.Tensor, y: torch.Tensor, loss_fn):
    """f as a float64 function of the flat parameters [w, b] (x dense, before any scaling)."""
    inputs = (x.double() - model.input.shift.double()) * model.input.mult.double()

    def f(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:D], theta[D]
        return loss_fn(inputs @ w + b, y.double()).mean() + LAM / 2 * w.pow(2).sum()

    theta = torch.cat([model.linear.weight.detach()[0], model.linear.bias.detach()]).double()
    return f, theta


CASES = [(sparse, scaled) for sparse in (False, True) for scaled in (False, True)]


@pytest.mark.parametrize("sparse, scaled", CASES)
@pytest.mark.parametrize("loss_fn", [losses.bce, losses.hinge, losses.squared_hinge])
def test_value_and_gradient_norm_equal_float64_autograd(sparse, scaled, loss_fn):
    model, x, y, batches = problem(sparse, scaled)
    f, theta = reference(model, x, y, loss_fn)
    theta.requires_grad_()
    expected = f(theta)
    (grad,) = torch.autograd.grad(expected, theta)
    got, norm = value(model, loss_fn, batches, LAM, N, gradient=True)
    assert got == pytest.approx(expected.item(), rel=1e-6)
    assert norm == pytest.approx(grad.norm().item(), rel=1e-5)
    assert value(model, loss_fn, batches, LAM, N)[0] == pytest.approx(got, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


@pytest.mark.parametrize("sparse, scaled", CASES)
@pytest.mark.parametrize("loss_fn", [losses.bce, losses.squared_hinge,
                                     functools.partial(losses.smooth_hinge, h=0.5)])
def test_second_order_products_equal_the_float64_hessian(sparse, scaled, loss_fn):
    model, x, y, batches = problem(sparse, scaled)
    f, theta = reference(model, x, y, loss_fn)
    h = hessian(f, theta)
    closure = FullBatch(model, loss_fn, batches, LAM, N, second_order=True)
    assert closure().item() == pytest.approx(f(theta).item(), rel=1e-6)

    v = torch.randn(D + 1, generator=torch.Generator().manual_seed(1))
    hv = closure.hvp([v[:D].view(1, D).float(), v[D:].float()])
    torch.testing.assert_close(torch.cat([hv[0][0], hv[1]]).double(), h @ v.double(),
                               rtol=1e-4, atol=1e-5)
    diagonal = closure.diagonal()
    torch.testing.assert_close(torch.cat([diagonal[0][0], diagonal[1]]).double(), h.diagonal(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(closure.hessian(), h, rtol=1e-4, atol=1e-6)

    direction = [torch.randn(1, D), torch.randn(1)]
    phi = closure.line(direction)
    step = torch.cat([direction[0][0], direction[1]]).double()
    for t in (0.0, 0.3, 1.0):
        assert phi(t) == pytest.approx(f(theta + t * step).item(), rel=1e-6)


def test_smooth_hinge_stays_within_half_its_width_of_the_hinge():
    scores, targets = torch.linspace(-3, 3, 1001), torch.ones(1001)
    for h in (0.01, 0.1, 1.0):
        gap = losses.hinge(scores, targets) - losses.smooth_hinge(scores, targets, h)
        assert gap.min() >= 0 and gap.max() <= h / 2 + 1e-6
    assert losses.smoothed(functools.partial(losses.hinge)).func is losses.smooth_hinge
    assert losses.smoothed(losses.bce) is losses.bce


@pytest.mark.parametrize("sparse, scaled", CASES)
@pytest.mark.parametrize("dense_max", [2048, 0])  # the Hessian factorised, or CG
def test_newton_reaches_the_float64_optimum(sparse, scaled, dense_max):
    model, x, y, batches = problem(sparse, scaled)
    with torch.no_grad():
        for p in model.linear.parameters():
            p.zero_()
    f, _ = reference(model, x, y, losses.bce)
    theta = torch.zeros(D + 1, dtype=torch.float64)
    for _ in range(30):  # float64 Newton on the reference itself: the optimum
        g = torch.autograd.functional.jacobian(f, theta)
        theta = theta - torch.linalg.solve(hessian(f, theta), g)
    optimum = f(theta).item()

    closure = FullBatch(model, losses.bce, batches, LAM, N, second_order=True)
    newton = Newton(model.parameters(), dense_max=dense_max)
    for _ in range(12):
        newton.step(closure)
    reached = value(model, losses.bce, batches, LAM, N)[0]
    assert optimum <= reached * (1 + 1e-7) and reached <= optimum * (1 + 1e-6)
    assert np.isfinite(reached)
