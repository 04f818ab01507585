"""Width on Hugging Face transformers built from tiny configs: whole heads, FFN channels, masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.compress._heads import Attention, Structure, find_structure, kept
from autocompress.compress._lowrank import factorizable_layers, factorize
from autocompress.compress._width import shrink_width
from autocompress.errors import PlanError
from autocompress.tasks._batch import call_model, pick_output

T = pytest.importorskip("transformers")

HIDDEN, HEADS, FFN = 64, 4, 128
MODELS = ["bert", "distilbert", "vit", "gpt2", "t5", "llama"]


def build(kind: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny random-init model (hidden 64, 4 heads, 2 layers) and a padded batch for it."""
    torch.manual_seed(seed)
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    text = {"input_ids": ids, "attention_mask": mask}
    common = {"num_hidden_layers": 2, "num_attention_heads": HEADS, "intermediate_size": FFN}
    if kind == "bert":
        cfg = T.BertConfig(
            vocab_size=100, hidden_size=HIDDEN, max_position_embeddings=32, num_labels=3, **common
        )
        return T.BertForSequenceClassification(cfg).eval(), text
    if kind == "distilbert":
        cfg = T.DistilBertConfig(
            vocab_size=100, dim=HIDDEN, n_layers=2, n_heads=HEADS, hidden_dim=FFN, num_labels=3
        )
        return T.DistilBertForSequenceClassification(cfg).eval(), text
    if kind == "vit":
        cfg = T.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_labels=3, **common
        )
        return T.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}
    if kind == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=100, n_positions=32, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_inner=FFN,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return T.GPT2LMHeadModel(cfg).eval(), text
    if kind == "t5":
        cfg = T.T5Config(
            vocab_size=100, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=2,
            num_heads=HEADS, decoder_start_token_id=0,
        )  # fmt: skip
        return T.T5ForConditionalGeneration(cfg).eval(), {**text, "decoder_input_ids": ids[:, :4]}
    cfg = T.LlamaConfig(
        vocab_size=100, hidden_size=HIDDEN, num_key_value_heads=2, max_position_embeddings=32,
        **common,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg).eval(), text


