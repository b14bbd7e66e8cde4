"""Trains each model on a9a with the shipped defaults (and a few other solvers) and prints a
Markdown table of accuracy on a9a.t, the training objective reached, the epochs and why the run
stopped, next to LIBLINEAR's reference figures (from largeml/data/a9a/README.md).

    python scripts/a9a_table.py [extra overrides applied to every run, e.g. trainer.device=cuda]
"""

import logging
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from largeml.train import CONFIG_DIR, run

RUNS = [  # (overrides, LIBLINEAR 2.50 C=1 reference accuracy on a9a.t, its name)
    (["model=logreg"], 84.99, "L2-regularised logistic regression"),
    (["model=svm"], 84.93, "hinge-loss linear SVM"),
    (["model=svm", "loss=squared_hinge"], 85.00, "L2-loss linear SVM"),
    (["model=logreg", "optimizer=lbfgs"], 84.99, "L2-regularised logistic regression"),
    (["model=logreg", "optimizer=adagrad"], 84.99, "L2-regularised logistic regression"),
    (["model=svm", "optimizer=sgd", "scheduler=pegasos"], 84.93, "hinge-loss linear SVM"),
    (["model=mlp"], None, ""),
]


def main(extra: list[str]) -> None:
    logging.disable(logging.INFO)
    print("| `python -m largeml.train data=a9a ...` | val/accuracy | val/auc | train/objective | "
          "epochs | stopped | wall s | LIBLINEAR 2.50 (C=1) |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides, reference, name in RUNS:
            cfg = compose("train", overrides=["data=a9a", *overrides, *extra])
            with tempfile.TemporaryDirectory() as run_dir:
                started = time.perf_counter()
                metrics = run(cfg, Path(run_dir))
                seconds = time.perf_counter() - started
            ref = f"{reference:.2f} % ({name})" if reference else "—"
            print(f"| `{' '.join(overrides)}` | {100 * metrics['val/accuracy']:.2f} % | "
                  f"{metrics['val/auc']:.4f} | {metrics['train/objective']:.6f} | "
                  f"{metrics['epoch']} | {metrics['stopped']} | {seconds:.1f} | {ref} |",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
