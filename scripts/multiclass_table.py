"""largeml against scikit-learn on more than two classes, through the CLI with defaults.

    python scripts/multiclass_table.py            # about a minute

Two sets of `tests/datasets.py`: scikit-learn's digits (10 classes) and `topics` (20 topics,
sparse text-like rows). Each is written as LIBSVM files and trained with
`python -m largeml.train data=files data.train_path=… data.val_path=…` (plus `model=svm`,
`model=mlp`); scikit-learn's `LogisticRegression(C=1)` (multinomial), `LinearSVC(C=1)` and
`MLPClassifier()` are fitted on the same rows, scaled by the checkpoint's own input map.
Prints a Markdown table of validation accuracies and, for logistic regression, the objective
mean loss + λ/2·‖W‖² (λ = 1/n) of both solutions on the training rows.
"""

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.special import logsumexp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import datasets  # noqa: E402  (tests/datasets.py)

from largeml.checkpoint import load_checkpoint  # noqa: E402


def scaled(x, state: dict):
    mult, shift = state["input.mult"].double().numpy(), state["input.shift"].double().numpy()
    if sparse.issparse(x):
        return sparse.csr_matrix(x @ sparse.diags(mult))
    return (x - shift) * mult


def objective(w: np.ndarray, b: np.ndarray, x, y: np.ndarray) -> float:
    s = np.asarray(x @ w.T) + b
    loss = logsumexp(s, axis=1) - s[np.arange(len(y)), y.astype(int)]
    return float(loss.mean() + 0.5 / len(y) * (w ** 2).sum())


def train(tmp: Path, name: str, files: tuple[Path, Path], *overrides: str) -> tuple[dict, dict]:
    run_dir = tmp / name
    subprocess.run([sys.executable, "-m", "largeml.train", "data=files",
                    f"data.train_path={files[0]}", f"data.val_path={files[1]}",
                    f"data.cache_dir={tmp / 'cache'}", f"hydra.run.dir={run_dir}", *overrides],
                   check=True, capture_output=True, cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, load_checkpoint(run_dir / "checkpoints" / "last.pt")


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    warnings.simplefilter("ignore")
    print("| set | classes | model | largeml val acc | scikit-learn val acc | largeml objective "
          "(scikit-learn's) | largeml stopped, epochs |")
    print("|---|---:|---|---:|---:|---:|---|")
    for name, split in (("digits", datasets.digits_classes()), ("topics", datasets.topics())):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = tmp / "train.svm", tmp / "val.svm"
            datasets.write_libsvm(files[0], split.x_train, split.y_train, signed=False)
            datasets.write_libsvm(files[1], split.x_val, split.y_val, signed=False)
            k = len(np.unique(split.y_train))
            for model, peer in (("logreg", LogisticRegression(C=1.0, tol=1e-10, max_iter=20_000)),
                                ("svm", LinearSVC(C=1.0, max_iter=100_000)),
                                ("mlp", MLPClassifier(random_state=0, max_iter=500))):
                metrics, checkpoint = train(tmp, model, files, f"model={model}")
                x_train = scaled(split.x_train, checkpoint["model"])
                x_val = scaled(split.x_val, checkpoint["model"])
                peer.fit(x_train, split.y_train)
                objectives = ""
                if model == "logreg":
                    state = checkpoint["model"]
                    ours = objective(state["linear.weight"].double().numpy(),
                                     state["linear.bias"].double().numpy(), x_train,
                                     split.y_train)
                    theirs = objective(peer.coef_, peer.intercept_, x_train, split.y_train)
                    objectives = f"{ours:.6f} ({theirs:.6f})"
                print(f"| {name} | {k} | {model} (vs {type(peer).__name__}) | "
                      f"{metrics['val/accuracy']:.2%} | {peer.score(x_val, split.y_val):.2%} | "
                      f"{objectives} | {metrics['stopped']}, {metrics['epoch']} |", flush=True)


if __name__ == "__main__":
    main()
