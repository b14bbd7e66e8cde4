"""largeml: large-scale classical machine learning on PyTorch."""

__version__ = "0.1.0"


def fit(overrides=(), run_dir=None) -> dict[str, float]:
    """Trains as `python -m largeml.train *overrides` would; returns the final metrics. See
    `largeml.api` (imported here only when called: `import largeml` stays light)."""
    from largeml.api import fit as _fit

    return _fit(overrides, run_dir)
