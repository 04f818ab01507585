"""Low-rank SVD factorization of Linear, Conv1d, Conv2d and Embedding layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.compress._lowrank import (
    LowRank,
    _dims,
    _split,
    break_even_rank,
    factorizable_layers,
    factorize,
    rank_for,
)
from autocompress.errors import PlanError


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wrap(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer)


CASES = [
    (nn.Linear(48, 40), lambda: torch.randn(5, 48)),
    (nn.Linear(48, 40, bias=False), lambda: torch.randn(5, 48)),
    (nn.Conv1d(6, 20, 5, stride=2, padding=2, dilation=1), lambda: torch.randn(3, 6, 30)),
    (nn.Conv2d(4, 24, 3, padding=1, dilation=2), lambda: torch.randn(2, 4, 9, 9)),
    (nn.Embedding(50, 24, padding_idx=0), lambda: torch.randint(0, 50, (4, 7))),
]


@pytest.mark.parametrize(("layer", "make_x"), CASES)
def test_full_rank_matches(layer: nn.Module, make_x) -> None:
    # factorize() never goes above the break-even rank, so call its splitter at full rank
    x = make_x()
    seq = _split(layer, min(_dims(layer)))
    torch.testing.assert_close(seq(x), layer(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("layer", "make_x"), CASES)
def test_error_falls_with_rank_and_params_drop(layer: nn.Module, make_x) -> None:
    model = wrap(layer)
    x = make_x()
    ref = model(x)
    errors = []
    for ratio in (0.1, 0.5, 0.99):
        small = factorize(model, {"0": ratio})
        first, second = small[0]
        r = rank_for(layer, ratio)
        assert r <= break_even_rank(layer)
        assert n_params(small) < n_params(model)
        errors.append((small(x) - ref).norm().item())
        if isinstance(layer, nn.Embedding):
            assert (first.embedding_dim, second.in_features, second.out_features) == (r, r, 24)
            assert first.padding_idx == 0 and torch.all(first.weight[0] == 0)
        elif isinstance(layer, nn.Linear):
            assert (first.out_features, second.in_features) == (r, r)
            assert first.bias is None and (second.bias is None) == (layer.bias is None)
        else:
            assert (first.out_channels, second.in_channels, second.kernel_size) == (
                r,
                r,
                (1,) * len(layer.kernel_size),
            )
            assert (first.stride, first.padding, first.dilation) == (
                layer.stride,
                layer.padding,
                layer.dilation,
            )
        assert small(x).shape == ref.shape
    assert errors[0] > errors[1] > errors[2]


def test_parameter_names_and_input_untouched() -> None:
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
    before = copy.deepcopy(model.state_dict())
    small = factorize(model, {"0": 0.5})
    assert sorted(small.state_dict()) == [
        "0.0.weight",
        "0.1.bias",
        "0.1.weight",
        "2.bias",
        "2.weight",
    ]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model[0], nn.Linear)


def test_nested_names_and_deterministic_shapes() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Sequential(nn.Linear(20, 30), nn.ReLU()), nn.Linear(30, 5))

    torch.manual_seed(1)
    a = factorize(build(), {"0.0": 0.4})
    torch.manual_seed(2)
    b = factorize(build(), {"0.0": 0.4})
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    assert shapes_a == {k: v.shape for k, v in b.state_dict().items()}
    assert "0.0.0.weight" in shapes_a


def test_ratio_one_and_tiny_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(1, 32), nn.Linear(32, 10))
    same = factorize(model, {"0": 0.5, "1": 1.0})
    assert isinstance(same[0], nn.Linear) and isinstance(same[1], nn.Linear)
    assert break_even_rank(model[0]) == 0
    assert factorizable_layers(model) == ["1"]


def test_break_even_rank() -> None:
    assert break_even_rank(nn.Linear(64, 64)) == 31  # 32 * 128 == 64 * 64 saves nothing
    assert break_even_rank(nn.Linear(300, 100)) == 74
    assert break_even_rank(nn.Conv2d(4, 24, 3)) == 14  # 36 * 24 / 60 = 14.4
    assert break_even_rank(nn.Embedding(50, 24)) == 16  # 1200 / 74 = 16.2
    assert rank_for(nn.Linear(300, 100), 0.001) == 1


def test_unknown_name() -> None:
    with pytest.raises(PlanError, match="'fc9'"):
        factorize(nn.Sequential(nn.Linear(4, 4)), {"fc9": 0.5})


def test_not_factorizable() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(PlanError, match="'1'.*ReLU"):
        factorize(model, {"1": 0.5})
    with pytest.raises(PlanError, match="groups=2"):
        factorize(model, {"2": 0.5})
    with pytest.raises(PlanError, match="rank_ratio"):
        factorize(model, {"0": 0.0})


def test_attention_internals_are_refused() -> None:
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True))
    assert factorizable_layers(model) == []
    with pytest.raises(PlanError, match="reads the weight"):
        factorize(model, {"0.linear1": 0.5})


@pytest.mark.parametrize(("layer", "make_x"), CASES)
def test_factorized_layer_still_answers_as_the_layer(layer: nn.Module, make_x) -> None:
    full = _split(layer, min(_dims(layer)))
    assert isinstance(full, LowRank) and isinstance(full, nn.Sequential)
    torch.testing.assert_close(full.weight, layer.weight, atol=1e-5, rtol=1e-4)
    assert full.weight.dtype == layer.weight.dtype
    if isinstance(layer, nn.Embedding):
        assert full.bias is None and (full.num_embeddings, full.embedding_dim) == (50, 24)
        assert full.padding_idx == 0
    else:
        assert full.bias is full[1].bias
    small = factorize(wrap(layer), {"0": 0.3})[0]
    first, second = small
    assert small.weight.shape == layer.weight.shape
    if isinstance(layer, nn.Linear):
        assert (small.in_features, small.out_features) == (48, 40)
        torch.testing.assert_close(small.weight, second.weight @ first.weight)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        assert (small.out_channels, small.kernel_size, small.padding) == (
            layer.out_channels,
            layer.kernel_size,
            layer.padding,
        )


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: a Linear with a transposed (in, out) weight."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_hf_conv1d_is_factorized_into_linears() -> None:
    model = nn.Sequential(Conv1D(40, 48))
    assert break_even_rank(model[0]) == 21 and factorizable_layers(model) == ["0"]
    x = torch.randn(3, 48)
    full = _split(model[0], 40)
    torch.testing.assert_close(full(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full.weight, model[0].weight, atol=1e-5, rtol=1e-4)
    small = factorize(model, {"0": 0.5})[0]
    assert [type(m) for m in small] == [nn.Linear, nn.Linear] and (small.nf, small.nx) == (40, 48)
    assert tuple(small.weight.shape) == (48, 40)


def test_weight_follows_quantization_parametrizations() -> None:
    from autocompress.compress._quant import attach, bake, set_sparsity
    from autocompress.compress._targets import layer_modules
    from autocompress.spaces._plan import LayerPlan, Plan

    model = factorize(nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10)), {"0": 0.5})
    assert [n for n, _ in layer_modules(model, "0")] == ["0.0", "0.1"]
    attach(model, Plan(layers={"0": LayerPlan(sparsity=0.5, bits=4)}))
    set_sparsity(model, 1.0)
    torch.testing.assert_close(model[0].weight, model[0][1].weight @ model[0][0].weight)
    bake(model)
    assert isinstance(model[0], LowRank)
    assert sorted(model.state_dict()) == [
        "0.0.weight",
        "0.1.bias",
        "0.1.weight",
        "2.bias",
        "2.weight",
    ]
