"""The CUDA path: skipped cleanly where PyTorch sees no GPU."""

import json

import pytest
import torch
from conftest import SMALL, run_cli, write_dense_shards

from largeml.checkpoint import load_checkpoint
from largeml.device import resolve_device
from largeml.train import run
from largeml.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.unit
def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["32", "bf16"])
@pytest.mark.parametrize("model", ["logreg", "svm", "mlp"])
def test_train_on_cuda(tmp_path, model, precision):
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", *SMALL, f"model={model}", "trainer.device=cuda",
                     f"trainer.precision={precision}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "training on cuda" in result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/accuracy"] > 0.75
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())


@pytest.mark.e2e
@pytest.mark.parametrize("overrides", [
    ["model=logreg"],  # multinomial, the full-batch L-BFGS on GPU-held rows
    ["model=svm", "optimizer=sgd", "loss.multiclass=ovr"],
    ["model=mlp", "loss.class_weight=balanced"],
    ["model=rff", "model.n_components=256"],
], ids=["logreg", "svm-ovr", "mlp-weighted", "rff"])
def test_three_classes_on_cuda_match_the_cpu(tmp_path, overrides):
    three = ["data.n_samples=3000", "data.n_features=20", "data.n_classes=3",
             "trainer.max_epochs=3", *overrides]
    accuracy = {}
    for device in ("cpu", "cuda"):
        run_dir = tmp_path / device
        result = run_cli(f"hydra.run.dir={run_dir}", *three, f"trainer.device={device}",
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        accuracy[device] = json.loads((run_dir / "metrics.json").read_text())["val/accuracy"]
    assert accuracy["cpu"] > 0.6  # chance is 1/3
    assert accuracy["cuda"] == pytest.approx(accuracy["cpu"], abs=0.02)


@pytest.mark.e2e
def test_a9a_on_cuda_matches_cpu_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=a9a", "trainer.device=cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["val/accuracy"] >= 0.845


@pytest.mark.unit
def test_resident_data_trains_from_gpu_memory(compose_config, tmp_path, monkeypatch, caplog):
    """data.resident=true: the Trainer puts the rows on the GPU once; every batch it trains on
    is already there (nothing pinned, nothing copied)."""
    caplog.set_level("INFO")
    data = write_dense_shards(tmp_path / "data", 3000, 20)
    devices = set()
    train_step = Trainer.train_step

    def recording_step(self, batches, **kwargs):
        devices.update(t.device.type for batch in batches for t in batch)
        return train_step(self, batches, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    cfg = compose_config("data=files", f"data.train_path={data}", f"data.val_path={data}",
                         "data.batch_size=64", "data.resident=true", "trainer.device=cuda",
                         "trainer.max_epochs=2", "optimizer=sgd", "trainer.tol=0")
    metrics = run(cfg, tmp_path / "run")
    assert "data resident on cuda" in caplog.text
    assert devices == {"cuda"}
    assert metrics["val/accuracy"] > 0.8


@pytest.mark.unit
@pytest.mark.parametrize("model", ["logreg", "svm"])
def test_full_batch_newton_on_gpu_equals_cpu(compose_config, tmp_path, model, caplog):
    """The default solver with its training rows held in GPU memory: the same optimum as on
    the CPU (the same objective to 1e-6), and every row it trains on is on the GPU."""
    caplog.set_level("INFO")
    metrics = {}
    for device in ("cuda", "cpu"):
        cfg = compose_config("data.n_samples=20000", "data.n_features=30", f"model={model}",
                             f"trainer.device={device}")
        metrics[device] = run(cfg, tmp_path / device)
    assert "training rows held on cuda" in caplog.text
    assert metrics["cuda"]["stopped"] == "converged"
    assert metrics["cuda"]["train/objective"] == pytest.approx(
        metrics["cpu"]["train/objective"], rel=1e-6)


@pytest.mark.e2e
def test_sparse_full_batch_on_gpu(tmp_path):
    """LIBSVM (sparse CSR batches) through Newton's CG path on the GPU."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(3000):
        cols = np.sort(rng.choice(5000, size=20, replace=False))
        label = 1 if cols[0] < 2500 else -1
        lines.append(f"{label} " + " ".join(f"{c + 1}:{rng.random():.4f}" for c in cols))
    (tmp_path / "train.svm").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=libsvm",
                     f"data.train_path={tmp_path / 'train.svm'}", "trainer.device=cuda",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "converged"


@pytest.mark.unit
def test_ftrl_batch_form_on_cuda_matches_the_cpu(tmp_path):
    """FTRL's batch form (torch index ops) takes the same steps on CUDA as on the CPU."""
    from largeml.ftrl import FTRL
    from largeml.losses import bce
    from largeml.models import Linear

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(10):
        cols = torch.randint(0, 500, (64 * 6,), generator=g, dtype=torch.int32)
        x = torch.sparse_csr_tensor(torch.arange(0, 64 * 6 + 1, 6, dtype=torch.int32), cols,
                                    torch.rand(64 * 6, generator=g), size=(64, 500))
        batches.append((x, (torch.rand(64, generator=g) > 0.5).float()))
    weights = []
    for device in ("cpu", "cuda"):
        model = Linear(500).to(device)
        optimizer = FTRL(model.parameters(), l2=1e-3)
        for x, y in batches:
            optimizer._batch_step(model, x.to(device), y.to(device), bce, 0.3, 1.0,
                                  1e-3 * optimizer.state["ftrl"]["rows"])
            optimizer.state["ftrl"]["rows"] += len(y)
        optimizer.settle()
        weights.append(model.linear.weight.detach().cpu())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)


@pytest.mark.e2e
def test_ftrl_trains_sparse_shards_on_cuda(tmp_path):
    from conftest import write_sparse_shards

    data = write_sparse_shards(tmp_path / "data", 4000, 300)
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=files", f"data.train_path={data}",
                     f"data.val_path={data}", "optimizer=ftrl", "trainer.device=cuda",
                     "trainer.max_epochs=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["val/accuracy"] > 0.7
