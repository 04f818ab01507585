"""Structured width shrink (torch-pruning) on MLP, CNN, Conv1d and transformer models."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.compress._width import output_layers, shrink_width
from autocompress.errors import PlanError


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.b2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.b1(self.c1(x))))
        x = self.pool(torch.relu(self.b2(self.c2(x))))
        return self.fc(x.flatten(1))


def cnn1d() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class Block(nn.Module):
    """Pre-LN encoder block."""

    def __init__(self, d: int = 32, h: int = 4, ff: int = 64) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.ff2(torch.relu(self.ff1(self.ln2(x))))


class Transformer(nn.Module):
    """(B, 40) -> per-position projection + learned positions -> 2 blocks -> mean -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 32)
        self.pos = nn.Parameter(torch.randn(1, 40, 32) * 0.02)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.unsqueeze(-1)) + self.pos
        return self.head(self.blocks(x).mean(1))


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(x)))).mean(1)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_mlp_half_width_shapes_and_params() -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 64)
    small = shrink_width(model, 0.5, x)
    assert [small[i].out_features for i in (0, 2, 4)] == [150, 50, 10]
    assert small[0].in_features == 64
    assert small[2].weight.numel() * 4 == model[2].weight.numel()
    assert small(x).shape == (8, 10)
    assert shapes(model) == {k: tuple(v.shape) for k, v in before.items()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_kept_channels_inherit_weights() -> None:
    model = mlp()
    with torch.no_grad():  # the second half of each hidden layer is dead
        model[0].weight[150:] = 0
        model[0].bias[150:] = 0
        model[2].weight[:, 150:] = 0
        model[2].weight[50:] = 0
        model[2].bias[50:] = 0
        model[4].weight[:, 50:] = 0
    x = torch.randn(8, 64)
    small = shrink_width(model, 0.5, x)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(small[0].weight, model[0].weight[:150])


def test_shapes_do_not_depend_on_weights() -> None:
    x = torch.randn(4, 64)
    torch.manual_seed(1)
    a = shrink_width(mlp(), 0.37, x)
    torch.manual_seed(2)
    b = shrink_width(mlp(), 0.37, torch.randn(2, 64))
    assert shapes(a) == shapes(b)


def test_width_one_is_an_unchanged_copy() -> None:
    model = mlp()
    same = shrink_width(model, 1.0, torch.randn(2, 64))
    assert same is not model
    assert shapes(same) == shapes(model)


def test_cnn_with_batchnorm() -> None:
    model = CNN().train()
    x = torch.randn(4, 1, 8, 8)
    small = shrink_width(model, 0.5, x)
    assert (small.c1.out_channels, small.b1.num_features, small.c2.in_channels) == (8, 8, 8)
    assert (small.c2.out_channels, small.b2.running_mean.shape[0]) == (16, 16)
    assert (small.fc.in_features, small.fc.out_features) == (64, 10)
    assert small.training and small(x).shape == (4, 10)
    copy.deepcopy(small).eval()(x)
    torch.manual_seed(5)
    assert shapes(shrink_width(CNN(), 0.5, x)) == shapes(small)


def test_conv1d_cnn() -> None:
    x = torch.randn(4, 40)
    small = shrink_width(cnn1d(), 0.25, x)
    assert (small[1].out_channels, small[2].num_features, small[5].out_channels) == (4, 4, 8)
    assert small(x).shape == (4, 10)


def test_transformer_shrinks_feed_forward_only() -> None:
    model = Transformer()
    x = torch.randn(4, 40)
    assert output_layers(model, x) == ["head"]
    small = shrink_width(model, 0.5, x)
    for block in small.blocks:
        assert (block.ff1.out_features, block.ff2.in_features, block.ff2.out_features) == (
            32,
            32,
            32,
        )
        assert block.attn.embed_dim == 32
    assert small(x).shape == (4, 10)
    with torch.no_grad():
        assert small.eval()(x).shape == (4, 10)
    torch.manual_seed(9)
    assert shapes(shrink_width(Transformer(), 0.5, x)) == shapes(small)


def test_embedding_dim_shrinks() -> None:
    x = torch.randint(0, 100, (4, 12))
    small = shrink_width(TokenModel(), 0.5, x)
    assert (small.emb.embedding_dim, small.fc.out_features, small.out.out_features) == (16, 32, 10)
    assert small(x).shape == (4, 10)


def test_ignored_layers_keep_their_size() -> None:
    small = shrink_width(mlp(), 0.5, torch.randn(2, 64), ignored=["2"])
    assert [small[i].out_features for i in (0, 2, 4)] == [150, 100, 10]


def test_several_output_heads_keep_their_size() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 20)
            self.h1 = nn.Linear(20, 3)
            self.h2 = nn.Linear(20, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.fc(x))
            return self.h1(h), self.h2(h)

    small = shrink_width(TwoHeads(), 0.5, torch.randn(2, 8))
    assert (small.fc.out_features, small.h1.out_features, small.h2.out_features) == (10, 3, 4)


