"""regularization.l1: exact zeros, by FISTA's proximal steps in memory and FTRL's own L1
streamed, through the CLI; the solution checked against the objective's optimality
conditions."""

import json

import pytest
import torch

pytest.importorskip("scipy")

import datasets  # noqa: E402  (tests/datasets.py)
from conftest import run_cli  # noqa: E402

from largeml import losses  # noqa: E402
from largeml.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.e2e

L1 = 0.01


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("few")
    split = datasets.few_relevant()
    datasets.write_npy(tmp, split)
    datasets.write_libsvm(tmp / "train.svm", split.x_train, split.y_train)
    datasets.write_libsvm(tmp / "val.svm", split.x_val, split.y_val)
    return tmp, split


def train(tmp, name, *overrides, sparse=False):
    run_dir = tmp / name
    data = ([f"data.train_path={tmp / 'train.svm'}", f"data.val_path={tmp / 'val.svm'}"]
            if sparse else
            [f"data.train_path={tmp / 'x_train.npy'}", f"data.labels={tmp / 'y_train.npy'}",
             f"data.val_path={tmp / 'x_val.npy'}", f"data.val_labels={tmp / 'y_val.npy'}"])
    result = run_cli("data=files", *data, f"data.cache_dir={tmp / 'cache'}",
                     f"hydra.run.dir={run_dir}", *overrides, cwd=tmp, timeout=300)
    return run_dir, result


def solution(run_dir):
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert not state["input.active"]  # N(0, 1) features: data.scale=auto leaves them
    return state["linear.weight"].double()[0], state["linear.bias"].double()[0]


def smooth_gradient(split, w, b, l2):
    """∇ of mean logistic loss + l2/2·‖w‖² at (w, b), float64."""
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    f = losses.bce(x @ w + b, y).mean() + l2 / 2 * w.pow(2).sum()
    f.backward()
    return w.grad, b.grad


def test_fista_sets_irrelevant_weights_to_exactly_zero_at_the_l1_optimum(few):
    tmp, split = few
    run_dir, result = train(tmp, "fista", f"regularization.l1={L1}", "regularization.C=null",
                            "regularization.l2=0")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "optimizer=auto: fista" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "converged"
    w, b = solution(run_dir)
    assert (w[10:] == 0).double().mean() >= 0.9  # the noise features: exact zeros
    assert (w[:10] != 0).all()  # the relevant ones survive
    # Optimality of mean loss + λ1·‖w‖₁: ∂/∂b = 0, |g_j| ≤ λ1 where w_j = 0, and
    # g_j = −λ1·sign(w_j) elsewhere (to the solver's tolerance).
    g, g_b = smooth_gradient(split, w, b, 0.0)
    zero = w == 0
    assert abs(g_b) < 1e-3
    assert (g[zero].abs() <= L1 * 1.05).all()
    assert (g[~zero] + L1 * torch.sign(w[~zero])).abs().max() < 1e-3
    assert metrics["train/objective"] == pytest.approx(
        (losses.bce(torch.from_numpy(split.x_train) @ w + b, torch.from_numpy(split.y_train))
         .mean() + L1 * w.abs().sum()).item(), rel=1e-5)


@pytest.mark.slow  # the default tier keeps a shorter case of the same kind
def test_ftrl_streams_the_same_sparse_model(few):
    tmp, split = few
    fista, result = train(tmp, "fista-sparse", f"regularization.l1={L1}", sparse=True)
    assert result.returncode == 0, result.stdout[-3000:]
    ftrl, result = train(tmp, "ftrl", "optimizer=ftrl", f"regularization.l1={L1}", sparse=True)
    assert result.returncode == 0, result.stdout[-3000:]
    w, _ = solution(ftrl)
    assert (w[10:] == 0).double().mean() >= 0.9 and (w[:10] != 0).all()
    f_ftrl = json.loads((ftrl / "metrics.json").read_text())["train/objective"]
    f_fista = json.loads((fista / "metrics.json").read_text())["train/objective"]
    assert f_fista <= f_ftrl <= f_fista * 1.005  # FTRL stops when f stalls, near the optimum


@pytest.mark.parametrize("overrides, message", [
    (["optimizer=adam"], "regularization.l1=0.01 needs an optimizer with a proximal step"),
    (["model=mlp"], "regularization.l1 is for linear models"),
])
def test_l1_without_a_proximal_optimizer_is_a_config_error(few, overrides, message):
    tmp, _ = few
    _, result = train(tmp, "bad", f"regularization.l1={L1}", "trainer.max_epochs=1", *overrides)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr


def test_export_lists_the_features_that_survive(few):
    import subprocess
    import sys

    from conftest import REPO

    tmp, _ = few
    run_dir, result = train(tmp, "listed", f"regularization.l1={L1}")
    assert result.returncode == 0, result.stdout[-3000:]
    w, _ = solution(run_dir)
    listing = subprocess.run(
        [sys.executable, "-m", "largeml.export", f"checkpoint={run_dir / 'checkpoints/last.pt'}",
         f"output={tmp / 'w.npy'}", "top_k=10"], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert listing.returncode == 0, listing.stdout[-3000:]
    lines = listing.stdout.splitlines()
    assert lines[0] == f"{int((w != 0).sum())} of 500 features have a non-zero weight"
    listed = {int(line.split()[1].rstrip(":")) for line in lines[1:11]}
    assert listed == set(range(1, 11))  # the ten relevant features, by |w|
