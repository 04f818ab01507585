"""Discovery and the weight engine on real models as they come (issue 11, item 2).

Tiny random-init ``transformers`` models built from configs (no download) and plain torch
models: every parameter is either in a compressible layer or listed in ``skipped`` with a reason,
parameter coverage is >= 95%, and sparsity + bits attach and bake on HF ``Conv1D``, LSTM weights,
``nn.MultiheadAttention.in_proj_weight`` and tied weights (which stay one tensor).

``python tests/compress/test_discovery_models.py`` prints the coverage table.
"""

from __future__ import annotations

import os

import optuna
import pytest
import torch
from torch import nn

from autocompress.compress import apply, quant_records
from autocompress.compress._quant import attach, bake, set_sparsity
from autocompress.errors import PlanError
from autocompress.spaces import CompressionSpace, LayerPlan, Plan
from autocompress.tasks._batch import call_model, pick_output

os.environ.setdefault("HF_HUB_OFFLINE", "1")
optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- models ---------------------------------------------------------------------------------
class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear on the last step."""

    def __init__(self, vocab: int = 500, d: int = 32, hidden: int = 48, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.emb(x))[0][:, -1])


class GRUTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0])


def _dw_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def depthwise_cnn() -> nn.Module:
    """MobileNet-style: a stem conv, three depthwise-separable blocks, pooling, a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _dw_block(32, 64),
        _dw_block(64, 128),
        _dw_block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def torch_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _hf(name: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"vocab_size": 500}
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **small)
        return tf.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = tf.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=3,
            **small,
        )
        return tf.BertForSequenceClassification(cfg)
    if name == "distilbert":
        cfg = tf.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64, **small
        )
        return tf.DistilBertForSequenceClassification(cfg)
    if name == "t5":
        cfg = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, **small)
        return tf.T5ForConditionalGeneration(cfg)
    if name == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **small,
        )
        return tf.LlamaForCausalLM(cfg)
    if name == "vit":
        cfg = tf.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        )
        return tf.ViTForImageClassification(cfg)
    raise ValueError(name)


HF = ["gpt2", "bert", "distilbert", "t5", "llama", "vit"]
TORCH = {"torch-encoder": torch_encoder, "lstm": LSTMClassifier, "depthwise-cnn": depthwise_cnn}
MODELS = HF + list(TORCH)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return TORCH[name]() if name in TORCH else _hf(name)


def example(name: str) -> dict[str, torch.Tensor] | torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (2, 12), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if name == "depthwise-cnn":
        return torch.randn(2, 3, 32, 32, generator=g)
    if name == "torch-encoder":
        return torch.randn(2, 12, 64, generator=g)
    if name == "lstm":
        return ids
    return {"input_ids": ids}


def run(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return pick_output(call_model(model.eval(), example(name)))


def coverage_row(name: str) -> dict[str, object]:
    space = CompressionSpace.from_model(build(name))
    kinds = sorted({layer.kind for layer in space.layers})
    return {
        "model": name,
        "params": space.total_params,
        "covered": space.covered_params,
        "coverage": space.coverage,
        "layers": len(space.layers),
        "skipped": len(space.skipped),
        "kinds": ",".join(kinds),
    }


# --- discovery ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_is_a_layer_or_skipped_with_a_reason(name: str) -> None:
    model = build(name)
    space = CompressionSpace.from_model(model)
    covered = {layer.tensor for layer in space.layers}
    by_id: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(pname)
    for names in by_id.values():
        in_layer = [n for n in names if n in covered]
        in_skip = [n for n in names if n in space.skipped]
        assert len(in_layer) + len(in_skip) == 1, f"{names}: listed {in_layer + in_skip}"
        if in_skip:
            assert space.skipped[in_skip[0]], f"{in_skip[0]} has no reason"
    unique = {id(p): p.numel() for p in model.parameters()}
    assert space.total_params == sum(unique.values())
    row = coverage_row(name)
    print(f"\n{name}: coverage {row['coverage']:.1%} of {row['params']:,} parameters")
    assert space.coverage >= 0.95, f"{name}: coverage {space.coverage:.1%}"


def test_gpt2_conv1d_is_discovered_with_its_output_axis() -> None:
    space = CompressionSpace.from_model(build("gpt2"))
    c_attn = space.layer("transformer.h.0.attn.c_attn")
    assert (c_attn.kind, c_attn.shape, c_attn.axis) == ("Conv1D", (64, 192), 1)
    assert c_attn.factorizable  # factorized into two Linears (compress._lowrank)
    assert "transformer.h.0.ln_1.weight" in space.skipped
    assert "transformer.wpe" in space.layer_names  # learned positions are an nn.Embedding


def test_tied_weights_are_one_layer() -> None:
    space = CompressionSpace.from_model(build("gpt2"))
    assert "lm_head" not in space.layer_names
    wte = space.layer("lm_head")
    assert wte.name == "transformer.wte" and wte.aliases == ("lm_head",)
    assert not wte.factorizable and "tied" in wte.note
    t5 = CompressionSpace.from_model(build("t5"))
    shared = t5.layer("lm_head")
    assert shared.name == "shared"
    assert set(shared.aliases) == {"encoder.embed_tokens", "decoder.embed_tokens", "lm_head"}
    plan = t5.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask())
    assert "shared" in plan.layers and not {"lm_head", "encoder.embed_tokens"} & set(plan.layers)


