from __future__ import annotations

import optuna
import pytest
from torch import nn

from autocompress import PlanError
from autocompress.spaces import CompressionSpace, Knobs, LayerPlan, Plan
from autocompress.tasks._models import DigitsMLP, Mnist1dTransformer

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_discovers_layers_of_transformer() -> None:
    space = CompressionSpace.from_model(Mnist1dTransformer())
    names = space.layer_names
    assert "proj" in names and "pos" in names and "blocks.1.ff2" in names
    assert "blocks.0.attn.out_proj" in names
    out_proj = space.layer("blocks.0.attn.out_proj")
    assert not out_proj.factorizable
    in_proj = space.layer("blocks.0.attn.in_proj_weight")
    assert in_proj.shape == (96, 32) and not in_proj.factorizable
    assert "blocks.0.attn.in_proj_bias" in space.skipped
    assert "blocks.0.ln1.weight" in space.skipped
    covered = sum(layer.params for layer in space.layers) + sum(
        space_param.numel()
        for name, space_param in Mnist1dTransformer().named_parameters()
        if name in space.skipped
    )
    assert covered == space.total_params  # every tensor is a layer or skipped, none twice


def test_suggest_respects_groups_pins_excludes_and_ranges() -> None:
    knobs = Knobs(sparsity=(0.1, 0.9), bits=(2, 4, 8), rank_ratio=(0.2, 0.8), width=(0.5, 1.0))
    space = CompressionSpace.from_model(
        DigitsMLP(), knobs, exclude=["fc3"], pin={}, groups=[["fc1", "fc2"]]
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        plan = space.suggest(study.ask())
        assert "fc3" not in plan.layers
        assert plan.layers["fc1"] == plan.layers["fc2"]
        lp = plan.layers["fc1"]
        assert 0.1 <= lp.sparsity <= 0.9 and lp.bits in (2, 4, 8)
        assert 0.2 <= lp.rank_ratio <= 0.8 and 0.5 <= plan.width <= 1.0


def test_pinned_layer_is_fixed() -> None:
    space = CompressionSpace.from_model(DigitsMLP(), pin={"fc3": {"bits": 8}})
    plan = space.suggest(optuna.create_study().ask())
    assert plan.layers["fc3"] == LayerPlan(bits=8)
    assert space.uniform(bits=4).layers["fc3"].bits == 8


@pytest.mark.parametrize(
    "kwargs",
    [{"exclude": ["fc9"]}, {"pin": {"fcx": {"bits": 4}}}, {"groups": [["fc1", "nope"]]}],
)
def test_unknown_layer_names_are_refused(kwargs: dict) -> None:
    with pytest.raises(PlanError, match="unknown layer") as e:
        CompressionSpace.from_model(DigitsMLP(), **kwargs)
    assert "\n" not in str(e.value)


def test_bad_knobs_and_unfactorizable_plan() -> None:
    with pytest.raises(PlanError, match="bits"):
        Knobs(bits=(3, 12))
    with pytest.raises(PlanError, match="sparsity"):
        Knobs(sparsity=(0.0, 1.0))
    space = CompressionSpace.from_model(Mnist1dTransformer())
    with pytest.raises(PlanError, match="cannot be factorized"):
        space.validate(Plan({"blocks.0.attn.out_proj": LayerPlan(rank_ratio=0.5)}))


def test_no_compressible_layers() -> None:
    with pytest.raises(PlanError, match="no compressible layers"):
        CompressionSpace.from_model(nn.Sequential(nn.ReLU()))


class _TiedLM(nn.Module):
    """Embedding and output projection sharing one Parameter (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):  # pragma: no cover - discovery only
        return self.out(self.norm(self.emb(x)))


def test_tied_parameter_is_one_layer_and_aliases_resolve() -> None:
    space = CompressionSpace.from_model(_TiedLM(), pin={"out": {"bits": 8}})
    assert space.layer_names == ["emb"]
    assert space.layer("out").aliases == ("out",)
    assert space.pin == {"emb": LayerPlan(bits=8)}  # stored under the layer's own name
    assert space.describe()[0]["note"].startswith("tied: also out")
    assert space.total_params == 50 * 8 + 16 and space.covered_params == 400
    assert abs(space.coverage - 400 / 416) < 1e-12
    assert set(space.skipped) == {"norm.weight", "norm.bias"}
    grouped = CompressionSpace.from_model(_TiedLM(), groups=[["emb", "out"]])
    assert grouped.groups == (("emb",),)


def test_conflicting_knobs_on_tied_aliases_are_refused() -> None:
    space = CompressionSpace.from_model(_TiedLM())
    ok = Plan({"emb": LayerPlan(bits=4), "out": LayerPlan(bits=4)})
    assert space.validate(ok) is ok
    with pytest.raises(PlanError, match="one tied tensor") as e:
        space.validate(Plan({"emb": LayerPlan(bits=4), "out": LayerPlan(bits=8)}))
    assert "\n" not in str(e.value)


def test_hf_conv1d_is_matched_by_name_without_importing_transformers() -> None:
    import torch

    class Conv1D(nn.Module):  # same name and module path as transformers.pytorch_utils.Conv1D
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    Conv1D.__module__ = "transformers.pytorch_utils"
    space = CompressionSpace.from_model(nn.Sequential(Conv1D(12, 4)))
    layer = space.layer("0")
    assert (layer.kind, layer.axis, layer.factorizable) == ("Conv1D", 1, False)
    assert "0.bias" in space.skipped


def test_rnn_weights_are_parameter_level_layers() -> None:
    space = CompressionSpace.from_model(nn.GRU(4, 6, num_layers=2, bidirectional=True))
    assert "weight_ih_l1_reverse" in space.layer_names  # root module: the parameter name
    assert all(not layer.factorizable for layer in space.layers)
    assert space.coverage > 0.8 and "bias_hh_l0" in space.skipped
