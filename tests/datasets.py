"""Seeded binary classification sets of varied shape and conditioning, a fast LIBSVM writer, and
the exact float64 optimum of the objective largeml documents, to check convergence against.

    f(w, b) = mean_i loss(s_i, y_i) + λ/2 · ‖w‖²,   s_i = x'_i · w + b,   λ = 1 / (C · n)

x' = (x − shift) · mult is the model input after the run's feature scaling; b is not penalised.
Each generator returns a `Split` of float64 features (dense, or scipy CSR) and {0, 1} labels.
None of the sets is tuned on largeml: they copy the shapes that break SGD with default settings
(mixed scales, rare positives, sparse Zipf features, near separability). A helper module for the
tests and scripts/convergence_table.py, not a test file; it needs scikit-learn (for scipy and
threadpoolctl, and for the `breast_cancer`, `wine` and `digits` data).
"""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import LinearOperator, cg
from scipy.special import expit, ndtri
from threadpoolctl import threadpool_limits  # comes with scikit-learn

Features = np.ndarray | sparse.csr_matrix


class Split(NamedTuple):
    x_train: Features
    y_train: np.ndarray  # float64 {0, 1} (class ids 0 ... K−1 for the multiclass sets)
    x_val: Features
    y_val: np.ndarray


# ----------------------------------------------------------------------------- generators


def _split(x: Features, y: np.ndarray, rng: np.random.Generator, val_fraction: float) -> Split:
    rows = rng.permutation(len(y))
    n_val = round(len(y) * val_fraction)
    train, val = rows[:-n_val], rows[-n_val:]
    return Split(x[train], y[train].astype(np.float64), x[val], y[val].astype(np.float64))


def _threshold(score: np.ndarray, rng: np.random.Generator, noise: float,
               positives: float) -> np.ndarray:
    """Labels of a noisy rule: score plus logistic noise (noise × the score's spread), positive
    for the top `positives` share, so the positive rate is exact whatever the score's scale."""
    noisy = score + noise * score.std() * rng.logistic(size=len(score))
    return (noisy > np.quantile(noisy, 1 - positives)).astype(np.float64)


def _correlated_normal(rng: np.random.Generator, rows: int, columns: int,
                       mixing: float = 0.5, factors: int = 8) -> np.ndarray:
    """Standard normal columns correlated through a few shared factors, as real features are."""
    z = rng.standard_normal((rows, columns))
    z += mixing * rng.standard_normal((rows, factors)) @ rng.standard_normal((factors, columns))
    return (z - z.mean(0)) / z.std(0)


def dense_imbalanced(seed: int = 0) -> Split:
    """50,000 rows × 22 dense features, ~10 % positives: amounts, counts, flags and continuous
    measurements on scales from 1e-2 to 1e4, some far from zero (think credit or churn tables)."""
    rng = np.random.default_rng(seed)
    z = _correlated_normal(rng, 50_000, 22)
    continuous = z[:, :10] * 10.0 ** rng.uniform(-2, 3, 10) + rng.choice([0, 0, 50, 1e3], 10)
    amounts = np.exp(0.8 * z[:, 10:16]) * 10.0 ** rng.uniform(0, 3, 6)
    counts = rng.poisson(np.exp(0.5 * z[:, 16:19] + 1)).astype(np.float64)
    flags = (z[:, 19:] > 0.7).astype(np.float64)
    x = np.hstack([continuous, amounts, counts, flags])
    score = z @ rng.standard_normal(22) + 0.7 * z[:, 0] * z[:, 1] + 0.5 * np.abs(z[:, 2])
    return _split(x, _threshold(score, rng, 0.15, 0.10), rng, 0.2)


