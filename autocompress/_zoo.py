"""Tiny real architectures, as they come, with their natural batches (tests and benchmarks).

The generality suite (``tests/generality``) and ``benchmarks/generality.py`` run every knob on
each of these: Hugging Face ``transformers`` models built from small configs (random init, no
download) and plain torch models. Each entry builds the model exactly as a user would get it (no
wrapper) and makes inputs in the form the model takes (``input_ids`` + ``attention_mask`` dicts,
``pixel_values``, plain tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB, SEQ, HIDDEN, HEADS, LAYERS, FFN, CLASSES = 200, 16, 64, 4, 2, 128, 3


@dataclass(frozen=True)
class ZooModel:
    """One architecture: how to build it and how to make a batch of its natural inputs.

    Args:
        name: short name (``bert``, ``gpt2``, ...).
        build: returns the model (seeded random init).
        inputs: ``(n, generator) -> inputs`` (tensor or dict) for ``n`` examples.
        hf: whether it is a ``transformers`` model (needs the ``[hf]`` extra).
        kind: ``classification`` (one label per example) or ``embedding`` (outputs compared to
            the teacher's only: language models, encoders without a head).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Any]
    hf: bool = True
    kind: str = "classification"


def _tokens(n: int, g: torch.Generator, pad: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad:  # right padding of varying length, as a tokenizer with padding=True produces
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return make


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=SEQ * 2,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(cfg)


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        max_position_embeddings=SEQ * 2,
        num_labels=CLASSES,
    )
    return DistilBertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ * 2,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(cfg)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_labels=CLASSES,
    )
    return ViTForImageClassification(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=FFN,
        num_layers=LAYERS,
        num_heads=HEADS,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=SEQ * 2,
    )
    return LlamaForCausalLM(cfg)


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=CLASSES,
    )
    return ResNetForImageClassification(cfg)


class TransformerClassifier(nn.Module):
    """Token embedding + ``nn.TransformerEncoder`` + mean pool + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class LSTMClassifier(nn.Module):
    """Token embedding + 1-layer LSTM + linear head on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.lstm = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(x))
        return self.head(h[-1])


class ResidualCNN(nn.Module):
    """Conv + BatchNorm stem, one residual block, global pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
        )
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


class DepthwiseCNN(nn.Module):
    """Depthwise-separable convolutions (MobileNet style) and a linear head."""

    def __init__(self) -> None:
        super().__init__()

        def separable(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            *separable(32, 64),
            *separable(64, 128),
        )
        self.head = nn.Linear(128, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _pixels(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=g)


def _t5_inputs(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    enc = _tokens(n, g)
    dec = torch.randint(1, VOCAB, (n, SEQ // 2), generator=g)
    dec[:, 0] = 0  # decoder start token
    return {**enc, "decoder_input_ids": dec}


ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in [
        ZooModel("bert", _seeded(_bert), _tokens),
        ZooModel("distilbert", _seeded(_distilbert), _tokens),
        ZooModel("gpt2", _seeded(_gpt2), _tokens, kind="embedding"),
        ZooModel("vit", _seeded(_vit), lambda n, g: {"pixel_values": _pixels(n, g)}),
        ZooModel("t5", _seeded(_t5), _t5_inputs, kind="embedding"),
        ZooModel("llama", _seeded(_llama), _tokens, kind="embedding"),
        ZooModel("resnet", _seeded(_resnet), lambda n, g: {"pixel_values": _pixels(n, g)}),
        ZooModel(
            "transformer-encoder",
            _seeded(TransformerClassifier),
            lambda n, g: torch.randint(0, VOCAB, (n, SEQ), generator=g),
            hf=False,
        ),
        ZooModel(
            "lstm",
            _seeded(LSTMClassifier),
            lambda n, g: torch.randint(0, VOCAB, (n, SEQ), generator=g),
            hf=False,
        ),
        ZooModel("residual-cnn", _seeded(ResidualCNN), _pixels, hf=False),
        ZooModel("depthwise-cnn", _seeded(DepthwiseCNN), _pixels, hf=False),
    ]
}


def zoo_inputs(name: str, n: int, seed: int = 0) -> Any:
    """``n`` examples of ``name``'s natural inputs, seeded.

    Example:
        >>> sorted(zoo_inputs("bert", 2))
        ['attention_mask', 'input_ids']
    """
    return ZOO[name].inputs(n, torch.Generator().manual_seed(seed))
