"""model=mlp with its defaults (optimizer=auto) on nine sets, three splits each: the
measurement behind the MLP's defaults (`largeml/auto.py`, MLP_DEFAULTS).

    python scripts/mlp_defaults.py                 # about 6 minutes on 2 cores
    python scripts/mlp_defaults.py digits_classes  # one set; extra key=value args go to train

Each set of `tests/datasets.py` is written to files (dense ones as .npy, sparse ones as LIBSVM)
and trained with `python -m largeml.train model=mlp data=files ...`; a9a and 40,000 synthetic
rows with `data=a9a` / `data=synthetic`, seeds 0 and 1. Prints validation accuracy, epochs and
why each run stopped.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import datasets  # noqa: E402  (tests/datasets.py)

FILE_SETS = ("digits_classes", "wine", "breast_cancer", "dense_imbalanced", "binary_rare",
             "interactions", "shells")
SPARSE = ("digits_classes", "binary_rare")  # written as LIBSVM (digits as the multiclass table)


def data_args(name: str, seed: int, root: Path) -> list[str]:
    if name == "a9a":
        return ["data=a9a"]
    if name == "synthetic":
        return ["data=synthetic", "data.n_samples=40000"]
    split = getattr(datasets, name)(seed)
    if name in SPARSE:
        train, val = root / "train.svm", root / "val.svm"
        datasets.write_libsvm(train, split.x_train, split.y_train, signed=False)
        datasets.write_libsvm(val, split.x_val, split.y_val, signed=False)
        return ["data=files", f"data.train_path={train}", f"data.val_path={val}"]
    datasets.write_npy(root, split)
    return ["data=files", f"data.train_path={root / 'x_train.npy'}",
            f"data.labels={root / 'y_train.npy'}", f"data.val_path={root / 'x_val.npy'}",
            f"data.val_labels={root / 'y_val.npy'}"]


def main() -> None:
    names = [a for a in sys.argv[1:] if "=" not in a] or [*FILE_SETS, "a9a", "synthetic"]
    extra = [a for a in sys.argv[1:] if "=" in a]
    print("| set | seed | val accuracy | epochs | stopped |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        for seed in (0, 1) if name in ("a9a", "synthetic") else (0, 1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                args = data_args(name, seed, root)
                if "data=files" in args:
                    args.append(f"data.cache_dir={root / 'cache'}")
                subprocess.run([sys.executable, "-m", "largeml.train", "model=mlp", *args,
                                f"seed={seed}", f"hydra.run.dir={root / 'run'}", *extra],
                               check=True, capture_output=True, cwd=REPO)
                metrics = json.loads((root / "run" / "metrics.json").read_text())
            print(f"| {name} | {seed} | {metrics['val/accuracy']:.2%} | {metrics['epoch']} | "
                  f"{metrics['stopped']} |", flush=True)


if __name__ == "__main__":
    main()