def text(seed: int = 0) -> Split:
    """20,000 documents × 8,000 tf-idf features (Zipf word frequencies, 25-65 distinct words a
    document, rows L2-normalised), ~8 % positives: documents of one topic use its words more."""
    rng = np.random.default_rng(seed)
    n_docs, vocabulary = 20_000, 8_000
    y = (rng.random(n_docs) < 0.07).astype(np.float64)
    zipf = 1.0 / (np.arange(vocabulary) + 2.7) ** 1.05
    topic = np.zeros(vocabulary)  # the topic's words are mid-frequency ones, as in real text
    topic[rng.choice(np.arange(100, 3000), 150, replace=False)] = rng.exponential(1, 150)
    lengths = rng.integers(30, 70, n_docs)
    doc = np.repeat(np.arange(n_docs), lengths)
    # A positive document draws 20 % of its words from the topic, a negative one 2 %.
    from_topic = rng.random(len(doc)) < np.where(y[doc] > 0, 0.20, 0.02)
    words = np.where(
        from_topic,
        np.searchsorted(np.cumsum(topic) / topic.sum(), rng.random(len(doc))),
        np.searchsorted(np.cumsum(zipf) / zipf.sum(), rng.random(len(doc))),
    ).clip(0, vocabulary - 1)
    counts = sparse.csr_matrix((np.ones(len(doc)), (doc, words)), shape=(n_docs, vocabulary))
    counts.sum_duplicates()
    df = np.bincount(counts.indices, minlength=vocabulary)
    x = counts.copy()
    x.data = (1 + np.log(x.data)) * np.log((1 + n_docs) / (1 + df))[x.indices]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = sparse.csr_matrix(sparse.diags(1 / np.maximum(norms, 1e-12)) @ x)
    flips = rng.random(n_docs) < 0.01  # label noise: mis-filed documents
    return _split(x, np.where(flips, 1 - y, y), rng, 0.2)


def binary_rare(seed: int = 0) -> Split:
    """30,000 rows × 300 sparse binary features (each set in 1-20 % of rows, ~7 % overall),
    ~3 % positives from a noisy rule over a few dozen features and one interaction."""
    rng = np.random.default_rng(seed)
    z = _correlated_normal(rng, 30_000, 300, mixing=0.3)
    density = np.exp(rng.uniform(np.log(0.01), np.log(0.2), 300))
    x = sparse.csr_matrix((z > ndtri(1 - density)).astype(np.float64))
    beta = np.where(rng.random(300) < 0.15, rng.standard_normal(300) * 2, 0)
    score = x @ beta + 1.5 * x[:, 0].toarray().ravel() * x[:, 1].toarray().ravel()
    return _split(x, _threshold(score, rng, 0.2, 0.03), rng, 0.2)


def onehot(seed: int = 0) -> Split:
    """8,000 rows × 112 one-hot features (14 categorical columns of 8 levels of uneven
    frequency), labels from an additive rule with little noise: nearly separable, so the C = 1
    optimum has large weights and a badly conditioned Hessian (each column's 8 indicators also
    sum to 1, collinear with the bias)."""
    rng = np.random.default_rng(seed)
    n, columns, levels = 8_000, 14, 8
    frequency = rng.dirichlet(np.full(levels, 0.7), columns)
    level = np.stack([rng.choice(levels, n, p=p) for p in frequency], axis=1)
    effect = rng.standard_normal((columns, levels))
    score = effect[np.arange(columns), level].sum(1)
    cols = (level + levels * np.arange(columns)).ravel()
    x = sparse.csr_matrix((np.ones(n * columns), (np.repeat(np.arange(n), columns), cols)),
                          shape=(n, columns * levels))
    return _split(x, _threshold(score, rng, 0.01, 0.5), rng, 0.2)


def breast_cancer(seed: int = 0) -> Split:
    """scikit-learn's breast cancer set unscaled (features from 1e-3 to 4e3), a 75/25 split."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return _split(data.data.astype(np.float64), data.target, np.random.default_rng(seed), 0.25)


def scales(seed: int = 0) -> Split:
    """4,000 rows × 10 dense features of standard deviation 1e-3, ..., 1e3 (a few off-centre),
    balanced labels from a noisy linear rule in which every feature matters."""
    rng = np.random.default_rng(seed)
    z = _correlated_normal(rng, 4_000, 10, mixing=0.3)
    x = (z + np.array([0, 0, 3, 0, 0, 0, 5, 0, 0, 2])) * np.logspace(-3, 3, 10)
    score = z @ (rng.choice([-1, 1], 10) * rng.uniform(0.5, 1.5, 10))
    return _split(x, _threshold(score, rng, 0.3, 0.5), rng, 0.25)


def wine(seed: int = 0) -> Split:
    """scikit-learn's wine set unscaled (proline ~1e3, hue ~1), class 1 against the others."""
    from sklearn.datasets import load_wine

    data = load_wine()
    return _split(data.data, (data.target == 1).astype(np.float64),
                  np.random.default_rng(seed), 0.25)


def digits(seed: int = 0) -> Split:
    """scikit-learn's 8 × 8 digits (pixels 0-16), the digit 8 against the others (~10 %)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.data, (data.target == 8).astype(np.float64),
                  np.random.default_rng(seed), 0.25)


def digits_classes(seed: int = 0) -> Split:
    """scikit-learn's 8 × 8 digits, all ten classes (labels 0 ... 9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.data, data.target.astype(np.float64), np.random.default_rng(seed), 0.25)


