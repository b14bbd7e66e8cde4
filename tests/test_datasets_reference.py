"""The convergence check's own footing (tests/datasets.py): the generated sets are deterministic
and as described, the LIBSVM writer round-trips, and the float64 reference is the optimum of
the documented objective, checked against scikit-learn's independent solver."""

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")
sklearn = pytest.importorskip("sklearn")

from scipy import sparse  # noqa: E402
from sklearn.datasets import load_svmlight_file  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import datasets  # noqa: E402  (tests/datasets.py)

pytestmark = pytest.mark.unit

# n_features, and the range the positive share of the training rows must fall in
SHAPES = {
    "dense_imbalanced": (22, 0.08, 0.12),
    "text": (8_000, 0.05, 0.09),
    "binary_rare": (300, 0.02, 0.04),
    "onehot": (112, 0.45, 0.55),
    "breast_cancer": (30, 0.55, 0.70),
    "scales": (10, 0.45, 0.55),
    "wine": (13, 0.30, 0.50),
    "digits": (64, 0.07, 0.13),
}


def _same(a: datasets.Features, b: datasets.Features) -> bool:
    if sparse.issparse(a):
        return sparse.issparse(b) and a.shape == b.shape and (a != b).nnz == 0
    return np.array_equal(a, b)


@pytest.mark.parametrize("name", sorted(datasets.SETS))
def test_sets_are_deterministic_and_as_described(name: str) -> None:
    first, again, other = (datasets.SETS[name](seed) for seed in (0, 0, 1))
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first.y_train, other.y_train), "seed 1 gave seed 0's split"
    n_features, low, high = SHAPES[name]
    assert first.x_train.shape[1] == first.x_val.shape[1] == n_features
    assert first.x_train.shape[0] == len(first.y_train) >= 2 * len(first.y_val) > 0
    for y in (first.y_train, first.y_val):
        assert set(np.unique(y)) == {0.0, 1.0}
    assert low <= first.y_train.mean() <= high
    x = first.x_train
    assert np.isfinite(x.data if sparse.issparse(x) else x).all()


def test_text_rows_are_normalised_sparse_documents() -> None:
    x = datasets.text().x_train
    per_row = np.diff(x.indptr)
    assert 20 <= per_row.min() and per_row.max() <= 100 and 30 <= per_row.mean() <= 80
    np.testing.assert_allclose(np.sqrt(x.multiply(x).sum(1)), 1.0, rtol=1e-12)


@pytest.mark.parametrize("signed", [True, False])
def test_write_libsvm_round_trips(tmp_path: Path, signed: bool) -> None:
    rng = np.random.default_rng(0)
    x = sparse.random(300, 50, density=0.1, format="csr", random_state=1,
                      data_rvs=lambda k: rng.standard_normal(k) * 10.0 ** rng.uniform(-5, 5, k))
    x = sparse.csr_matrix(sparse.diags((np.arange(300) != 7).astype(float)) @ x)
    x.eliminate_zeros()  # row 7 is empty: still a line, of its label alone
    y = (rng.random(300) < 0.3).astype(np.float64)
    path = tmp_path / "x.svm"
    datasets.write_libsvm(path, x, y, signed=signed, chunk_rows=64)
    read_x, read_y = load_svmlight_file(str(path), n_features=50)
    assert path.read_text().splitlines()[7] == str(int(2 * y[7] - 1 if signed else y[7]))
    np.testing.assert_array_equal(read_y, 2 * y - 1 if signed else y)
    assert read_x.nnz == x.nnz
    np.testing.assert_allclose(read_x.toarray(), x.toarray(), rtol=5e-7)  # %.7g


def test_objective_is_the_documented_one() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    y = np.array([1.0, 0.0, 0.0])
    w, b = np.array([0.5, -1.0]), 0.25
    shift, mult = np.array([1.0, 0.0]), np.array([2.0, 0.5])
    s = ((x - shift) * mult) @ w + b  # 0.25, -1.75, 1.75
    t = np.array([1.0, -1.0, -1.0])
    penalty = 0.5 / (2.0 * 3) * (0.25 + 1.0)  # C = 2, n = 3
    logistic = np.mean(np.log1p(np.exp(-t * s))) + penalty
    hinge = np.mean(np.maximum(0, 1 - t * s)) + penalty
    assert datasets.objective(x, y, w, b, 2.0, "logistic", shift, mult) == pytest.approx(logistic)
    assert datasets.objective(x, y, w, b, 2.0, "hinge", shift, mult) == pytest.approx(hinge)
    assert hinge == pytest.approx((0.75 + 0 + 2.75) / 3 + penalty)


