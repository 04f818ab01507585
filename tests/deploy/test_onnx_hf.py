"""ONNX deployment of models as they come: raw Hugging Face models (dict inputs, ``ModelOutput``),
plain torch sequence and vision models; fp32 and int8 forms, MACs, and failures that name their
cause.

Every model is exported from a batch of 2 at one sequence length and checked by ONNX Runtime at
batch 5 and another sequence length, within the export tolerance (``ATOL``/``RTOL`` of
``autocompress.deploy._export``, documented in docs/objectives.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from autocompress.compress import apply
from autocompress.deploy import (
    OnnxModel,
    deploy_forms,
    export_fp32,
    latency_and_speedup,
    macs,
    products,
    tile_batch,
)
from autocompress.deploy._export import ATOL, RTOL
from autocompress.errors import AutocompressError
from autocompress.spaces import Plan
from autocompress.spaces._plan import FinetuneSettings
from autocompress.tasks._batch import call_model, pick_output

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 50
# int8 form vs the 8-bit torch model (activations rounded to 8 bits at run time): max |diff|
# relative to the largest output magnitude (measured 0.2-1.2% on these random-init models).
INT8_REL = 0.05


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def text(batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    x = ids(batch, seq)
    mask = torch.ones_like(x)
    mask[0, -2:] = 0  # padding on the first row
    return {"input_ids": x, "attention_mask": mask}


# --- the models ----------------------------------------------------------------------------
def hf():
    return pytest.importorskip("transformers")


def bert():
    t = hf()
    cfg = t.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    x = text()
    return t.BertForSequenceClassification(cfg), {
        **x,
        "token_type_ids": torch.zeros_like(x["input_ids"]),
    }


def distilbert():
    t = hf()
    cfg = t.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, num_labels=3
    )
    return t.DistilBertForSequenceClassification(cfg), text()


def gpt2():
    t = hf()
    cfg = t.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return t.GPT2LMHeadModel(cfg), text()


def vit():
    t = hf()
    cfg = t.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
    )
    return t.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


def t5():
    t = hf()
    cfg = t.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return t.T5ForConditionalGeneration(cfg), {
        "input_ids": ids(2, 8),
        "decoder_input_ids": ids(2, 5, 1),
    }


def llama():
    t = hf()
    cfg = t.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return t.LlamaForCausalLM(cfg), text()


class Encoder(nn.Module):
    """torch ``TransformerEncoder`` over token ids, mean-pooled to class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


class LSTMClassifier(nn.Module):
    """Token ids -> embedding -> 2-layer LSTM -> last step -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def depthwise_cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in),  # depthwise
            nn.Conv2d(c_in, c_out, 1),  # pointwise
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    return nn.Sequential(
        block(3, 16), block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)
    )


MODELS: dict[str, Callable[[], tuple[nn.Module, object]]] = {
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "vit": vit,
    "t5": t5,
    "llama": llama,
    "transformer-encoder": lambda: (Encoder(), ids(2, 8)),
    "lstm": lambda: (LSTMClassifier(), ids(2, 8)),
    "depthwise-cnn": lambda: (depthwise_cnn(), torch.randn(2, 3, 12, 12)),
}


def other(example: object) -> object:
    """The example at batch 5 and, for token inputs, sequence length 6 (the export saw 2 x 8;
    T5's decoder saw 5 tokens and gets 3)."""

    def change(k: str, v: torch.Tensor) -> torch.Tensor:
        v = tile_batch(v, 5)
        if v.dim() == 2 and not v.is_floating_point():
            v = v[:, :-2]
        return v

    if isinstance(example, dict):
        out = {k: change(k, v) for k, v in example.items()}
        if "attention_mask" in out:
            out["attention_mask"][1, -3:] = 0  # padding where the export had none
        return out
    return change("input", example)


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    model, example = MODELS[request.param]()
    model.eval()
    proto = export_fp32(model, example)
    return request.param, model, example, OnnxModel(proto.SerializeToString())


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    atol = ATOL * max(1.0, float(ref.abs().max()))
    return out.shape == ref.shape and bool(torch.allclose(out, ref, rtol=RTOL, atol=atol))


def test_fp32_matches_torch_at_another_batch_and_length(exported) -> None:
    name, model, example, om = exported
    x = other(example)
    with torch.no_grad():
        ref = pick_output(call_model(model, x))
    out = call_model(om, x)  # keyword inputs for dicts, as Task.evaluate calls a model
    assert close(pick_output(out), ref), name
    if isinstance(example, dict):
        assert [n for n, _ in om.inputs] == [k for k in example if k in dict(om.inputs)]
        assert isinstance(out, dict) and list(out) == ["logits"]  # named after the field
        assert dict(om.inputs)["input_ids" if "input_ids" in example else "pixel_values"] in (
            np.int64,
            np.float32,
        )


def test_token_inputs_have_a_dynamic_sequence_axis(exported) -> None:
    name, model, example, om = exported
    graph = {i.name: i.shape for i in om.session.get_inputs()}
    for k, shape in graph.items():
        assert isinstance(shape[0], str), (name, k)  # dynamic batch
        if k in ("input_ids", "attention_mask", "decoder_input_ids") or name in (
            "lstm",
            "transformer-encoder",
        ):
            assert isinstance(shape[1], str), (name, k)


def test_macs_counts_the_weight_products(exported) -> None:
    name, model, example, _ = exported
    one = tile_batch(example, 1)
    found = products(model, one)
    n_weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert macs(model, one) > 0 and found
    if name == "lstm":  # 8 steps x (4 gates x (in + hidden) x hidden) per layer, + the head
        lstm = 8 * (4 * 24 * (16 + 24) + 4 * 24 * (24 + 24)) + 24 * 3
        assert macs(model, one) == lstm
    if name == "gpt2":  # HF Conv1D layers (attention and MLP) are counted
        assert sum(p.layer.endswith("c_attn") for p in found) == 2
    assert macs(model, tile_batch(example, 2)) == 2 * macs(model, one)
    assert n_weights > 0


# (the torch TransformerEncoder's int8 form is covered by tests/deploy/test_onnx.py's
# mnist1d-transformer; exporting it with a dynamic sequence axis takes torch.export, slower)
INT8 = ["bert", "distilbert", "gpt2", "vit", "t5", "llama", "lstm"]


@pytest.mark.parametrize("name", INT8)
def test_int8_form_of_8bit_linear_layers(name: str) -> None:
    torch.manual_seed(0)
    model, example = MODELS[name]()
    model.eval()
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]
    plan = Plan.uniform(linears, bits=8, finetune=FinetuneSettings(epochs=0))
    small = apply(model, plan)
    forms = deploy_forms(small, example)
    assert "int8" in forms, name
    ops = [n.op_type for n in onnx.load_from_string(forms["int8"]).graph.node]
    assert ops.count("MatMulInteger") == len(linears)  # every Linear / HF Conv1D runs int8
    om = OnnxModel(forms["int8"])
    assert om.form == "int8"
    x = other(example)
    with torch.no_grad():
        ref = pick_output(call_model(small, x))
    out = pick_output(call_model(om, x))
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= INT8_REL * float(ref.abs().max()), name


