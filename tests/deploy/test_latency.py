"""Latency measurement, speedup against the teacher, and analytic MACs / BitOps.

No test asserts an absolute time: only orderings with a wide margin, and structure.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress import apply, shrink_width
from autocompress.deploy import (
    LatencyStats,
    bitops,
    latency_and_speedup,
    load_onnx,
    macs,
    measure_latency,
    paired_ratio,
    products,
    teacher_onnx,
    to_onnx,
)
from autocompress.errors import AutocompressError
from autocompress.spaces import Plan
from autocompress.spaces._plan import FinetuneSettings
from autocompress.tasks import Task
from autocompress.tasks._models import DigitsMLP, Mnist1dTransformer

NO_FT = FinetuneSettings(epochs=0)


def work(n: int) -> int:
    """Deterministic CPU work proportional to ``n`` (no sleeping)."""
    return sum(i * i for i in range(n))


# --- measure_latency ---------------------------------------------------------------------------
def test_more_work_is_measured_slower_with_full_stats() -> None:
    cands = {"x1": lambda n: work(n), "x20": lambda n: work(20 * n)}
    stats = measure_latency(cands, 500, warmup=1, repeats=7, min_sample_ms=0.5)
    assert list(stats) == ["x1", "x20"]
    assert stats["x20"].median_ms > stats["x1"].median_ms
    for s in stats.values():
        assert isinstance(s, LatencyStats) and s.repeats == 7 and len(s.samples_ms) == 7
        assert s.median_ms > 0 and s.iqr_ms >= 0 and s.cv >= 0 and s.number >= 1


def test_rounds_are_interleaved_round_robin() -> None:
    calls: list[str] = []
    cands = {k: (lambda _, k=k: calls.append(k)) for k in "abc"}
    measure_latency(cands, None, warmup=2, repeats=6, min_sample_ms=0.0)
    assert calls[:6] == list("abcabc")  # warm-up rounds
    timed = calls[-18:]  # min_sample_ms=0: one call per sample, 6 rounds x 3
    rounds = [timed[i : i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == list("abc") for r in rounds)  # every round times everyone once
    assert len({r[0] for r in rounds}) == 3  # the order rotates


def test_threads_are_pinned_and_restored() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    measure_latency({"f": lambda _: seen.append(torch.get_num_threads())}, 0, repeats=2, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_time_budget_stops_early_but_keeps_five_rounds() -> None:
    stats = measure_latency({"f": work}, 100, repeats=1000, max_seconds=0.0, min_sample_ms=0.0)
    assert stats["f"].repeats == 5


def test_measure_latency_validates() -> None:
    with pytest.raises(AutocompressError, match="non-empty"):
        measure_latency({}, 0)
    with pytest.raises(AutocompressError, match="repeats"):
        measure_latency({"f": work}, 1, repeats=0)


def test_paired_ratio_cancels_a_shared_drift() -> None:
    slow = LatencyStats.from_samples([2.0, 4.0, 8.0, 16.0])  # machine slows down over time ...
    fast = LatencyStats.from_samples([1.0, 2.0, 4.0, 8.0])  # ... for both candidates alike
    assert paired_ratio(slow, fast) == (2.0, 0.0)
    assert slow.median_ms / fast.median_ms == 2.0 and slow.iqr_ms > 0


# --- latency_and_speedup ---------------------------------------------------------------------
BIG = nn.Sequential(
    nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
)
TINY = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_speedup_of_a_much_smaller_model(runtime: str) -> None:
    x = torch.randn(8, 64)
    r = latency_and_speedup(TINY, BIG, x, batch_sizes=(1, 64), runtime=runtime, repeats=7)
    for b in (1, 64):
        for key in ("latency_ms", "latency_iqr_ms", "latency_cv", "teacher_latency_ms"):
            assert r[f"{key}@{b}"] >= 0
        assert r[f"latency_ms@{b}"] > 0 and r[f"speedup_iqr@{b}"] >= 0
    assert r["speedup@64"] > 1.5  # ~70x fewer MACs: a wide margin on any machine
    assert ("int8@64" in r) == (runtime == "onnxruntime")


def test_teacher_export_is_cached_per_process() -> None:
    x = torch.randn(4, 64)
    first = teacher_onnx(BIG, x)
    assert teacher_onnx(BIG, torch.randn(2, 64)) is first  # same weights and input signature
    other = nn.Sequential(nn.Linear(64, 10))
    assert teacher_onnx(other, x) is not first


def test_a_loaded_onnx_model_is_timed_as_is(digits_mlp: Task, tmp_path) -> None:
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=8, finetune=NO_FT)
    model = apply(digits_mlp.teacher(), plan)
    om = load_onnx(to_onnx(model, digits_mlp.example_input(), tmp_path / "m.onnx", int8=True))
    r = latency_and_speedup(om, digits_mlp.teacher(), digits_mlp.example_input(), (16,), repeats=3)
    assert r["int8@16"] == 1.0
    with pytest.raises(AutocompressError, match="torch model"):
        latency_and_speedup(om, digits_mlp.teacher(), digits_mlp.example_input(), runtime="torch")
    with pytest.raises(AutocompressError, match="runtime="):
        latency_and_speedup(model, digits_mlp.teacher(), digits_mlp.example_input(), runtime="tf")


# --- macs / bitops ---------------------------------------------------------------------------
def test_macs_of_digits_mlp_match_the_hand_count() -> None:
    per_example = 64 * 300 + 300 * 100 + 100 * 10
    assert macs(DigitsMLP(), torch.zeros(1, 64)) == per_example
    assert macs(DigitsMLP(), torch.zeros(3, 64)) == 3 * per_example


def test_width_half_has_4x_fewer_hidden_macs() -> None:
    x = torch.zeros(1, 64)
    full = {p.layer: p.macs for p in products(DigitsMLP(), x)}
    half = {
        p.layer: p.macs for p in products(shrink_width(DigitsMLP(), 0.5, torch.zeros(2, 64)), x)
    }
    assert full["fc2"] == 300 * 100 and half["fc2"] == 150 * 50  # hidden layer: exactly 4x
    assert full["fc1"] == 2 * half["fc1"] and full["fc3"] == 2 * half["fc3"]


def test_sparse_macs_count_nonzero_weights() -> None:
    model = apply(DigitsMLP(), Plan.uniform(["fc1", "fc2", "fc3"], sparsity=0.5, finetune=NO_FT))
    dense, sparse = macs(model, torch.zeros(1, 64)), macs(model, torch.zeros(1, 64), sparse=True)
    assert sparse == sum(int((getattr(model, f).weight != 0).sum()) for f in ("fc1", "fc2", "fc3"))
    assert abs(sparse / dense - 0.5) < 0.01


def test_conv_and_attention_macs() -> None:
    conv = nn.Conv2d(1, 32, 3, padding=1)
    assert macs(conv, torch.zeros(2, 1, 8, 8)) == 2 * 8 * 8 * 32 * 9
    strided = nn.Conv1d(64, 64, 3, stride=2, padding=1)
    assert macs(strided, torch.zeros(1, 64, 20)) == 10 * 64 * 64 * 3
    net = Mnist1dTransformer()
    found = products(net, torch.zeros(1, 40))
    tokens, d = 10, 32
    assert [p.macs for p in found if p.layer == "pos"] == [0]  # a lookup
    attn = [p for p in found if p.layer == "blocks.0.attn"]
    assert [p.macs for p in attn if p.kind == "attention"] == [2 * tokens * tokens * d]
    assert sum(p.macs for p in attn) == 4 * tokens * d * d + 2 * tokens * tokens * d  # q,k,v,out
    assert macs(net, torch.zeros(1, 40)) == sum(p.macs for p in found)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitops_scale_with_bits(bits: int) -> None:
    x = torch.zeros(1, 64)
    dense = DigitsMLP()
    n = macs(dense, x)
    assert bitops(dense, x) == n * 32 * 32
    q = apply(dense, Plan.uniform(["fc1", "fc2", "fc3"], bits=bits, finetune=NO_FT))
    assert bitops(q, x) == n * bits * 8  # int8 deployment: 8-bit activations
    assert bitops(q, x, int8=False) == n * bits * 32
    half = apply(dense, Plan.uniform(["fc2"], bits=bits, finetune=NO_FT))
    assert bitops(half, x) == (n - 30000) * 32 * 32 + 30000 * bits * 8