def topics(seed: int = 0, n_classes: int = 20, vocabulary: int = 3000, rows: int = 4000) -> Split:
    """Documents from a topic model, labelled by topic (0 ... n_classes − 1): each topic a
    sparse word distribution (Dirichlet(0.05) over the vocabulary), each document ~30 words,
    65 % from its own topic and 35 % from another, chosen at random (so topics overlap and the
    classes are not separable); features log(1 + count), each row scaled to unit length, as
    tf-idf-like text features are. Sparse CSR."""
    rng = np.random.default_rng(seed)
    words = rng.dirichlet(np.full(vocabulary, 0.05), size=n_classes)
    y = rng.integers(0, n_classes, rows)
    other = (y + rng.integers(1, n_classes, rows)) % n_classes
    lengths = rng.poisson(25, rows) + 5
    counts = np.zeros((rows, vocabulary))
    for i in range(rows):
        own = rng.binomial(lengths[i], 0.65)
        counts[i] += rng.multinomial(own, words[y[i]])
        counts[i] += rng.multinomial(lengths[i] - own, words[other[i]])
    x = np.log1p(counts)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return _split(sparse.csr_matrix(x), y.astype(np.float64), rng, 0.25)


def interactions(seed: int = 0, rows: int = 6000, n_features: int = 10) -> Split:
    """A dense set no linear model separates: y = 1[x1·x2 + x3·x4 + sin(2·x5) + 0.3·ε > 0],
    x ~ N(0, I) (the other features are noise). Logistic regression scores about 65 %, an RBF
    kernel SVM about 87 %."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features))
    margin = x[:, 0] * x[:, 1] + x[:, 2] * x[:, 3] + np.sin(2 * x[:, 4])
    y = (margin + 0.3 * rng.standard_normal(rows) > 0).astype(np.float64)
    return _split(x, y, rng, 0.25)


def shells(seed: int = 0, rows: int = 6000, n_features: int = 8) -> Split:
    """Two noisy concentric shells: y = 1[‖x‖² + ε > n_features] with x ~ N(0, I) and
    ε ~ N(0, 2²): a radial boundary, which no hyperplane follows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features))
    y = ((x ** 2).sum(1) + 2 * rng.standard_normal(rows) > n_features).astype(np.float64)
    return _split(x, y, rng, 0.25)


def few_relevant(seed: int = 0, rows: int = 3000, n_features: int = 500,
                 relevant: int = 10) -> Split:
    """Logistic labels from a rule on the first `relevant` features only (weights ±1 to ±2),
    x ~ N(0, I): the other features are noise, which an L1 model should drop."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features))
    w = np.zeros(n_features)
    w[:relevant] = rng.choice([-1.0, 1.0], relevant) * rng.uniform(1, 2, relevant)
    y = (rng.random(rows) < expit(x @ w)).astype(np.float64)
    return _split(x, y, rng, 0.2)


SETS: dict[str, Callable[[int], Split]] = {
    "dense_imbalanced": dense_imbalanced,
    "text": text,
    "binary_rare": binary_rare,
    "onehot": onehot,
    "breast_cancer": breast_cancer,
    "scales": scales,
    "wine": wine,
    "digits": digits,
}


# ----------------------------------------------------------------------------- LIBSVM


def write_npy(root: Path, split: Split) -> None:
    """Writes x_train.npy, y_train.npy, x_val.npy, y_val.npy (float32 features) under `root`,
    as `data=files data.labels=...` reads them."""
    for part, x, y in (("train", split.x_train, split.y_train), ("val", split.x_val, split.y_val)):
        np.save(Path(root) / f"x_{part}.npy", np.asarray(x, dtype=np.float32))
        np.save(Path(root) / f"y_{part}.npy", y)


def write_libsvm(path: str | Path, x: Features, y: np.ndarray, signed: bool = True,
                 chunk_rows: int = 10_000) -> None:
    """Writes LIBSVM text: `label index:value ...`, 1-based indices, only non-zeros, values as
    %.7g, labels as -1/+1 (`signed`) or 0/1.

    One `%` formatting of a whole chunk, whose format string is built per row: ~0.7 s per
    million non-zeros, where a Python loop over non-zeros takes several seconds.
    """
    x = sparse.csr_matrix(x, copy=True)
    x.sum_duplicates()  # LIBSVM wants each row's indices unique and ascending
    x.eliminate_zeros()
    labels = (2 * y - 1 if signed else y).astype(np.int64)
    counts = np.diff(x.indptr)
    row_formats: dict[int, str] = {}
    with open(path, "w") as f:
        for lo in range(0, x.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, x.shape[0])
            a, b = x.indptr[lo], x.indptr[hi]
            fmt = "".join([row_formats.setdefault(k, "%d" + " %d:%.7g" * k + "\n")
                           for k in counts[lo:hi].tolist()])
            args = np.empty(hi - lo + 2 * (b - a), dtype=object)
            heads = np.arange(hi - lo) + 2 * (x.indptr[lo:hi] - a)  # each row's label slot
            pairs = np.ones(len(args), dtype=bool)
            pairs[heads] = False
            args[heads] = labels[lo:hi].tolist()
            index_value = np.empty(2 * (b - a), dtype=object)
            index_value[0::2] = (x.indices[a:b] + 1).tolist()
            index_value[1::2] = x.data[a:b].tolist()
            args[pairs] = index_value
            f.write(fmt % tuple(args.tolist()))


# ----------------------------------------------------------------------------- the objective

LOSSES: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # of the margin m = t · s
    "logistic": lambda m: np.logaddexp(0, -m),
    "hinge": lambda m: np.maximum(0, 1 - m),
    "squared_hinge": lambda m: np.maximum(0, 1 - m) ** 2,
}


def scaled(x: Features, shift: np.ndarray | None = None,
           mult: np.ndarray | None = None) -> Features:
    """x' = (x − shift) · mult in float64. A sparse x takes no shift (it would densify)."""
    d = x.shape[1]
    shift = np.zeros(d) if shift is None else np.asarray(shift, dtype=np.float64)
    mult = np.ones(d) if mult is None else np.asarray(mult, dtype=np.float64)
    if shift.shape != (d,) or mult.shape != (d,):
        raise ValueError(f"shift {shift.shape} and mult {mult.shape} must be ({d},) for x of "
                         f"shape {x.shape}")
    if sparse.issparse(x):
        if shift.any():
            raise ValueError("a sparse x takes shift = 0 only (max-abs scaling); "
                             f"{np.count_nonzero(shift)} shifts are non-zero")
        return sparse.csr_matrix(x, dtype=np.float64) @ sparse.diags(mult)
    return (np.asarray(x, dtype=np.float64) - shift) * mult


