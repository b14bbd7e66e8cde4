"""model=rff (random Fourier features, then a linear SVM) against the exact RBF kernel SVM and a
linear one, as the number of random features grows.

    python scripts/rff_curve.py           # about three minutes

Two dense non-linear sets of `tests/datasets.py` (`interactions`, `shells`; 4,500 training and
1,500 validation rows each), written as `.npy` and trained through the CLI with defaults
(`data=files`, `model=rff model.n_components=D`, and `model=svm`); scikit-learn's
`SVC(kernel="rbf", C=1, gamma="scale")` on the same rows standardised (what `data.scale=auto`
does to dense data) is the exact kernel SVM. Prints a Markdown table of validation accuracy
and wall seconds (the whole command).
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import datasets  # noqa: E402  (tests/datasets.py)

COMPONENTS = (100, 250, 500, 1000, 2000, 4000)


def train(tmp: Path, *overrides: str) -> tuple[float, float]:
    run_dir = tmp / "run"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "largeml.train", "data=files",
                    f"data.train_path={tmp / 'x_train.npy'}", f"data.labels={tmp / 'y_train.npy'}",
                    f"data.val_path={tmp / 'x_val.npy'}", f"data.val_labels={tmp / 'y_val.npy'}",
                    f"data.cache_dir={tmp / 'cache'}", f"hydra.run.dir={run_dir}", *overrides],
                   check=True, capture_output=True, cwd=REPO)
    seconds = time.perf_counter() - started
    accuracy = json.loads((run_dir / "metrics.json").read_text())["val/accuracy"]
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    return accuracy, seconds


def main() -> None:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    header = ["set", "linear svm", *(f"rff D={d}" for d in COMPONENTS), "exact RBF SVC"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for name in ("interactions", "shells"):
        split = getattr(datasets, name)()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            datasets.write_npy(tmp, split)
            cells = ["{:.2%} ({:.0f} s)".format(*train(tmp, "model=svm"))]
            for d in COMPONENTS:
                cells.append("{:.2%} ({:.0f} s)".format(
                    *train(tmp, "model=rff", f"model.n_components={d}")))
            scaler = StandardScaler().fit(split.x_train)
            started = time.perf_counter()
            exact = SVC(C=1.0, gamma="scale").fit(scaler.transform(split.x_train), split.y_train)
            seconds = time.perf_counter() - started
            cells.append(f"{exact.score(scaler.transform(split.x_val), split.y_val):.2%} "
                         f"({seconds:.1f} s, fit alone)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
