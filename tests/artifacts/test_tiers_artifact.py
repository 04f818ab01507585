"""Artifacts of plans that split an embedding into hot and cold rows (``hot_rows``).

The loader rebuilds the two tables from the plan alone and takes which rows are hot from the
saved ``hot_mask`` (one bit per row): outputs must be bit-identical after export -> load, a mask
that is missing or does not fit the tables must be refused with a one-line ArtifactError, and
the split must cost only the hot rows' extra bits and the mask.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.artifacts import export, inspect_artifact, load
from autocompress.compress import TieredEmbedding, apply
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NO_FT = FinetuneSettings(epochs=0)


def _tiered_plan(name: str, **kw: object) -> Plan:
    knobs = {"bits": 2, "group": 16, "hot_rows": 0.2, "hot_bits": 8, **kw}
    return Plan({name: LayerPlan(**knobs)}, finetune=NO_FT)  # type: ignore[arg-type]


def test_builtin_task_spec_round_trip_is_bit_identical(tmp_path: Path) -> None:
    """mnist1d-transformer's positional table (10 rows): the loader builds the task's model,
    splits it with the default mask and loads the saved one (rows 8 and 9, not 0 and 1)."""
    from autocompress.tasks import get_task

    task = get_task("mnist1d-transformer")
    torch.manual_seed(0)
    model = task.build_model().eval()
    x = task.example_input(8)
    plan = _tiered_plan("pos")
    q = apply(model, plan, example_input=x, row_counts={"pos": torch.arange(10.0)})
    assert q.pos.hot_mask.nonzero().flatten().tolist() == [8, 9]
    art = export(q, plan, tmp_path / "a", task_spec="mnist1d-transformer")
    again = load(art.path)
    assert isinstance(again.pos, TieredEmbedding)
    assert torch.equal(again.pos.hot_mask, q.pos.hot_mask)
    assert torch.equal(again.pos.slot, q.pos.slot)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    tensors = {t["name"]: t for t in inspect_artifact(art.path)["tensors"]}
    assert tensors["pos.hot.weight"]["kind"] == "u8g16"
    assert tensors["pos.cold.weight"]["kind"] == "u2g16"
    assert tensors["pos.hot_mask"]["kind"] == "bool" and tensors["pos.hot_mask"]["bytes"] <= 2


def _bert(vocab: int = 500, hidden: int = 64) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=hidden,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


WORD = "embeddings.word_embeddings"


def _inputs(vocab: int, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, 12), generator=g)
    ids[:, -3:] = 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _counts(vocab: int) -> torch.Tensor:
    """Row ``i`` counted ``(i * 7919) % vocab`` times: a scattered, non-prefix ranking."""
    return ((torch.arange(vocab) * 7919) % vocab).double()


@pytest.fixture(scope="module")
def tiered_bert() -> tuple[nn.Module, Plan, dict[str, torch.Tensor]]:
    pytest.importorskip("transformers")
    plan = _tiered_plan(WORD, hot_rows=0.05, hot_bits=4)
    q = apply(_bert(), plan, row_counts={WORD: _counts(500)})
    return q, plan, _inputs(500)


def test_hf_model_round_trip_with_model_is_bit_identical(tiered_bert, tmp_path: Path) -> None:
    q, plan, x = tiered_bert
    hot = q.embeddings.word_embeddings.hot_mask.nonzero().flatten()
    assert len(hot) == 25 and hot.tolist() != list(range(25))
    art = export(q, plan, tmp_path / "a")
    for model in (_bert(), q):  # the uncompressed architecture, or the compressed model
        again = load(art.path, model=model, example_input=x)
        with torch.no_grad():
            assert torch.equal(again(**x).last_hidden_state, q(**x).last_hidden_state)
        y = _inputs(500, n=3, seed=1)
        with torch.no_grad():
            assert torch.equal(again(**y).last_hidden_state, q(**y).last_hidden_state)


def test_a_mask_that_does_not_fit_is_refused(tiered_bert, tmp_path: Path) -> None:
    q, plan, x = tiered_bert
    bad = copy.deepcopy(q)
    mask = bad.embeddings.word_embeddings.hot_mask
    mask[int((~mask).nonzero()[0])] = True  # one hot row more than the hot table holds
    art = export(bad, plan, tmp_path / "extra")
    with pytest.raises(ArtifactError, match="hot_mask marks 26 hot rows but .*hot holds 25") as e:
        load(art.path, model=_bert(), example_input=x)
    assert "\n" not in str(e.value)

    gone = copy.deepcopy(q)
    del gone.embeddings.word_embeddings._buffers["hot_mask"]
    art = export(gone, plan, tmp_path / "missing")
    with pytest.raises(ArtifactError, match=f"no tensor '{WORD}.hot_mask'"):
        load(art.path, model=_bert(), example_input=x)


def test_few_hot_rows_cost_their_extra_bits_and_the_mask(tmp_path: Path) -> None:
    """2% of a 2000-row table at 4 bits: smaller than the table at 4 bits, larger than it at
    2 bits by about the hot rows' 2 extra bits per weight plus the one-bit-per-row mask."""
    pytest.importorskip("transformers")
    vocab, hidden = 2000, 64
    model = _bert(vocab, hidden)

    def size(lp: LayerPlan, name: str) -> int:
        plan = Plan({WORD: lp}, finetune=NO_FT)
        q = apply(model, plan, row_counts={WORD: _counts(vocab)})
        return export(q, plan, tmp_path / name).size_bytes

    low = size(LayerPlan(bits=2, group=32), "low")
    tiered = size(LayerPlan(bits=2, group=32, hot_rows=0.02, hot_bits=4), "tiered")
    high = size(LayerPlan(bits=4, group=32), "high")
    extra = 40 * hidden * 2 // 8 + vocab // 8  # hot rows' 2 more bits per weight + the mask
    assert low < tiered < high, (low, tiered, high)
    assert tiered - low <= extra + 512, (tiered - low, extra)
    assert high - tiered > 10 * (tiered - low)


def test_load_with_model_needs_no_example_input_without_a_width_shrink(
    tiered_bert, tmp_path: Path
) -> None:
    """Hot/cold and low-rank steps trace nothing: ``load(path, model=m)`` rebuilds them without
    ``example_input``, while a width shrink still asks for one (no task_spec to derive it)."""
    q, plan, x = tiered_bert
    art = export(q, plan, tmp_path / "hot")
    again = load(art.path, model=_bert())
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, q(**x).last_hidden_state)

    lr = Plan(
        {"encoder.layer.0.intermediate.dense": LayerPlan(bits=8, rank_ratio=0.5)}, finetune=NO_FT
    )
    q_lr = apply(_bert(), lr)
    art = export(q_lr, lr, tmp_path / "rank")
    again = load(art.path, model=_bert())
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, q_lr(**x).last_hidden_state)

    narrow = Plan({}, width=0.5, finetune=NO_FT)
    q_w = apply(_bert(), narrow, example_input=x)
    art = export(q_w, narrow, tmp_path / "width")
    with pytest.raises(ArtifactError, match="pass example_input="):
        load(art.path, model=_bert())
    again = load(art.path, model=_bert(), example_input=x)
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, q_w(**x).last_hidden_state)
