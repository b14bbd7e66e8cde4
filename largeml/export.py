"""`python -m largeml.export checkpoint=PATH output=FILE.npy|FILE.txt`: a linear model
(`model=logreg` or `model=svm`) as plain numbers, for use without PyTorch.

The keys are in `configs/export.yaml`. The file holds n_features + 1 values, the weights
w_1 ... w_n then the bias b, so that score = x · w + b on the raw features: a model trained
with feature scaling (`data.scale`, x' = (x − shift)·mult) has it folded in (w = w'·mult,
b = b' − Σ w·shift). A float32 `.npy`, or text with one value a line (9 significant digits,
exact for float32) after `#` comment lines. A model of K > 2 classes has K such rows, one per
class in the order of its labels (named in the text file's header): a (K, n_features + 1)
`.npy`, or K lines of text. A missing file, a model that is not linear or another extension
stops with exit code 2.
"""

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from largeml.cli import CONFIG_DIR, exit_2_on_error, required
from largeml.errors import ConfigError
from largeml.inference import load_model
from largeml.labels import Classes
from largeml.models import Linear

log = logging.getLogger(__name__)


def linear_weights(checkpoint: str) -> tuple[np.ndarray, Classes]:
    """[w_1, ..., w_n, b] of a checkpoint's linear model, as float32 (one row per class for
    more than two), and its classes."""
    model, config, classes = load_model(checkpoint)
    if not isinstance(model, Linear):
        raise ConfigError(f"checkpoint {checkpoint} holds a {config['model']['_target_']}; "
                          "export writes linear models only (model=logreg or model=svm)")
    weight = model.linear.weight.detach().double() * model.input.mult.double()
    bias = model.linear.bias.detach().double() - weight @ model.input.shift.double()
    values = np.concatenate([weight.numpy(), bias.numpy()[:, None]], axis=1).astype(np.float32)
    return (values[0] if classes.binary else values), classes


def strongest(values: np.ndarray, classes: Classes, top_k: int) -> str:
    """The listing of `top_k=N`: how many weights are non-zero, then the N of largest |w|
    (summed over the classes' rows for K > 2), feature ids 1-based as in LIBSVM files."""
    weights = np.atleast_2d(values)[:, :-1]
    magnitude = np.abs(weights).sum(0)
    nonzero = int(np.count_nonzero(magnitude))
    lines = [f"{nonzero:,} of {len(magnitude):,} features have a non-zero weight"]
    for j in np.argsort(-magnitude, kind="stable")[:top_k]:
        if magnitude[j] == 0:
            break
        shown = (f"{weights[0, j]:+.6g}" if classes.binary else
                 " ".join(f"{name}:{w:+.4g}" for name, w in zip(classes.names, weights[:, j],
                                                               strict=True)))
        lines.append(f"  feature {j + 1}: {shown}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> tuple[int, Path]:
    """Exports as `cfg` says; returns the number of features and the file written."""
    usage = "python -m largeml.export checkpoint=PATH output=FILE.npy|FILE.txt"
    checkpoint = str(required(cfg, "checkpoint", usage))
    output = Path(str(required(cfg, "output", usage)))
    if output.suffix not in (".npy", ".txt"):
        raise ConfigError(f"output={output} must end in .npy or .txt")
    top_k = cfg.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer or null, got {top_k!r}")
    values, classes = linear_weights(checkpoint)
    if top_k is not None:
        print(strongest(values, classes, top_k))
    output.parent.mkdir(parents=True, exist_ok=True)
    width = values.shape[-1] - 1
    if output.suffix == ".npy":
        np.save(output, values)
    else:
        header = (f"largeml linear model from {Path(checkpoint).resolve()}\n"
                  f"score = x . w + b; {width} weights w_1..w_n, then the bias b")
        if not classes.binary:
            header += (f"\none line per class, scores of classes {' '.join(classes.names)}; "
                       "the predicted class has the highest score")
        np.savetxt(output, values, fmt="%.9g", header=header)
    return width, output


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_2_on_error(log):
        n_features, output = run(cfg)
    print(f"exported {n_features:,} weights and the bias -> {output}")


if __name__ == "__main__":
    main()
