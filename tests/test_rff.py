"""model=rff: random Fourier features of an RBF kernel, then a linear SVM, through the CLI,
against scikit-learn's exact kernel SVM on a set no linear model separates."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

import datasets  # noqa: E402  (tests/datasets.py)
from conftest import REPO, run_cli  # noqa: E402

from largeml.models import RFF  # noqa: E402


@pytest.fixture(scope="module")
def interactions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interactions")
    split = datasets.interactions()
    datasets.write_npy(tmp, split)
    return tmp, split


def train(tmp, name, *overrides):
    run_dir = tmp / name
    result = run_cli("data=files", f"data.train_path={tmp / 'x_train.npy'}",
                     f"data.labels={tmp / 'y_train.npy'}", f"data.val_path={tmp / 'x_val.npy'}",
                     f"data.val_labels={tmp / 'y_val.npy'}", f"data.cache_dir={tmp / 'cache'}",
                     f"hydra.run.dir={run_dir}", *overrides, cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.e2e
@pytest.mark.slow
def test_rff_is_within_a_point_and_a_half_of_the_exact_kernel_svm(interactions):
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    tmp, split = interactions
    scaler = StandardScaler().fit(split.x_train)
    exact = SVC(C=1.0, gamma="scale").fit(scaler.transform(split.x_train), split.y_train)
    exact_accuracy = exact.score(scaler.transform(split.x_val), split.y_val)
    _, linear = train(tmp, "linear", "model=svm")
    assert linear["val/accuracy"] <= exact_accuracy - 0.05  # the set needs the kernel
    run_dir, rff = train(tmp, "rff", "model=rff")
    assert rff["stopped"] == "converged"
    assert rff["val/accuracy"] >= exact_accuracy - 0.015
    # The random features are saved with the model: evaluate scores the same.
    out = tmp / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "largeml.evaluate", f"checkpoint={run_dir / 'checkpoints/last.pt'}",
         f"data.path={tmp / 'x_val.npy'}", f"data.labels={tmp / 'y_val.npy'}",
         f"data.cache_dir={tmp / 'cache'}", f"output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(rff["val/accuracy"])


@pytest.mark.unit
def test_random_features_estimate_the_rbf_kernel():
    torch.manual_seed(0)
    model = RFF(5, n_components=20_000, gamma=0.3)
    x = torch.randn(40, 5)
    z = model.features(x)
    exact = torch.exp(-0.3 * torch.cdist(x, x) ** 2)
    assert (z @ z.T - exact).abs().max() < 0.05  # error of order 1/sqrt(D)
    # Fixed by the seed, not by the global RNG: the same features in every run.
    torch.testing.assert_close(RFF(5, n_components=8, seed=3).omega,
                               RFF(5, n_components=8, seed=3).omega)
    assert [name for name, _ in model.named_parameters()] == ["linear.weight", "linear.bias"]


@pytest.mark.unit
def test_rff_takes_sparse_rows_as_it_takes_dense():
    model = RFF(6, n_components=32, gamma=0.5)
    torch.nn.init.normal_(model.linear.weight)
    dense = torch.tensor([[0.0, 1.5, 0.0, 0.0, -2.0, 0.0], [0.3, 0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(model(dense.to_sparse_csr()), model(dense))


@pytest.mark.e2e
@pytest.mark.parametrize("bad, message", [("model.gamma=-1", "model.gamma must be auto or a"),
                                          ("model.n_components=0", "model.n_components must")])
def test_bad_rff_settings_name_the_key(interactions, bad, message):
    tmp, _ = interactions
    result = run_cli("data=files", f"data.train_path={tmp / 'x_train.npy'}",
                     f"data.labels={tmp / 'y_train.npy'}", f"data.cache_dir={tmp / 'cache'}",
                     f"hydra.run.dir={tmp / 'bad'}", "model=rff", bad, cwd=tmp)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
