"""Feature scaling (`data.scale`), fitted once on the training rows before the first step.

    none      x' = x
    standard  x' = (x − mean) / std per feature (dense data; a constant feature becomes 0)
    maxabs    x' = x / max|x| per feature: keeps zeros zero, so sparse data stays sparse
    auto      none when every feature's largest |value| lies in [0.1, 10] (binary, one-hot,
              tf-idf, unit-variance data: already on one scale); else standard for dense data,
              maxabs for sparse

Scaling changes the problem solved: the L2 term is on the weights of the scaled features. The
result is stored in the model (`largeml.models.Standardize`), so evaluate and predict apply it,
and `largeml.export` folds it into weights for the raw features.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from largeml import kernels
from largeml.data.stream import RowPieces
from largeml.errors import ConfigError

SCALES = ("auto", "standard", "maxabs", "none")
AUTO_RANGE = (0.1, 10.0)  # max |x| per feature within this range: auto leaves the data as it is


@dataclass
class Scaling:
    kind: str  # what was applied: standard | maxabs | none
    shift: Tensor
    mult: Tensor
    why: str


def check(scale: str, sparse: bool) -> None:
    if scale not in SCALES:
        raise ConfigError(f"data.scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "standard" and sparse:
        raise ConfigError("data.scale=standard centres every feature, which would make sparse "
                          "data dense; use data.scale=maxabs (keeps zeros) or none")


def fit(scale: str, batches: Iterable[tuple[Tensor, Tensor]], n_features: int, sparse: bool,
        total: Callable[[Tensor], Tensor], largest: Callable[[Tensor], Tensor],
        device: torch.device) -> Scaling:
    """The scaling `scale` asks for, from one pass over `batches` (this process's rows; `total`
    and `largest` sum and take the maximum over all processes)."""
    check(scale, sparse)
    identity = Scaling("none", torch.zeros(n_features), torch.ones(n_features), "data.scale=none")
    if scale == "none":
        return identity
    rows = torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.zeros(n_features, dtype=torch.float64, device=device)
    squares = torch.zeros(n_features, dtype=torch.float64, device=device)
    maxabs = torch.zeros(n_features, device=device)
    lanes = None  # the compiled pass's maxima, a row a core (rows read in place)
    for x, _ in batches:
        x = x.to(device)
        rows += x.shape[0]
        if isinstance(x, RowPieces):  # rows read in place (CPU): one compiled pass, both cores
            lanes = kernels.max_abs_lanes(n_features) if lanes is None else lanes
            kernels.max_abs(x, lanes)
        elif x.layout == torch.sparse_csr:
            cols, values = x.col_indices().long(), x.values()
            maxabs.scatter_reduce_(0, cols, values.abs(), reduce="amax")
        else:
            maxabs = torch.maximum(maxabs, x.abs().amax(dim=0))
            # float32 within a batch (8192 rows), float64 across batches
            sums += x.sum(dim=0).double()
            squares += (x * x).sum(dim=0).double()
    if lanes is not None:
        maxabs = torch.maximum(maxabs, lanes.amax(0))
    rows, sums, squares, maxabs = total(rows), total(sums), total(squares), largest(maxabs)
    used = maxabs > 0
    low, high = AUTO_RANGE
    if scale == "auto":
        spread = maxabs[used]
        if len(spread) == 0 or (spread.min() >= low and spread.max() <= high):
            return Scaling("none", identity.shift, identity.mult,
                           f"data.scale=auto: every feature's max |x| is within [{low}, {high}]")
        scale = "maxabs" if sparse else "standard"
        why = (f"data.scale=auto: features' max |x| range from {spread.min().item():.3g} to "
               f"{spread.max().item():.3g}")
    else:
        why = f"data.scale={scale}"
    if scale == "maxabs":
        mult = torch.where(used, 1 / maxabs.clamp_min(1e-30), torch.ones_like(maxabs))
        return Scaling("maxabs", torch.zeros(n_features), mult.float().cpu(), why)
    mean = sums / rows
    std = (squares / rows - mean.pow(2)).clamp_min(0).sqrt()
    mult = torch.where(std > 1e-12 * (1 + mean.abs()), 1 / std, torch.ones_like(std))
    return Scaling("standard", mean.float().cpu(), mult.float().cpu(), why)
