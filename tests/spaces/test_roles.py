"""Layer roles and depth buckets: found on HF BERT / GPT-2 / T5 / Llama, a type + depth fallback
elsewhere, and a space grouped by them that samples one set of knobs per group."""

from __future__ import annotations

import optuna
import pytest

from autocompress import PlanError
from autocompress.spaces import CompressionSpace, Knobs, group_by_role, layer_roles, role_groups
from autocompress.tasks._models import DigitsMLP

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _zoo_space(name: str) -> CompressionSpace:
    pytest.importorskip("transformers")
    from autocompress._zoo import ZOO

    return CompressionSpace.from_model(ZOO[name].build())


def test_bert_roles_and_depth() -> None:
    space = _zoo_space("bert")
    roles = layer_roles(space.layers, buckets=2)
    assert roles["bert.embeddings.word_embeddings"] == ("embed", "")
    assert roles["bert.embeddings.position_embeddings"] == ("embed_pos", "")
    assert roles["bert.encoder.layer.0.attention.self.query"] == ("attn_qkv", "early")
    assert roles["bert.encoder.layer.1.attention.self.value"] == ("attn_qkv", "late")
    assert roles["bert.encoder.layer.0.attention.output.dense"] == ("attn_out", "early")
    assert roles["bert.encoder.layer.1.intermediate.dense"] == ("ffn_in", "late")
    assert roles["bert.encoder.layer.1.output.dense"] == ("ffn_out", "late")
    assert roles["bert.pooler.dense"][0] == roles["classifier"][0] == "head"


@pytest.mark.parametrize(
    ("model", "expect"),
    [
        (
            "gpt2",
            {
                "transformer.wte": "embed",  # tied with lm_head: one layer
                "transformer.wpe": "embed_pos",
                "transformer.h.0.attn.c_attn": "attn_qkv",
                "transformer.h.0.attn.c_proj": "attn_out",
                "transformer.h.1.mlp.c_fc": "ffn_in",
                "transformer.h.1.mlp.c_proj": "ffn_out",
            },
        ),
        (
            "t5",
            {
                "shared": "embed",
                "encoder.block.0.layer.0.SelfAttention.q": "attn_qkv",
                "decoder.block.1.layer.1.EncDecAttention.o": "attn_out",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias": "embed_pos",
                "decoder.block.0.layer.2.DenseReluDense.wi": "ffn_in",
                "decoder.block.0.layer.2.DenseReluDense.wo": "ffn_out",
            },
        ),
        (
            "llama",
            {
                "model.embed_tokens": "embed",
                "model.layers.0.self_attn.k_proj": "attn_qkv",
                "model.layers.1.self_attn.o_proj": "attn_out",
                "model.layers.0.mlp.gate_proj": "ffn_in",
                "model.layers.0.mlp.up_proj": "ffn_in",
                "model.layers.1.mlp.down_proj": "ffn_out",
                "lm_head": "head",
            },
        ),
    ],
)
def test_roles_of_hf_models(model: str, expect: dict[str, str]) -> None:
    roles = layer_roles(_zoo_space(model).layers)
    assert {n: roles[n][0] for n in expect} == expect


def test_t5_encoder_is_early_and_decoder_late() -> None:
    roles = layer_roles(_zoo_space("t5").layers, buckets=2)
    assert roles["encoder.block.1.layer.0.SelfAttention.v"][1] == "early"
    assert roles["decoder.block.0.layer.0.SelfAttention.v"][1] == "late"


def test_mlp_falls_back_to_type_and_depth() -> None:
    space = CompressionSpace.from_model(DigitsMLP())
    # fc1/fc2 are not a transformer's FFN: no attention projections, so roles are module types
    assert role_groups(space) == {
        "linear@early": ("fc1",),
        "linear@middle": ("fc2",),
        "linear@late": ("fc3",),
    }
    assert role_groups(space, buckets=1) == {"linear@all": ("fc1", "fc2", "fc3")}


def test_grouped_space_samples_one_knob_per_group() -> None:
    pytest.importorskip("transformers")
    from autocompress._zoo import ZOO

    model = ZOO["bert"].build()
    flat = CompressionSpace.from_model(model, Knobs(bits=(4, 8), sparsity=None))
    space = CompressionSpace.from_model(
        model, Knobs(bits=(4, 8), sparsity=None), group_by="role", depth_buckets=1
    )
    assert space.layer_names == flat.layer_names
    groups = role_groups(flat, buckets=1)
    assert len(space.free_groups()) == len(groups) < len(flat.free_groups())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    plan = space.suggest(trial)
    assert len(trial.params) == len(groups)  # one bits knob per group
    for members in groups.values():
        assert len({plan.layers[m] for m in members}) == 1


def test_existing_groups_stay_whole_and_pins_are_left_out() -> None:
    space = CompressionSpace.from_model(
        DigitsMLP(), groups=[["fc1", "fc3"]], pin={"fc2": {"bits": 8}}
    )
    grouped = group_by_role(space)
    assert grouped.groups == (("fc1", "fc3"),)
    assert grouped.pin == space.pin


def test_bad_settings_are_refused() -> None:
    with pytest.raises(PlanError, match="group_by='depth' is unknown"):
        CompressionSpace.from_model(DigitsMLP(), group_by="depth")
    with pytest.raises(PlanError, match="buckets=0"):
        role_groups(CompressionSpace.from_model(DigitsMLP()), buckets=0)