def run(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return pick_output(call_model(model, x))


def heads_of(a: Attention) -> tuple[int, int]:
    """(query heads, kv heads) counted from the projection weights themselves."""
    q_out = a.q.weight.shape[1] if a.packed else a.q.weight.shape[0]
    if a.packed == 3:
        q_out //= 3
    kv_out = q_out if a.packed else a.kv[0].weight.shape[0]
    return q_out // a.head_dim, kv_out // a.head_dim


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_weights(s: Structure) -> int:
    """Weights of every attention projection and feed-forward layer."""
    mods = {id(m): m for a in s.attention for m in (a.q, *a.kv, a.o)}
    mods.update({id(m): m for f in s.ffn for m in (*f.ups, f.down)})
    return sum(m.weight.numel() for m in mods.values())


@pytest.mark.parametrize("kind", MODELS)
def test_half_width_cuts_whole_heads_and_ffn_keeps_hidden(kind: str) -> None:
    model, x = build(kind)
    small = shrink_width(model, 0.5, x)
    before, after = find_structure(model), find_structure(small)
    assert len(after.attention) == len(before.attention) >= 2
    assert len(after.ffn) == len(before.ffn) >= 2
    for a, b in zip(before.attention, after.attention, strict=True):
        assert b.head_dim == a.head_dim == HIDDEN // HEADS
        h, kv = heads_of(b)
        if a.kv_heads == a.heads:
            assert (h, kv) == (2, 2)
        else:  # Llama GQA 4 q / 2 kv: every kv head kept, one query head per group
            assert (h, kv) == (2, 2) and b.module.num_key_value_groups == 1
        for attr in ("num_heads", "num_attention_heads", "n_heads"):
            if hasattr(b.module, attr):
                assert getattr(b.module, attr) == 2
    assert {f.channels for f in after.ffn} == {FFN // 2}
    emb = {n: p.shape for n, p in model.get_input_embeddings().named_parameters()}
    assert emb == {n: p.shape for n, p in small.get_input_embeddings().named_parameters()}
    assert block_weights(after) <= 0.6 * block_weights(before)  # Llama keeps its 2 kv heads
    cfg = small.config
    assert getattr(cfg, "num_attention_heads", getattr(cfg, "num_heads", None)) == 2
    assert model.config.num_attention_heads == HEADS  # the input is untouched
    assert run(small, x).shape == run(model, x).shape
    rebuilt = shrink_width(build(kind, seed=1)[0], 0.5, x)  # shapes depend on architecture only
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in small.state_dict().items()
    }


def _zero_weak_half(model: nn.Module) -> None:
    """Zero heads 1 and 3 of every attention and the upper half of every FFN's channels."""
    s = find_structure(model)
    with torch.no_grad():
        for a in s.attention:
            hd = a.head_dim
            cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in (1, 3)])
            if a.packed:  # Conv1D weights are (in, out)
                for i in range(a.packed):
                    a.q.weight[:, cols + i * a.heads * hd] = 0
                    a.q.bias[cols + i * a.heads * hd] = 0
                a.o.weight[cols] = 0
                continue
            for m in (a.q, *(a.kv if a.kv_heads == a.heads else [])):
                m.weight[cols] = 0
                if getattr(m, "bias", None) is not None:
                    m.bias[cols] = 0
            a.o.weight[:, cols] = 0
        for f in s.ffn:
            half = slice(f.channels // 2, None)
            for u in f.ups:
                if u.weight.shape[0] == f.channels:
                    u.weight[half] = 0
                else:
                    u.weight[:, half] = 0
                if getattr(u, "bias", None) is not None:
                    u.bias[half] = 0
            if f.down.weight.shape[0] == f.channels:
                f.down.weight[half] = 0
            else:
                f.down.weight[:, half] = 0


@pytest.mark.parametrize("kind", MODELS)
def test_dead_heads_and_channels_are_the_ones_removed(kind: str) -> None:
    # heads and channels that contribute nothing are the weakest: removing them changes no output,
    # which also proves the head bookkeeping (views, masks, GQA groups, T5 bias) is right
    model, x = build(kind)
    _zero_weak_half(model)
    small = shrink_width(model, 0.5, x)
    torch.testing.assert_close(run(small, x), run(model, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", [k for k in MODELS if k != "vit"])
def test_padding_does_not_leak_into_unmasked_outputs(kind: str) -> None:
    model, x = build(kind)
    small = shrink_width(model, 0.5, x)
    other = dict(x)
    other["input_ids"] = x["input_ids"].clone()
    other["input_ids"][1, 5:] = 3  # change only the padded tokens
    for m in (model, small):
        a, b = run(m, x), run(m, other)
        if a.dim() == 3 and a.shape[1] == x["input_ids"].shape[1]:  # per-token outputs
            keep = x["attention_mask"].bool()
            torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_one_training_step(kind: str) -> None:
    model, x = build(kind)
    small = shrink_width(model, 0.5, x).train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    before = copy.deepcopy(small.state_dict())
    loss = pick_output(call_model(small, x)).float().pow(2).mean()
    loss.backward()
    opt.step()
    a = find_structure(small).attention[0]
    assert a.q.weight.grad is not None and a.q.weight.grad.abs().sum() > 0
    changed = [k for k, v in small.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 10


def test_heads_and_ffn_are_separate_knobs() -> None:
    model, x = build("bert")
    only_heads = shrink_width(model, 1.0, x, heads=0.25)
    s = find_structure(only_heads)
    assert [heads_of(a) for a in s.attention] == [(1, 1), (1, 1)]
    assert {f.channels for f in s.ffn} == {FFN}
    only_ffn = shrink_width(model, 0.25, x, heads=1.0)
    s = find_structure(only_ffn)
    assert [heads_of(a) for a in s.attention] == [(4, 4), (4, 4)]
    assert {f.channels for f in s.ffn} == {FFN // 4}
    assert only_ffn.config.intermediate_size == FFN // 4


def test_kept_heads_inherit_their_weights() -> None:
    model, x = build("bert")
    small = shrink_width(model, 1.0, x, heads=0.5)
    old, new = find_structure(model).attention[0], find_structure(small).attention[0]
    blocks = list(old.q.weight.detach().split(16))
    for kept_block in new.q.weight.detach().split(16):
        assert any(torch.equal(kept_block, b) for b in blocks)


def test_t5_layers_sharing_the_position_bias_keep_the_same_heads() -> None:
    model, x = build("t5")
    small = shrink_width(model, 1.0, x, heads=0.5)
    enc = [a for a in find_structure(small).attention if a.name.startswith("encoder")]
    assert enc[0].bias_table is not None and enc[0].bias_table.embedding_dim == 2
    assert small.config.num_heads == 2 and small.config.d_kv == 16


def test_gqa_keeps_every_kv_head() -> None:
    model, x = build("llama")
    small = shrink_width(model, 1.0, x, heads=0.5)
    attn = small.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (
        32,
        32,
        32,
    )
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    assert small.model.layers[0].mlp.intermediate_size == FFN  # heads only
    assert shrink_width(model, 0.5, x).model.layers[1].mlp.intermediate_size == FFN // 2
    assert small.config.head_dim == 16


@pytest.mark.parametrize(("fraction", "expected"), [(0.99, 3), (0.5, 2), (0.1, 1)])
def test_head_counts_follow_the_fraction(fraction: float, expected: int) -> None:
    model, x = build("distilbert")
    small = shrink_width(model, 1.0, x, heads=fraction)
    assert expected == kept(HEADS, fraction)
    assert {heads_of(a)[0] for a in find_structure(small).attention} == {expected}


def test_ignored_attention_keeps_its_heads() -> None:
    model, x = build("bert")
    name = "bert.encoder.layer.0.attention.self"
    small = shrink_width(model, 0.5, x, ignored=[name])
    assert small.get_submodule(name).query.out_features == HIDDEN
    assert small.bert.encoder.layer[1].attention.self.query.out_features == HIDDEN // 2
    assert small.config.num_attention_heads == HEADS  # the layers disagree: config untouched


class OddAttention(nn.Module):
    """Declares heads but packs q/k/v in a layout nobody can read from the names."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.mix = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mix(x).chunk(3, -1)
        return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


class OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = OddAttention()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_unknown_attention_layout_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Linear(8, 16), OddBlock(), nn.Linear(16, 3))
    with pytest.raises(PlanError, match=r"attention '1.attn' \(OddAttention\).*heads=1.0"):
        shrink_width(model, 0.5, torch.randn(2, 5, 8))
    small = shrink_width(model, 0.5, torch.randn(2, 5, 8), heads=1.0)  # feed-forward only
    assert (small[1].attn.mix.out_features, small[1].fc1.out_features, small[0].out_features) == (
        48,
        16,
        16,
    )


def test_gpt_neox_packed_heads_are_refused_but_its_ffn_shrinks() -> None:
    cfg = T.GPTNeoXConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=FFN,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.GPTNeoXForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(1, 100, (2, 7))}
    with pytest.raises(PlanError, match="'gpt_neox.layers.0.attention' \\(GPTNeoXAttention\\)"):
        shrink_width(model, 0.5, x)
    small = shrink_width(model, 0.5, x, heads=1.0)
    layer = small.gpt_neox.layers[0]
    assert (layer.mlp.dense_h_to_4h.out_features, layer.attention.query_key_value.out_features) == (
        FFN // 2,
        3 * HIDDEN,
    )
    assert small.config.intermediate_size == FFN // 2 and small.config.num_attention_heads == HEADS


def test_bad_heads_fraction() -> None:
    model, x = build("bert")
    with pytest.raises(PlanError, match="heads=0"):
        shrink_width(model, 0.5, x, heads=0)


@pytest.mark.parametrize("kind", ["vit", "t5"])
def test_low_rank_keeps_hf_forward_working(kind: str) -> None:
    model, x = build(kind)
    names = factorizable_layers(model)
    reads = {
        "vit": "vit.embeddings.patch_embeddings.projection",
        "t5": "encoder.block.0.layer.1.DenseReluDense.wo",
    }[kind]
    assert reads in names  # HF reads this layer's .weight directly
    small = factorize(model, dict.fromkeys(names, 0.5))
    out = run(small, x)
    assert out.shape == run(model, x).shape and torch.isfinite(out).all()
    assert small.get_submodule(reads).weight.shape == model.get_submodule(reads).weight.shape


def _padded(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (n, 12), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 3}


def test_bert_half_width_low_rank_fine_tune_export_load(tmp_path) -> None:
    from autocompress import FinetuneSettings, LayerPlan, Plan, Task, compress, export, load

    bert, _ = build("bert")
    task = Task.from_hf(bert, _padded(48, 0), _padded(16, 1), _padded(16, 2))
    wo = "bert.encoder.layer.0.output.dense"
    plan = Plan(
        layers={wo: LayerPlan(bits=8, rank_ratio=0.5)},
        width=0.5,
        finetune=FinetuneSettings(epochs=1, batch_size=16),
    )
    small = compress.apply(bert, plan, task)
    assert isinstance(small, type(bert)) and small.config.num_attention_heads == 2
    assert small.get_submodule(wo).weight.shape == (HIDDEN, FFN // 2)  # LowRank answers .weight
    art = export(small, plan, tmp_path / "a")
    again = load(art.path, model=task.build_model(), example_input=task.example_input())
    x = task.example_input(8)
    torch.testing.assert_close(run(again, x), run(small, x), atol=0, rtol=0)
    assert type(again.get_submodule(wo)) is type(small.get_submodule(wo))