def test_cache_is_off_for_export_and_restored() -> None:
    model, example = gpt2()
    model.eval()
    assert model.config.use_cache
    om = OnnxModel(export_fp32(model, example["input_ids"]).SerializeToString())  # ids alone
    assert model.config.use_cache  # switched off only while exporting
    x = ids(3, 5)
    with torch.no_grad():
        assert close(om(x)["logits"], model(x).logits)


def test_output_can_be_chosen() -> None:
    model, example = distilbert()
    proto = export_fp32(model, example, output="logits")
    assert [o.name for o in proto.graph.output] == ["logits"]
    with pytest.raises(AutocompressError, match="output type.*'nope'"):
        export_fp32(model, example, output="nope")


def test_onnx_model_inputs_by_name() -> None:
    model, example = distilbert()
    om = OnnxModel(export_fp32(model, example).SerializeToString())
    assert pick_output(om(**example, use_cache=False)).shape == (2, 3)  # non-arrays ignored
    assert pick_output(om(example["input_ids"], example["attention_mask"])).shape == (2, 3)
    with pytest.raises(AutocompressError, match="no input 'pixels'"):
        om(**example, pixels=torch.zeros(2, 3))
    with pytest.raises(AutocompressError, match="needs input 'attention_mask'"):
        om(input_ids=example["input_ids"])


def test_latency_with_dict_inputs() -> None:
    model, example = distilbert()
    r = latency_and_speedup(model, model, example, batch_sizes=(3,), repeats=2, warmup=0)
    assert r["latency_ms@3"] > 0 and r["int8@3"] == 0.0
    t = latency_and_speedup(model, model, example, (3,), runtime="torch", repeats=2, warmup=0)
    assert t["latency_ms@3"] > 0


# --- models that cannot be exported: one line naming the cause -----------------------------
class Words(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"label": "cat", "count": 3}


class QR(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(x)[0]


class ValueBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


class FixedLength(nn.Module):
    """A classifier over exactly 8 tokens (flattens the sequence): exported with a fixed length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).flatten(1))


@pytest.mark.parametrize(
    ("model", "exporter", "cause"),
    [
        (Words(), "auto", r"output type is not exportable"),
        (QR(), "torchscript", r"operator 'aten::linalg_qr' has no ONNX conversion"),
        (ValueBranch(), "dynamo", r"data-dependent Python control flow at test_onnx_hf.py:\d+ "),
    ],
)
def test_unexportable_model_names_the_cause(model: nn.Module, exporter: str, cause: str) -> None:
    with pytest.raises(AutocompressError, match=cause) as info:
        export_fp32(model, torch.randn(2, 4, 4), exporter=exporter)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the model cannot be exported to ONNX: ")
    assert len(msg) < 600


def test_a_model_needing_one_length_is_exported_with_a_fixed_sequence_axis() -> None:
    model = FixedLength().eval()
    om = OnnxModel(export_fp32(model, ids(2, 8)).SerializeToString())
    x = ids(5, 8, seed=3)
    with torch.no_grad():
        assert close(om(x), model(x))
    assert om.session.get_inputs()[0].shape[1] == 8


def test_bad_example_input_is_refused() -> None:
    with pytest.raises(AutocompressError, match="example_input must be a batched tensor"):
        export_fp32(nn.Linear(2, 2), {"flag": True})


def test_artifact_onnx_form_from_dict_inputs(tmp_path) -> None:
    """``export(..., onnx_example=batch)`` with a dict batch; ``load(runtime="onnxruntime")``."""
    from autocompress.artifacts import export, load

    model, example = distilbert()
    model.eval()
    art = export(model, Plan(), tmp_path / "a", onnx_example=example)
    om = load(art.path, runtime="onnxruntime")
    x = other(example)
    with torch.no_grad():
        ref = pick_output(call_model(model, x))
    assert close(pick_output(om(**x)), ref)
