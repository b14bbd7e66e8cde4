"""`largeml.logger.histogram`: the weight histograms' bins, by torch reductions, against numpy's,
and read back from a real event file."""

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from largeml import kernels
from largeml.logger import HISTOGRAM_BINS, RunLogger, histogram

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("compiled", [True, False])
def test_histogram_is_numpys_equal_bins(compiled, monkeypatch):
    if not compiled:  # the torch reductions, as without numba
        monkeypatch.setattr(kernels, "available", lambda x: False)
    elif kernels.numba is None:
        pytest.skip("numba is not installed")
    values = torch.randn(100_003, generator=torch.Generator().manual_seed(0)) * 3 + 1
    lo, hi, count, total, squares, edges, counts = histogram(values)
    reference, reference_edges = np.histogram(values.numpy(), HISTOGRAM_BINS)
    assert (lo, hi, count) == (values.min().item(), values.max().item(), 100_003)
    assert total == pytest.approx(values.double().sum().item(), rel=1e-12)
    assert squares == pytest.approx(values.double().square().sum().item(), rel=1e-12)
    np.testing.assert_allclose(edges, reference_edges[1:], rtol=0, atol=1e-6 * (hi - lo))  # f32
    assert sum(counts) == count
    # float32 arithmetic may put a value lying on an edge in the bin beside numpy's
    assert np.abs(np.array(counts) - reference).sum() <= 4


def test_histogram_of_one_value_and_of_non_finite_values():
    assert histogram(torch.tensor([3.0])) == (3.0, 3.0, 1, 3.0, 9.0, [3.0], [1.0])
    lo, hi, count, total, _, _, counts = histogram(
        torch.tensor([math.nan, 1.0, math.inf, 2.0, -math.inf]))
    assert (lo, hi, count, total, sum(counts)) == (1.0, 2.0, 2, 3.0, 2)
    assert histogram(torch.tensor([math.nan, math.nan])) is None


def test_histograms_are_read_back_from_the_event_file(tmp_path):
    model = torch.nn.Linear(50, 1)
    with torch.no_grad():
        model.bias.fill_(math.nan)  # no finite value: no histogram
    logger = RunLogger(tmp_path)
    logger.histograms(model, step=7)
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert events.Tags()["histograms"] == ["weights/weight"]
    (event,) = events.Histograms("weights/weight")
    weights = model.weight.detach()
    assert event.step == 7 and event.histogram_value.num == 50
    assert event.histogram_value.min == pytest.approx(weights.min().item())
    assert event.histogram_value.max == pytest.approx(weights.max().item())
    assert sum(event.histogram_value.bucket) == 50
    assert len(event.histogram_value.bucket_limit) == HISTOGRAM_BINS