def test_result_is_clean() -> None:
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    small = shrink_width(model, 0.5, torch.randn(2, 64))
    assert not any(p.requires_grad for p in small.parameters())
    assert sorted(small.state_dict()) == sorted(model.state_dict())
    assert all(not m._forward_hooks for m in small.modules())


def test_unknown_ignored_name() -> None:
    with pytest.raises(PlanError, match="'fc9'"):
        shrink_width(mlp(), 0.5, torch.randn(2, 64), ignored=["fc9"])


@pytest.mark.parametrize("width", [0.0, -0.5, 1.5])
def test_bad_width(width: float) -> None:
    with pytest.raises(PlanError, match="width"):
        shrink_width(mlp(), width, torch.randn(2, 64))


def test_works_under_no_grad() -> None:
    with torch.no_grad():
        small = shrink_width(mlp(), 0.5, torch.randn(2, 64))
    assert small[0].out_features == 150


@settings(max_examples=15, deadline=None)
@given(st.floats(min_value=0.005, max_value=1.0))
def test_hidden_sizes_follow_width(width: float) -> None:
    small = shrink_width(mlp(), width, torch.randn(2, 64))
    expected = [max(1, int(width * c + 1e-9)) for c in (300, 100)] + [10]
    assert [small[i].out_features for i in (0, 2, 4)] == expected
    assert small(torch.randn(3, 64)).shape == (3, 10)


def test_plan_heads_knob_json_is_backward_compatible() -> None:
    from autocompress.spaces._plan import Plan

    old = Plan.from_json('{"_type":"Plan","_version":1,"width":0.5}')  # saved before `heads`
    assert old.heads is None and old.head_fraction == 0.5
    plan = Plan(width=0.5, heads=1.0)
    assert plan.head_fraction == 1.0 and not plan.is_identity
    assert '"heads":1.0' in plan.to_json(compact=True)
    for p in (plan, Plan(heads=0.25), old):
        assert Plan.from_json(p.to_json()) == p == Plan.from_json(p.to_json(compact=True))
    assert Plan(heads=1.0).is_identity
    with pytest.raises(PlanError, match="heads=0"):
        Plan(heads=0.0)


def test_a_graph_build_that_never_ends_is_stopped_with_plan_error(monkeypatch) -> None:
    import autocompress.compress._width as width_mod

    class Forever:
        def __init__(self, *args, **kwargs) -> None:
            while True:  # a pure-Python loop, like torch-pruning's graph search
                pass

    monkeypatch.setattr(width_mod.tp.pruner, "BasePruner", Forever)
    with pytest.raises(PlanError, match="dependency graph took more than 0.2 s"):
        shrink_width(mlp(), 0.5, torch.randn(2, 64), timeout=0.2)
    assert shrink_width(mlp(), 1.0, torch.randn(2, 64), timeout=0.2)[0].out_features == 300


def test_dict_and_tuple_example_inputs() -> None:
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 20)
            self.out = nn.Linear(20, 3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.out(torch.relu(self.fc(x))) * scale}

    x, s = torch.randn(2, 8), torch.ones(2, 1)
    for example in ({"x": x, "scale": s}, (x, s)):
        small = shrink_width(Keywords(), 0.5, example)
        assert (small.fc.out_features, small.out.out_features) == (10, 3)


def test_a_block_declaring_heads_around_multihead_attention_still_shrinks() -> None:
    class HeadsBlock(Block):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 4  # bookkeeping next to nn.MultiheadAttention, not a layout

    model = nn.Sequential(nn.Linear(8, 32), HeadsBlock(), nn.Linear(32, 3))
    small = shrink_width(model, 0.5, torch.randn(2, 5, 8))
    assert (small[1].ff1.out_features, small[1].attn.embed_dim) == (32, 32)


def test_q_k_v_layers_without_an_output_projection_are_refused() -> None:
    class NoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
            return a @ self.v(x)

    model = nn.Sequential(nn.Linear(8, 16), NoOut(), nn.Linear(16, 3))
    with pytest.raises(PlanError, match=r"attention '1' \(NoOut\)"):
        shrink_width(model, 0.5, torch.randn(2, 5, 8))


def test_layers_feeding_an_rnn_keep_their_size() -> None:
    """torch-pruning does not shrink an LSTM's input_size, so its feeders keep their width."""
    from autocompress._zoo import ZOO, zoo_inputs

    model = ZOO["lstm"].build()
    x = zoo_inputs("lstm", 4)
    assert output_layers(model, x, rnn_inputs=True) == ["embed", "head"]
    small = shrink_width(model, 0.5, x)
    assert small.embed.embedding_dim == model.lstm.input_size
    assert small(x).shape == model(x).shape
