"""Loops over a CSR batch's non-zeros, compiled with numba where it is installed.

A sparse linear step touches each non-zero a few times, each time at a random feature: gathers
and scatters. As separate torch ops each is one pass over the batch at ~3 ns a non-zero on this
2-core CPU (index_select, index_add_, index_put_: 0.5-0.9 ms for 164 k non-zeros), and a step
of FTRL with its state takes about twenty of them. Here the same step is two loops, over a
state laid out feature by feature (`(n_features, 4)`: one cache line holds all of a feature's
numbers), which is what makes the sparse path fast on the CPU.

Every function has a torch twin (`*_torch`) that computes the same numbers with index ops: it is
what runs on CUDA, and on the CPU without numba (`pip install largeml[sparse]` adds it); the
tests check the two agree.
"""

import math

import torch
from torch import Tensor

try:
    import numba
except ImportError:  # the torch twins do the same work, slower
    numba = None

# Columns of the FTRL state: z (the lazily regularised gradient sum), n (the sum of squared
# gradients), the feature's scale (the model's input map, folded in) and the gradient of the
# current step, accumulated over the batch's non-zeros.
Z, N, SCALE, GRAD = range(4)


def available(x: Tensor) -> bool:
    """Whether the compiled loops can take this batch: numba present, on the CPU."""
    return numba is not None and x.device.type == "cpu"


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)
    _pjit = numba.njit(cache=True, nogil=True, parallel=True)

    @_pjit
    def _ftrl_scores(crow, cols, vals, state, alpha, beta, decay, bias, out):  # pragma: no cover
        for r in numba.prange(len(crow) - 1):
            s = 0.0
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                z = state[c, 0]
                if z != 0.0:
                    s -= z / ((beta + math.sqrt(state[c, 1])) / alpha + decay) \
                        * state[c, 2] * vals[i]
            out[r] = s + bias

    @_jit
    def _ftrl_update(crow, cols, vals, d, state, alpha, beta, decay):  # pragma: no cover
        for r in range(len(crow) - 1):
            dr = d[r]
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                state[c, 3] += dr * state[c, 2] * vals[i]
        # A feature met twice in the batch is updated at its first meeting; the second finds
        # its gradient zeroed, and a zero gradient changes nothing in FTRL.
        for i in range(len(cols)):
            c = cols[i]
            g = state[c, 3]
            if g != 0.0:
                z, n = state[c, 0], state[c, 1]
                root = math.sqrt(n)
                w = -z / ((beta + root) / alpha + decay) if z != 0.0 else 0.0
                n += g * g
                state[c, 0] = z + g - (math.sqrt(n) - root) / alpha * w
                state[c, 1] = n
                state[c, 3] = 0.0

    @_pjit
    def _csr_matvec(crow, cols, vals, w, scale, bias, out):  # pragma: no cover
        for r in numba.prange(len(crow) - 1):
            s = 0.0
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                s += w[c] * scale[c] * vals[i]
            out[r] = s + bias

    @_jit
    def _csr_rmatvec(crow, cols, vals, d, scale, out):  # pragma: no cover
        for r in range(len(crow) - 1):
            dr = d[r]
            for i in range(crow[r], crow[r + 1]):
                c = cols[i]
                out[c] += dr * scale[c] * vals[i]


def _parts(x: Tensor):
    return x.crow_indices().numpy(), x.col_indices().numpy(), x.values().numpy()


# -- FTRL-Proximal on a linear score: state rows are features ----------------------------------

def ftrl_weights(state: Tensor, alpha: float, beta: float, decay: float) -> Tensor:
    """w = −z / ((β + √n) / α + decay) for every feature (decay = λ·steps, see largeml.ftrl);
    0 for a feature never seen (z = 0), also where β = decay = 0."""
    z = state[:, Z]
    return torch.where(z == 0, 0.0, -z / ((beta + state[:, N].sqrt()) / alpha + decay))


def ftrl_scores(x: Tensor, state: Tensor, alpha: float, beta: float, decay: float,
                bias: float) -> Tensor:
    """The scores of CSR batch `x` at the weights `state` stands for, computed from the state."""
    if available(x):
        out = torch.empty(x.shape[0])
        _ftrl_scores(*_parts(x), state.numpy(), alpha, beta, decay, bias, out.numpy())
        return out
    return ftrl_scores_torch(x, state, alpha, beta, decay, bias)


def ftrl_scores_torch(x: Tensor, state: Tensor, alpha: float, beta: float, decay: float,
                      bias: float) -> Tensor:
    cols = x.col_indices()
    s = state[cols]
    w = torch.where(s[:, Z] == 0, 0.0, -s[:, Z] / ((beta + s[:, N].sqrt()) / alpha + decay))
    per = w * s[:, SCALE] * x.values()
    return torch.segment_reduce(per, "sum", offsets=x.crow_indices()) + bias


def ftrl_update(x: Tensor, d: Tensor, state: Tensor, alpha: float, beta: float,
                decay: float) -> None:
    """One FTRL-Proximal step on `state` from ∂loss/∂score `d` of each row of CSR batch `x`."""
    if available(x):
        _ftrl_update(*_parts(x), d.numpy(), state.numpy(), alpha, beta, decay)
    else:
        ftrl_update_torch(x, d, state, alpha, beta, decay)


def ftrl_update_torch(x: Tensor, d: Tensor, state: Tensor, alpha: float, beta: float,
                      decay: float) -> None:
    cols = x.col_indices().long()
    rows = torch.repeat_interleave(d, x.crow_indices().diff())
    grad = torch.zeros(state.shape[0], dtype=state.dtype, device=state.device)
    grad.index_add_(0, cols, rows * state[cols, SCALE] * x.values())
    # Each feature's new z and n computed once per non-zero from the old ones: a feature met
    # twice gets the same values written twice.
    g, z, n = grad[cols], state[cols, Z], state[cols, N]
    root = n.sqrt()
    w = torch.where(z == 0, 0.0, -z / ((beta + root) / alpha + decay))
    n_new = n + g * g
    state[cols, Z] = z + g - (n_new.sqrt() - root) / alpha * w
    state[cols, N] = n_new


# -- a plain linear score and its gradient, for evaluation and the objective -------------------

def csr_matvec(x: Tensor, w: Tensor, scale: Tensor, bias: float) -> Tensor:
    """Σ_j w_j · scale_j · x_ij + bias for each row of CSR batch `x`."""
    if available(x):
        out = torch.empty(x.shape[0])
        _csr_matvec(*_parts(x), w.numpy(), scale.numpy(), bias, out.numpy())
        return out
    per = w[x.col_indices()] * scale[x.col_indices()] * x.values()
    return torch.segment_reduce(per, "sum", offsets=x.crow_indices()) + bias


def csr_rmatvec(x: Tensor, d: Tensor, scale: Tensor, out: Tensor) -> None:
    """out_j += Σ_i d_i · scale_j · x_ij: the weight gradient of a batch, accumulated."""
    if available(x):
        _csr_rmatvec(*_parts(x), d.numpy(), scale.numpy(), out.numpy())
        return
    cols = x.col_indices().long()
    rows = torch.repeat_interleave(d, x.crow_indices().diff())
    out.index_add_(0, cols, rows * scale[cols] * x.values())
