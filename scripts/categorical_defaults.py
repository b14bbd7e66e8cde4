"""The categorical-column defaults (data.hash_bits null: 2^18 buckets; data.feature_columns
null: every numeric column) on generated Parquet sets of other sizes, cardinalities, class
balances and numeric scales than the test's: the CLI with defaults against scikit-learn's
OneHotEncoder + StandardScaler + LogisticRegression(C=1) on the same split.

    python scripts/categorical_defaults.py     # about 2 minutes on 2 cores; needs pyarrow
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder, StandardScaler

REPO = Path(__file__).resolve().parent.parent


def make(seed: int, rows: int, levels: list[int], pos_rate: float, scale: float):
    """Categorical columns c0, c1, ... of `levels` values with random effects, 3 numeric
    columns on `scale`, labels from a logistic model thresholded to `pos_rate` positives."""
    rng = np.random.default_rng(seed)
    cats = {f"c{j}": rng.integers(0, L, rows) for j, L in enumerate(levels)}
    effects = {k: rng.normal(size=L) for k, L in zip(cats, levels)}
    num = rng.normal(size=(rows, 3)) * scale
    score = sum(effects[k][v] for k, v in cats.items()) + num @ (rng.normal(size=3) / scale)
    score += rng.logistic(size=rows)
    y = (score > np.quantile(score, 1 - pos_rate)).astype(int)
    return cats, num, y


def run(top: Path, name: str, seed: int, rows: int, levels: list[int], pos_rate: float,
        scale: float) -> None:
    cats, num, y = make(seed, rows, levels, pos_rate, scale)
    cut = int(rows * 0.75)
    root = top / name
    root.mkdir()
    for part, sl in (("train", slice(0, cut)), ("val", slice(cut, rows))):
        cols = {k: pa.array([f"v{x}" for x in v[sl]]) for k, v in cats.items()}
        cols.update({f"n{j}": pa.array(num[sl, j]) for j in range(3)})
        cols["label"] = pa.array(y[sl])
        pq.write_table(pa.table(cols), root / f"{part}.parquet")
    cat_list = "[" + ",".join(cats) + "]"
    out = subprocess.run([sys.executable, "-m", "largeml.train", "data=files",
        f"data.train_path={root/'train.parquet'}", f"data.val_path={root/'val.parquet'}",
        f"data.categorical_columns={cat_list}", f"data.cache_dir={root/'cache'}",
        f"hydra.run.dir={root/'run'}"], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"{name}: training failed:\n{out.stderr[-2000:]}")
    m = json.loads((root / "run" / "metrics.json").read_text())
    enc = OneHotEncoder(handle_unknown="ignore")
    c = np.column_stack(list(cats.values()))
    sc = StandardScaler().fit(num[:cut])
    xt = sparse.hstack([enc.fit_transform(c[:cut]), sc.transform(num[:cut])]).tocsr()
    xv = sparse.hstack([enc.transform(c[cut:]), sc.transform(num[cut:])]).tocsr()
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(xt, y[:cut]).score(xv, y[cut:])
    print(f"{name}: rows {rows}, levels {levels}, positives {pos_rate:.0%}, numeric scale {scale}: "
          f"largeml {m['val/accuracy']:.4f} ({m.get('stopped')}), scikit-learn {ref:.4f}, "
          f"diff {100*(m['val/accuracy']-ref):+.2f} pt", flush=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as top:
        run(Path(top), "balanced_small", 1, 3000, [12, 5], 0.5, 1.0)
        run(Path(top), "imbalanced_wide", 2, 20000, [3000, 500, 40], 0.05, 100.0)
        run(Path(top), "many_levels", 3, 40000, [20000, 8], 0.3, 0.01)
