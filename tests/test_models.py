"""Unit tests of largeml.models: shapes, layer structure, zero start and the L2 penalty."""

import pytest
import torch
from torch import nn

from largeml.models import MLP, Linear, l2_penalty

pytestmark = pytest.mark.unit


def test_linear_starts_at_zero() -> None:
    model = Linear(5)
    assert torch.count_nonzero(model.linear.weight) == 0
    assert torch.count_nonzero(model.linear.bias) == 0
    assert torch.equal(model(torch.randn(4, 5)), torch.zeros(4))


def test_linear_forward_is_x_dot_w_plus_b() -> None:
    model = Linear(3)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        model.linear.bias.fill_(3.0)
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -4.0]])
    scores = model(x)
    assert scores.shape == (2,)
    # 1 - 2 + 0.5 + 3 = 2.5;  2 + 0 - 2 + 3 = 3
    torch.testing.assert_close(scores, torch.tensor([2.5, 3.0]))


@pytest.mark.parametrize("hidden_sizes", [(), (8,), (16, 8, 4)])
def test_mlp_shape_and_layer_count(hidden_sizes: tuple[int, ...]) -> None:
    model = MLP(6, hidden_sizes=hidden_sizes)
    assert model(torch.randn(7, 6)).shape == (7,)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(hidden_sizes) + 1
    assert linears[-1].out_features == 1


@pytest.mark.parametrize("dropout, expected", [(0.0, 0), (0.3, 2)])
def test_mlp_dropout_only_when_positive(dropout: float, expected: int) -> None:
    model = MLP(4, hidden_sizes=(8, 8), dropout=dropout)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == expected
    assert all(d.p == dropout for d in dropouts)


def test_mlp_unknown_activation_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.activation='swish'"):
        MLP(4, activation="swish")


def test_l2_penalty_linear_excludes_bias() -> None:
    model = Linear(3)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        model.linear.bias.fill_(10.0)
    # 0.5 * (1 + 4 + 9) = 7; the bias of 10 must not count.
    assert l2_penalty(model).item() == pytest.approx(7.0)


def test_l2_penalty_mlp_sums_all_weight_matrices() -> None:
    model = MLP(2, hidden_sizes=(3,))
    first, last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        first.weight.fill_(1.0)  # 6 entries of 1  -> 6
        last.weight.fill_(2.0)  # 3 entries of 4  -> 12
        first.bias.fill_(5.0)
        last.bias.fill_(5.0)
    assert l2_penalty(model).item() == pytest.approx(0.5 * (6 + 12))


def test_an_identity_input_map_is_saved_as_two_numbers(tmp_path) -> None:
    """An unfitted (identity) input map costs a checkpoint a few bytes, not 8 a feature, and
    loads back as the identity; a fitted one is saved in full."""
    from largeml.checkpoint import load_checkpoint, save_checkpoint
    from largeml.inference import model_width
    from largeml.trainer import _snapshot

    n = 200_000
    state = _snapshot(Linear(n).state_dict())  # as a checkpoint takes it
    for name, value in (("input.shift", 0.0), ("input.mult", 1.0)):
        assert state[name].shape == (n,) and state[name].stride() == (0,)
        assert bool((state[name] == value).all())
    assert model_width(state) == n
    save_checkpoint({"model": state}, tmp_path / "identity.pt")
    assert (tmp_path / "identity.pt").stat().st_size < 1.1 * 4 * n  # the weights alone
    back = Linear(n)
    back.input.set(torch.ones(n), torch.full((n,), 2.0))
    back.load_state_dict(load_checkpoint(tmp_path / "identity.pt")["model"])
    assert not back.input.active
    assert torch.equal(back.input.shift, torch.zeros(n))
    assert torch.equal(back.input.mult, torch.ones(n))

    fitted = Linear(n)
    fitted.input.set(torch.zeros(n), torch.linspace(0.5, 2.0, n))
    save_checkpoint({"model": _snapshot(fitted.state_dict())}, tmp_path / "fitted.pt")
    assert (tmp_path / "fitted.pt").stat().st_size > 3 * 4 * n
    back.load_state_dict(load_checkpoint(tmp_path / "fitted.pt")["model"])
    assert back.input.active and torch.equal(back.input.mult, fitted.input.mult)
