"""Every knob on real architectures as they come, end to end (benchmarks/generality.py).

Each zoo model (tiny random-init ``transformers`` BERT, DistilBERT, GPT-2, ViT, T5, Llama,
ResNet; torch TransformerEncoder, LSTM, residual and depthwise-separable CNNs) goes through
discovery -> every offered knob -> a 1-epoch distillation -> export -> load (identical outputs)
-> ONNX Runtime. A knob that is not offered must say why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import generality  # noqa: E402

from autocompress._zoo import ZOO  # noqa: E402


@pytest.mark.parametrize("name", list(ZOO))
def test_every_knob_end_to_end(name: str) -> None:
    if ZOO[name].hf:
        pytest.importorskip("transformers")
    report = generality.check_model(name)
    failed = {k: s for k, s in report.knobs.items() if not s.startswith(("pass", "not offered"))}
    assert not failed, f"{name}: {failed}"
    offered_not = [s for s in report.knobs.values() if s.startswith("not offered")]
    assert all(len(s) > len("not offered: ") for s in offered_not)  # with its reason
    assert report.coverage >= 0.95, f"{name}: {report.coverage:.1%} of parameters covered"
    assert all(reason for reason in report.skipped.values())


def test_markdown_lists_every_model_and_knob() -> None:
    reports = [generality.ModelReport("m", 10, 0.97, 2, {"b": "1-D norm"}, {"width": "pass"})]
    text = generality.markdown(reports, "cmd")
    assert "| m | 10 | 97.0% | 2 |" in text and "`b`: 1-D norm" in text