def objective(x: Features, y: np.ndarray, w: np.ndarray, b: float, C: float = 1.0,
              loss: str = "logistic", shift: np.ndarray | None = None,
              mult: np.ndarray | None = None) -> float:
    """f(w, b) as documented, in float64; λ = 1 / (C · n) with n = len(y)."""
    w = np.asarray(w, dtype=np.float64).ravel()
    margins = (2 * np.asarray(y, dtype=np.float64) - 1) * (scaled(x, shift, mult) @ w + b)
    return float(LOSSES[loss](margins).mean() + 0.5 / (C * len(y)) * w @ w)


# Hessians of up to this many weights are formed and factorised; larger ones are solved by CG.
DENSE_HESSIAN_MAX = 2_000


def reference(x: Features, y: np.ndarray, C: float = 1.0, loss: str = "logistic",
              shift: np.ndarray | None = None, mult: np.ndarray | None = None,
              rtol: float = 1e-12) -> tuple[np.ndarray, float, float]:
    """(w, b, f(w, b)) at the minimum of f, by damped Newton in float64.

    Newton converges quadratically near the optimum whatever the conditioning; it stops one
    step after the Newton decrement says the objective is within `rtol` of the minimum
    (f − f* ≈ ½ gᵀH⁻¹g there). `objective` reproduces the returned value to ~1e-15.
    Logistic and squared hinge losses are solved as they are (LIBLINEAR's generalised Newton
    for the latter); the hinge through its corner rounded over a band of width ε, ε = 0.1 down
    to 1e-8, each solution starting the next: the rounded loss is within ε/2 of the hinge, so
    the hinge f returned is within 5e-9 (absolute) of its minimum. Above DENSE_HESSIAN_MAX
    weights the Newton steps are solved by CG, which the rounded hinge makes slow: minutes
    for `text`.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {sorted(LOSSES)}")
    # One BLAS thread: the Hessians are small, and OpenBLAS's threads made each solve 10-20x
    # slower on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        return _reference(scaled(x, shift, mult), y, C, loss, rtol)


def _reference(xs: Features, y: np.ndarray, C: float, loss: str,
               rtol: float) -> tuple[np.ndarray, float, float]:
    y = np.asarray(y, dtype=np.float64)
    t = 2 * y - 1
    w = np.zeros(xs.shape[1])
    if loss == "logistic":
        b = float(np.log(y.mean() / (1 - y.mean())))  # the optimum of b at w = 0
        return _newton(xs, t, 1 / (C * len(y)), loss, 0.0, w, b, rtol)
    b = 0.0
    for band in [0.0] if loss == "squared_hinge" else 10.0 ** -np.arange(1, 9):
        w, b, _ = _newton(xs, t, 1 / (C * len(y)), loss, band, w, b, rtol)
    return w, b, objective(xs, y, w, b, C, loss)


def _derivatives(loss: str, m: np.ndarray,
                 band: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each margin m's loss and its first and second derivatives in m; the hinge rounded as
    r²/2ε over 0 < r = 1 − m < ε (between hinge − ε/2 and hinge)."""
    if loss == "logistic":
        return np.logaddexp(0, -m), -expit(-m), expit(m) * expit(-m)
    r = 1 - m
    if loss == "squared_hinge":
        return np.maximum(r, 0) ** 2, -2 * np.maximum(r, 0), 2.0 * (r > 0)
    inside = (r > 0) & (r < band)
    value = np.where(r >= band, r - band / 2, np.where(inside, r * r / (2 * band), 0.0))
    return value, -np.clip(r / band, 0, 1), inside / band