def test_sparse_x_takes_no_shift() -> None:
    x = sparse.csr_matrix(np.eye(3))
    with pytest.raises(ValueError, match="shift = 0 only"):
        datasets.scaled(x, shift=np.array([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(datasets.scaled(x, mult=np.array([1.0, 2.0, 3.0])).toarray(),
                               np.diag([1.0, 2.0, 3.0]))


def _sklearn_objective(x: datasets.Features, y: np.ndarray, C: float) -> float:
    """f at scikit-learn's lbfgs solution: it minimises C_sk · Σ loss + ½‖w‖² with the intercept
    unpenalised, i.e. our f with λ = 1 / (C_sk · n): the same problem at C_sk = C."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # it would void the comparison
        model = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x, y)
    return datasets.objective(x, y, model.coef_.ravel(), model.intercept_[0], C)


@pytest.mark.parametrize("name, C, dense_hessian", [
    ("breast_cancer", 1.0, True),  # standardised below, so that lbfgs converges too
    ("breast_cancer", 0.05, False),  # CG for the Newton steps, as for > 2,000 weights
    ("onehot", 1.0, True),  # sparse, nearly separable
    ("digits", 1.0, False),
])
def test_reference_is_sklearns_optimum(name: str, C: float, dense_hessian: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    split = datasets.SETS[name](0)
    x, y = split.x_train, split.y_train
    shift = mult = None
    if not sparse.issparse(x):
        shift, mult = x.mean(0), 1 / x.std(0).clip(1e-12)
    if not dense_hessian:
        monkeypatch.setattr(datasets, "DENSE_HESSIAN_MAX", 0)
    w, b, value = datasets.reference(x, y, C, shift=shift, mult=mult)
    assert value == pytest.approx(datasets.objective(x, y, w, b, C, shift=shift, mult=mult),
                                  rel=1e-14)
    theirs = _sklearn_objective(datasets.scaled(x, shift, mult), y, C)
    assert value <= theirs * (1 + 1e-12)  # nothing beats the optimum
    assert value == pytest.approx(theirs, rel=1e-7)


def test_reference_solves_unscaled_features() -> None:
    """On raw breast cancer features (1e-3 ... 4e3: a Hessian conditioned ~1e9) the optimum is
    still exact: the Newton decrement, from a Hessian formed here, puts f within 1e-15 of f*."""
    from scipy.special import expit

    split = datasets.breast_cancer()
    x, y, n = split.x_train, split.y_train, len(split.y_train)
    w, b, value = datasets.reference(x, y)
    t = 2 * y - 1
    margins = t * (x @ w + b)
    dloss = -t * expit(-margins) / n
    grad = np.append(x.T @ dloss + w / n, dloss.sum())
    z = np.hstack([x, np.ones((n, 1))])
    hessian = z.T @ ((expit(margins) * expit(-margins) / n)[:, None] * z)
    hessian[:-1, :-1] += np.eye(x.shape[1]) / n
    assert 0.5 * grad @ np.linalg.solve(hessian, grad) < 1e-15 * value


def _small_problem() -> tuple[np.ndarray, np.ndarray]:
    """80 rows × 3 standardised features of `scales`: small enough for a generic QP solver."""
    split = datasets.scales()
    x, y = split.x_train[:80, :3], split.y_train[:80]
    return (x - x.mean(0)) / x.std(0), y


def test_hinge_reference_is_the_qp_optimum() -> None:
    """The rounded-hinge homotopy against the hinge SVM solved as the QP it is, by SLSQP:
    min mean ξ + λ/2‖w‖² over (w, b, ξ), with ξ ≥ 0 and ξ_i ≥ 1 − t_i (x_i · w + b)."""
    from scipy.optimize import minimize

    x, y = _small_problem()
    n, d = x.shape
    t, lam = 2 * y - 1, 1 / n
    rows = np.hstack([t[:, None] * x, t[:, None], np.eye(n)])  # t(x·w + b) + ξ − 1 ≥ 0
    qp = minimize(
        lambda v: v[d + 1:].mean() + 0.5 * lam * v[:d] @ v[:d], np.append(np.zeros(d + 1),
                                                                          np.ones(n)),
        jac=lambda v: np.concatenate([lam * v[:d], [0.0], np.full(n, 1 / n)]),
        constraints=[{"type": "ineq", "fun": lambda v: rows @ v - 1, "jac": lambda v: rows}],
        bounds=[(None, None)] * (d + 1) + [(0, None)] * n, method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert qp.success, qp.message
    w, b, value = datasets.reference(x, y, loss="hinge")
    assert value == pytest.approx(datasets.objective(x, y, w, b, loss="hinge"), rel=1e-14)
    assert value == pytest.approx(qp.fun, rel=1e-7)
    np.testing.assert_allclose(np.append(w, b), qp.x[:d + 1], atol=1e-5)


def test_squared_hinge_reference_is_the_optimum() -> None:
    from scipy.optimize import minimize

    x, y = _small_problem()
    t, lam = 2 * y - 1, 1 / len(y)

    def f(v: np.ndarray) -> tuple[float, np.ndarray]:
        r = np.maximum(0, 1 - t * (x @ v[:-1] + v[-1]))
        ds = -2 * t * r / len(y)
        return (r @ r / len(y) + 0.5 * lam * v[:-1] @ v[:-1],
                np.append(x.T @ ds + lam * v[:-1], ds.sum()))

    theirs = minimize(f, np.zeros(4), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-12, "ftol": 0, "maxiter": 10_000})
    w, b, value = datasets.reference(x, y, loss="squared_hinge")
    assert value <= theirs.fun * (1 + 1e-12)
    assert value == pytest.approx(theirs.fun, rel=1e-9)
