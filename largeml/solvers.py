"""Full-batch solvers: one `step(closure)` is one iteration over the whole training set.

`Newton` is a damped (Levenberg–Marquardt) Newton method, the kind of second-order solver
LIBLINEAR uses for logistic regression and the L2-loss SVM. Each iteration solves (H + μI)·d =
−∇f: exactly, from H formed whole, when there are at most `dense_max` parameters; otherwise by
conjugate gradients preconditioned with H's diagonal, stopped once the quadratic model's
decrease flattens out (`cg_tol`), from Hessian-vector products
(`largeml.objective.FullBatch.hvp`), never forming H. The damping μ follows how well the
quadratic model predicted the decrease of f (as a trust region does): 0 while full Newton steps
work, so logistic regression converges quadratically (a9a: a relative gap of 1e-9 in 6
iterations), and large where H says little, as for a smoothed hinge whose rows all sit on its
linear part at the start (H = λI there).

`FISTA` (Beck & Teboulle 2009) minimises f + λ1·‖w‖₁, the L1 (and, with L2, elastic-net)
objective, by accelerated proximal gradient steps: a gradient step on f, then soft
thresholding of the weights by step·λ1, which sets exactly to zero every weight whose gradient
cannot move it away from zero. The step length backtracks until the quadratic bound holds, the
momentum restarts whenever F would rise (O'Donoghue & Candès 2015), so F never does.

The closure is what `torch.optim.LBFGS` takes too: called, it returns f and leaves ∇f in the
parameters' `.grad`; `Newton` also calls its `hvp`, `diagonal`, `hessian` and `line`.
"""

import math

import torch
from torch import Tensor
from torch.optim import Optimizer