def test_rnn_and_attention_weights_are_parameter_level_layers() -> None:
    space = CompressionSpace.from_model(LSTMClassifier())
    names = space.layer_names
    for layer in (0, 1):
        for suffix in ("", "_reverse"):
            assert f"lstm.weight_ih_l{layer}{suffix}" in names
            assert f"lstm.weight_hh_l{layer}{suffix}" in names
            assert f"lstm.bias_ih_l{layer}{suffix}" in space.skipped
    assert not space.layer("lstm.weight_ih_l0").factorizable
    enc = CompressionSpace.from_model(torch_encoder())
    in_proj = enc.layer("layers.0.self_attn.in_proj_weight")
    assert in_proj.shape == (192, 64) and not in_proj.factorizable
    gru = CompressionSpace.from_model(GRUTagger())
    assert {"gru.weight_ih_l0", "gru.weight_hh_l0"} <= set(gru.layer_names)


def test_depthwise_and_grouped_convs_get_sparsity_and_bits_but_no_rank() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, groups=2))
    space = CompressionSpace.from_model(model)
    assert "depthwise" in space.layer("0").note and "grouped" in space.layer("1").note
    assert not space.layer("0").factorizable and not space.layer("1").factorizable
    with pytest.raises(PlanError, match="cannot be factorized"):
        space.validate(Plan({"0": LayerPlan(rank_ratio=0.5)}))
    small = apply(model, space.uniform(sparsity=0.5, bits=4))
    assert float((small[0].weight == 0).float().mean()) >= 0.5
    assert set(quant_records(small)) == {"0.weight", "1.weight"}


# --- engine ---------------------------------------------------------------------------------
def test_conv1d_sparsity_bits_bake_scales_follow_the_output_dim() -> None:
    model = build("gpt2")
    before = run(model, "gpt2")
    name = "transformer.h.0.attn.c_attn"
    small = apply(model, Plan({name: LayerPlan(sparsity=0.5, bits=4)}))
    w = small.get_submodule(name).weight
    rec = quant_records(small)[f"{name}.weight"]
    assert rec.axis == 1 and rec.scale is not None and rec.scale.shape == (192,)
    q = w.detach() / rec.scale[None, :]
    assert torch.equal(q, torch.round(q)) and float(q.abs().max()) <= 7
    assert int((w == 0).sum()) >= w.numel() // 2
    assert set(small.state_dict()) == set(model.state_dict())
    after = run(small, "gpt2")
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.equal(after, before)


def test_lstm_weights_attach_bake_and_keep_state_dict_keys() -> None:
    model = LSTMClassifier()
    before = run(model, "lstm")
    space = CompressionSpace.from_model(model)
    plan = space.uniform(sparsity=0.5, bits=8)
    small = apply(model, plan)
    assert set(small.state_dict()) == set(model.state_dict())
    rec = quant_records(small)
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l1_reverse", "emb.weight"} <= set(rec)
    w = small.lstm.weight_hh_l1_reverse
    assert int((w == 0).sum()) == round(0.5 * w.numel())
    q = w.detach() / rec["lstm.weight_hh_l1_reverse"].scale[:, None]
    assert torch.equal(q, torch.round(q))
    after = run(small, "lstm")
    assert torch.isfinite(after).all() and (after - before).abs().max() < 0.1
    assert isinstance(small.lstm.weight_ih_l0, nn.Parameter)


