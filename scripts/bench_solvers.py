"""Full-batch solvers on a9a, side by side in one process: largeml against scikit-learn.

    python scripts/bench_solvers.py                 # CPU, 3 repeats
    python scripts/bench_solvers.py --device cuda   # largeml on the GPU (scikit-learn on CPU)

Every contender solves the same problem, logistic regression with C = 1 on a9a's 32,561 rows
(mean log-loss + λ/2·‖w‖², λ = 1/n, bias unpenalised), from data already in memory: loading
and parsing the files is excluded. largeml runs through the CLI's own code
(`largeml.train.run` with the composed config: the Trainer, its scaling pass, validation and
checkpoint writes each epoch included) with `optimizer=newton` (the default `auto` choice) and
`optimizer=lbfgs`; scikit-learn's `LogisticRegression` with its default lbfgs solver, on the
dense array and on CSR (the format `load_svmlight_file` gives), on CSR with a tolerance tight
enough to reach largeml's precision, and with `solver="liblinear"`
(LIBLINEAR, which also penalises the bias: its objective differs slightly). The relative gap
(f − f*)/f* is against f*, the float64 optimum found by Newton's method run to machine
precision. Reports the median time of --repeat runs and the gap as a Markdown table.
A benchmark, not a test: times depend on the machine.
"""

import argparse
import functools
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from hydra import compose, initialize_config_dir

import largeml.data
from largeml.checkpoint import load_checkpoint
from largeml.train import CONFIG_DIR, run


def f64_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    s = x @ w + b
    return float(np.mean(np.logaddexp(0, -(2 * y - 1) * s)) + 0.5 / len(y) * w @ w)


def f64_optimum(x: np.ndarray, y: np.ndarray) -> float:
    """Newton's method in float64 on the exact objective, to machine precision."""
    n, d = x.shape
    z = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    penalty = np.full(d + 1, 1 / n)
    penalty[-1] = 0
    for _ in range(50):
        p = 1 / (1 + np.exp(-(z @ theta)))
        g = z.T @ (p - y) / n + penalty * theta
        h = (z * (p * (1 - p))[:, None]).T @ z / n + np.diag(penalty)
        theta -= np.linalg.solve(h, g)
        if np.linalg.norm(g) < 1e-13:
            break
    return f64_objective(x, y, theta[:-1], theta[-1])


def largeml_fit(optimizer: str, device: str, directory: Path) -> tuple[float, np.ndarray, float]:
    """Seconds of `largeml.train.run` (data cached in memory), weights, bias."""
    run_dir = Path(tempfile.mkdtemp(dir=directory))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data=a9a", f"optimizer={optimizer}",
                                          f"trainer.device={device}"])
    started = time.perf_counter()
    run(cfg, run_dir)
    seconds = time.perf_counter() - started
    model = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    return seconds, model["linear.weight"][0].double().numpy(), float(model["linear.bias"][0])


def timed(fit, repeat: int) -> tuple[float, float, float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fit()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "largeml-solvers")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # Load once; largeml's runs get this parsed copy (data=a9a calls largeml.data.a9a, which the
    # config's _target_ finds through this module attribute). A first, untimed run of each
    # solver fills the cache and warms up PyTorch.
    data = largeml.data.a9a()
    largeml.data.a9a = functools.cache(largeml.data.a9a)
    for optimizer in ("newton", "lbfgs"):
        largeml_fit(optimizer, args.device, args.dir)
    x = data.train.x.double().numpy()
    y = data.train.y.double().numpy()
    x_csr = scipy.sparse.csr_matrix(data.train.x.numpy())
    optimum = f64_optimum(x, y)

    rows = []
    for optimizer in ("newton", "lbfgs"):
        runs = [largeml_fit(optimizer, args.device, args.dir) for _ in range(args.repeat)]
        times = [r[0] for r in runs]
        _, w, b = runs[-1]
        rows.append((f"largeml optimizer={optimizer} ({args.device}, CLI code path)",
                     statistics.median(times), min(times), max(times),
                     f64_objective(x, y, w, b)))
    peers = (("scikit-learn LogisticRegression() dense", x, {}),
             ("scikit-learn LogisticRegression() CSR", x_csr, {}),
             ("scikit-learn LogisticRegression(tol=1e-8, max_iter=10000) CSR", x_csr,
              {"tol": 1e-8, "max_iter": 10_000}),
             ("LIBLINEAR (solver=liblinear), CSR", x_csr, {"solver": "liblinear"}))
    for label, features, options in peers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            median, low, high, model = timed(
                lambda f=features, o=options: LogisticRegression(C=1.0, **o).fit(f, y),
                args.repeat)
        rows.append((label, median, low, high,
                     f64_objective(x, y, model.coef_[0], float(model.intercept_[0]))))

    print(f"\na9a, logistic regression, C = 1: {x.shape[0]} rows x {x.shape[1]} features; "
          f"f* = {optimum:.10f}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| solver | seconds (median of %d, range) | relative gap (f − f*)/f* |" % args.repeat)
    print("|---|---:|---:|")
    for label, median, low, high, f in rows:
        print(f"| {label} | {median:.3f} ({low:.3f}–{high:.3f}) | {(f - optimum) / optimum:.1e} |")
    for label, median, *_ in rows[2:]:
        print(f"largeml newton's time / {label}'s: {rows[0][1] / median:.2f}")


if __name__ == "__main__":
    main()