# `dot` widens this many elements at a time: float64 sums without a float64 copy of the whole
# vectors (two of 16 MB for 2 M weights, at each of CG's several dot products an iteration).
DOT_CHUNK = 1 << 18


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ aᵢ·bᵢ over the tensors of a and b, summed in float64."""
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b, strict=True):
        x, y = x.reshape(-1), y.reshape(-1)
        for i in range(0, len(x), DOT_CHUNK):
            total += torch.dot(x[i:i + DOT_CHUNK].double(), y[i:i + DOT_CHUNK].double())
    return total


def is_full_batch(optimizer: Optimizer) -> bool:
    """Whether `optimizer` steps on the whole training set (a closure), not on batches."""
    return isinstance(optimizer, Newton | FISTA | torch.optim.LBFGS)


class Newton(Optimizer):
    """Damped Newton, see the module docstring.

    max_iter: Newton iterations per `step` call (the Trainer: one per epoch).
    cg_max_iter: conjugate-gradient iterations per Newton iteration at most.
    cg_tol: CG stops at the i-th iteration once i·(Q_{i−1} − Q_i) ≤ cg_tol·|Q_i|, Q being the
        quadratic model gᵀd + ½dᵀHd: the last step gained less than cg_tol of the average.
    lr: unused (a full Newton step has length 1); kept so that `optimizer.lr` means the same
        key for every optimizer and the schedulers can read it.
    dense_max: up to this many parameters, H is formed and factorised instead of CG.
    """

    second_order = True  # its closure must give Hessian products (FullBatch(second_order=True))

    def __init__(self, params, lr: float = 1.0, max_iter: int = 1, cg_max_iter: int = 250,
                 cg_tol: float = 0.25, dense_max: int = 2048) -> None:
        super().__init__(params, {"lr": lr, "max_iter": max_iter, "cg_max_iter": cg_max_iter,
                                  "cg_tol": cg_tol, "dense_max": dense_max})
        self.params = [p for group in self.param_groups for p in group["params"]]
        self.state["solver"] = {"iterations": 0, "cg_iterations": 0, "rejected": 0,
                                "damping": 0.0}

    @torch.no_grad()
    def step(self, closure) -> Tensor:  # type: ignore[override]
        """`max_iter` Newton iterations; returns f where the last one started."""
        group, state = self.param_groups[0], self.state["solver"]
        for _ in range(group["max_iter"]):
            f = closure()
            g = [p.grad.detach().clone() for p in self.params]
            g_norm = math.sqrt(dot(g, g).item())
            if g_norm == 0:
                break
            diagonal = closure.diagonal()
            # μ's scale: the mean curvature (so damping means the same on any data's scale).
            scale = max(sum(x.sum().item() for x in diagonal)
                        / sum(x.numel() for x in diagonal), 1e-12)
            exact = sum(x.numel() for x in g) <= group["dense_max"]
            h = closure.hessian() if exact else None
            phi, f0 = closure.line, f.item()
            for _attempt in range(60):
                mu = state["damping"] * scale
                if exact:
                    d = self._exact(h, g, mu)
                    hd = None if d is None else self._matvec(h, d)
                else:
                    d, hd, cg = self._conjugate_gradient(closure, g, diagonal, mu, group)
                    state["cg_iterations"] += cg
                if d is None:  # H + μI not positive definite: damp more
                    predicted = -1.0
                else:
                    predicted = -(dot(g, d).item() + 0.5 * dot(d, hd).item())
                    if 0 <= predicted <= 1e-15 * abs(f0):  # no decrease left to find
                        return f
                if predicted > 0:
                    actual = f0 - phi(d)(1.0)
                    ratio = actual / predicted
                    if ratio > 1e-4:  # accepted
                        for p, dj in zip(self.params, d, strict=True):
                            p.add_(dj)
                        if ratio > 0.75:
                            state["damping"] = state["damping"] / 4 if state["damping"] > 1e-8 \
                                else 0.0
                        elif ratio < 0.25:
                            state["damping"] = max(2 * state["damping"], 1e-6)
                        break
                state["rejected"] += 1
                state["damping"] = max(4 * state["damping"], 1e-6)
            state["iterations"] += 1
        return f

    @staticmethod
    def _matvec(h: Tensor, d: list[Tensor]) -> list[Tensor]:
        out = h @ torch.cat([x.reshape(-1) for x in d]).double()
        return [part.view_as(x).to(x.dtype) for part, x in
                zip(out.split([x.numel() for x in d]), d, strict=True)]

    @staticmethod
    def _exact(h: Tensor, g: list[Tensor], mu: float) -> list[Tensor] | None:
        """d = −(H + μI)⁻¹g, factorised: for narrow data (a few thousand parameters), where
        one pass forming H costs less than the CG iterations it replaces."""
        flat = torch.cat([x.reshape(-1) for x in g]).double()
        damped = h + mu * torch.eye(len(flat), dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() != 0:
            return None
        d = torch.cholesky_solve(-flat.unsqueeze(1), factor).squeeze(1)
        return [part.view_as(x).to(x.dtype) for part, x in
                zip(d.split([x.numel() for x in g]), g, strict=True)]

    @staticmethod
    def _conjugate_gradient(closure, g: list[Tensor], diagonal: list[Tensor], mu: float,
                            group: dict) -> tuple[list[Tensor] | None, list[Tensor] | None, int]:
        """(d, H·d, iterations): d ≈ −(H + μI)⁻¹g, preconditioned with diag(H) + μ (features
        of very different frequencies or scales otherwise cost hundreds of iterations), stopped
        once an iteration gains less than `cg_tol` of the average gain so far in the quadratic
        model Q(d) = gᵀd + ½dᵀ(H + μI)d (Nash & Sofer 1990): scale-free, and no tighter than
        the Newton step needs. H·d comes from the residual r = −g − (H + μI)·d, as in
        LIBLINEAR's trust region: no more Hessian products (passes over the data where the rows
        are streamed) than the iterations."""

        def solved(d: list[Tensor], i: int) -> tuple[list[Tensor], list[Tensor], int]:
            return d, [torch.neg(gj).sub_(rj).sub_(dj, alpha=mu)
                       for gj, rj, dj in zip(g, r, d, strict=True)], i

        # In place where it can be: over millions of weights each vector is megabytes, and
        # CG's temporaries were most of a streamed Newton run's memory.
        inverse = [(x + mu).clamp_min_(1e-12).reciprocal_() for x in diagonal]
        d = [torch.zeros_like(x) for x in g]
        r = [-x for x in g]  # the residual −g − (H + μI)·d
        z = [x * m for x, m in zip(r, inverse, strict=True)]
        p = [x.clone() for x in z]
        rz, q = dot(r, z).item(), 0.0
        if rz == 0:  # ∇f vanishes at this precision
            return solved(d, 0)
        for i in range(1, group["cg_max_iter"] + 1):
            hp = [x.add_(y, alpha=mu) for x, y in zip(closure.hvp(p), p, strict=True)]
            php = dot(p, hp).item()
            if php <= 0:  # no positive curvature along p
                return solved(d, i) if i > 1 else (None, None, i)
            alpha = rz / php
            for dj, pj, rj, hj in zip(d, p, r, hp, strict=True):
                dj.add_(pj, alpha=alpha)
                rj.add_(hj, alpha=-alpha)
            q_new = q - 0.5 * alpha * rz  # Q falls by ½·α·rᵀz a step (pᵀr = rᵀz)
            if q_new <= 0 and i * (q_new - q) >= group["cg_tol"] * q_new:
                return solved(d, i)
            q = q_new
            for zj, rj, mj in zip(z, r, inverse, strict=True):
                torch.mul(rj, mj, out=zj)
            rz_new = dot(r, z).item()
            if rz_new == 0:  # solved exactly
                return solved(d, i)
            for pj, zj in zip(p, z, strict=True):
                pj.mul_(rz_new / rz).add_(zj)
            rz = rz_new
        return solved(d, group["cg_max_iter"])


class FISTA(Optimizer):
    """Accelerated proximal gradient on f + λ1·‖w‖₁, see the module docstring.

    l1: λ1 (the Trainer passes `regularization.l1`), on weight matrices, not biases.
    max_iter: iterations per `step` call (the Trainer: one call per epoch).
    lr: the first step length tried; each iteration starts from the last accepted one, grown
        by a quarter, and halves it until the quadratic bound holds.
    """

    takes_l1 = True

    def __init__(self, params, lr: float = 1.0, max_iter: int = 50, l1: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "max_iter": max_iter, "l1": l1})
        self.params = [p for group in self.param_groups for p in group["params"]]
        self.penalised = [p.ndim >= 2 for p in self.params]
        self.state["solver"] = {"iterations": 0, "restarts": 0, "step": lr, "theta": 1.0,
                                "previous": [p.detach().clone() for p in self.params]}

    def _set(self, values: list[Tensor]) -> None:
        for p, v in zip(self.params, values, strict=True):
            p.copy_(v)

    def _prox(self, y: list[Tensor], g: list[Tensor], t: float, l1: float) -> list[Tensor]:
        out = []
        for yi, gi, is_weight in zip(y, g, self.penalised, strict=True):
            z = yi - t * gi
            if is_weight and l1 > 0:
                z = torch.sign(z) * (z.abs() - t * l1).clamp(min=0)
            out.append(z)
        return out

    def _l1(self, values: list[Tensor], l1: float) -> float:
        return l1 * sum(v.double().abs().sum().item()
                        for v, w in zip(values, self.penalised, strict=True) if w)

    @torch.no_grad()
    def step(self, closure) -> Tensor:  # type: ignore[override]
        """`max_iter` iterations from the model's parameters (the last iterate); returns
        f + λ1·‖w‖₁ there at the start."""
        group, state = self.param_groups[0], self.state["solver"]
        l1 = group["l1"]
        x = [p.detach().clone() for p in self.params]
        f_x = closure().item()
        start = torch.tensor(f_x + self._l1(x, l1))
        objective = start.item()
        previous = state["previous"]
        for _ in range(group["max_iter"]):
            theta = state["theta"]
            theta_next = (1 + math.sqrt(1 + 4 * theta * theta)) / 2
            beta = (theta - 1) / theta_next
            y = [xi + beta * (xi - pi) for xi, pi in zip(x, previous, strict=True)]
            self._set(y)
            f_y = closure().item()
            g = [p.grad.detach().clone() for p in self.params]
            t = state["step"] * 1.25
            for _halving in range(60):
                z = self._prox(y, g, t, l1)
                self._set(z)
                f_z = closure().item()
                d = [zi - yi for zi, yi in zip(z, y, strict=True)]
                bound = f_y + dot(g, d).item() + dot(d, d).item() / (2 * t)
                if f_z <= bound + 1e-12 * abs(f_y):
                    break
                t /= 2
            state["step"] = t
            state["iterations"] += 1
            objective_z = f_z + self._l1(z, l1)
            if objective_z > objective:  # momentum overshot: restart from x, no momentum
                state["theta"], previous = 1.0, x
                state["restarts"] += 1
                if beta == 0:  # a plain proximal step did not decrease F: at the optimum
                    break
                continue
            previous, x, objective = x, z, objective_z
            state["theta"] = theta_next
        state["previous"] = previous
        self._set(x)
        return start