def _newton(xs: Features, t: np.ndarray, lam: float, loss: str, band: float, w: np.ndarray,
            b: float, rtol: float) -> tuple[np.ndarray, float, float]:
    n = len(t)
    margins = t * (xs @ w + b)
    value = float(_derivatives(loss, margins, band)[0].mean() + 0.5 * lam * w @ w)
    for _ in range(200):
        _, first, second = _derivatives(loss, margins, band)
        dloss = t * first / n  # d mean loss / d s_i
        grad = np.append(xs.T @ dloss + lam * w, dloss.sum())
        step = -_newton_direction(xs, second / n, lam, grad)
        decrement = -grad @ step
        shift = t * (xs @ step[:-1] + step[-1])  # the margins move by size × shift

        def f(size: float) -> float:
            moved = w + size * step[:-1]
            return float(_derivatives(loss, margins + size * shift, band)[0].mean()
                         + 0.5 * lam * moved @ moved)

        if decrement / 2 <= rtol * value:  # one last full step: the gap is then ~rtol² · f
            return (w + step[:-1], b + step[-1], new) if (new := f(1.0)) <= value else (w, b, value)
        size = 1.0  # backtracking (Armijo), for the first steps from far away
        while (new := f(size)) > value - 0.25 * size * decrement:
            size /= 2
            if size < 1e-12:
                raise RuntimeError(f"reference: line search failed at f = {value:.17g}, "
                                   f"Newton decrement {decrement:.3g}")
        w, b, value = w + size * step[:-1], b + size * step[-1], new
        margins = margins + size * shift
    raise RuntimeError(f"reference: no convergence in 200 Newton steps, f = {value:.17g}, "
                       f"Newton decrement {decrement:.3g}")


def _newton_direction(xs: Features, curvature: np.ndarray, lam: float,
                      grad: np.ndarray) -> np.ndarray:
    """H⁻¹ · grad for the Hessian of f in (w, b): [[X'ᵀDX + λI, X'ᵀD1], [1ᵀDX, 1ᵀD1]].

    The bias's curvature is taken as at least λ: with the hinge's band empty it is 0, and H
    singular.
    """
    d = xs.shape[1]
    bias_floor = max(0.0, lam - curvature.sum())
    if d <= DENSE_HESSIAN_MAX:
        rows = np.flatnonzero(curvature)  # for the hinge, the few rows in its band
        curvature, xs = curvature[rows], xs[rows]
        weighted = sparse.diags(curvature) @ xs
        xtdx = xs.T @ weighted
        hessian = np.empty((d + 1, d + 1))
        hessian[:d, :d] = xtdx.toarray() if sparse.issparse(xtdx) else xtdx
        hessian[:d, :d] += lam * np.eye(d)
        hessian[:d, d] = hessian[d, :d] = np.asarray(weighted.sum(0)).ravel()
        hessian[d, d] = curvature.sum() + bias_floor
        return np.linalg.solve(hessian, grad)

    def product(v: np.ndarray) -> np.ndarray:
        u = curvature * (xs @ v[:d] + v[d])
        return np.append(xs.T @ u + lam * v[:d], u.sum() + bias_floor * v[d])

    operator = LinearOperator((d + 1, d + 1), matvec=product, dtype=np.float64)
    direction, info = cg(operator, grad, rtol=1e-12, atol=0.0, maxiter=20 * d)
    if info != 0:
        raise RuntimeError(f"reference: CG did not converge ({info}) for {d} weights")
    return direction