def test_in_proj_attach_bake_on_torch_encoder() -> None:
    model = torch_encoder()
    name = "layers.1.self_attn.in_proj_weight"
    small = apply(model, Plan({name: LayerPlan(sparsity=0.6, bits=4)}))
    w = small.get_parameter(name)
    assert int((w == 0).sum()) == round(0.6 * w.numel())
    assert f"{name}" in quant_records(small)
    assert set(small.state_dict()) == set(model.state_dict())
    assert torch.isfinite(run(small, "torch-encoder")).all()


def test_tied_weights_stay_one_tensor_through_attach_finetune_and_bake() -> None:
    model = build("gpt2")
    plan = Plan({"transformer.wte": LayerPlan(sparsity=0.3, bits=4)})
    attach(model, plan)
    set_sparsity(model, 1.0)
    emb = model.transformer.wte
    assert emb.parametrizations.weight[0] is model.lm_head.parametrizations.weight[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = example("gpt2")["input_ids"]
    for _ in range(2):  # a fine-tune moves the shared original; both aliases see it
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert torch.equal(emb.weight, model.lm_head.weight)
    bake(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    recs = quant_records(model)
    assert recs["lm_head.weight"] is recs["transformer.wte.weight"]
    w = model.lm_head.weight
    assert int((w == 0).sum()) >= round(0.3 * w.numel())
    assert torch.isfinite(run(model, "gpt2")).all()


def test_alias_plan_applies_once_and_conflicting_plans_are_refused() -> None:
    model = build("gpt2")
    space = CompressionSpace.from_model(model)
    same = Plan({"transformer.wte": LayerPlan(bits=8), "lm_head": LayerPlan(bits=8)})
    assert space.validate(same) is same
    bad = Plan({"transformer.wte": LayerPlan(bits=8), "lm_head": LayerPlan(bits=4)})
    for refuse in (space.validate, lambda p: attach(build("gpt2"), p), lambda p: apply(model, p)):
        with pytest.raises(PlanError, match="one tied tensor") as e:
            refuse(bad)
        assert "\n" not in str(e.value)
    only_alias = apply(model, Plan({"lm_head": LayerPlan(bits=8)}))
    assert only_alias.lm_head.weight is only_alias.transformer.wte.weight
    assert set(quant_records(only_alias)) == {"lm_head.weight", "transformer.wte.weight"}
    with pytest.raises(PlanError, match="unknown layer"):
        CompressionSpace.from_model(model, exclude=["lm_head.weight"])
    excluded = CompressionSpace.from_model(model, exclude=["lm_head"])
    assert "transformer.wte" not in excluded.free_groups()


@pytest.mark.parametrize("name", ["bert", "t5", "vit", "llama"])
def test_uniform_sparsity_and_bits_run_on_hf_models(name: str) -> None:
    model = build(name)
    space = CompressionSpace.from_model(model)
    small = apply(model, space.uniform(sparsity=0.3, bits=8))
    out = run(small, name)
    assert torch.isfinite(out).all() and out.shape == run(model, name).shape
    assert set(small.state_dict()) == set(model.state_dict())


def test_attach_refuses_tensors_that_are_not_compressible_weights() -> None:
    with pytest.raises(PlanError, match="not a compressible weight"):
        attach(LSTMClassifier(), Plan({"lstm.bias_ih_l0": LayerPlan(bits=8)}))
    with pytest.raises(PlanError, match="does not have"):
        attach(LSTMClassifier(), Plan({"lstm.weight_ih_l9": LayerPlan(bits=8)}))


if __name__ == "__main__":  # the coverage table
    print(
        f"{'model':<14} {'params':>9} {'covered':>9} {'coverage':>9} {'layers':>7} {'skipped':>8}"
    )
    for n in MODELS:
        r = coverage_row(n)
        print(
            f"{n:<14} {r['params']:>9,} {r['covered']:>9,} {r['coverage']:>9.1%} "
            f"{r['layers']:>7} {r['skipped']:>8}  {r['kinds']}"
        )
