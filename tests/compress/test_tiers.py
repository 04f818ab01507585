"""Hot and cold rows (``hot_rows``/``hot_bits``): the TieredEmbedding module and its wiring.

The module must compute exactly what the table it replaces computes, keep its layout through
``state_dict``/``load_state_dict``, copies and devices, and learn in both tables; ``apply``
must rank rows by a task's train split (or ``row_counts=``), quantize each table at its own
bits, and refuse plans it cannot honour with a one-line PlanError before any expensive step.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import autocompress.compress._apply as apply_mod
from autocompress.compress import TieredEmbedding, apply, quant_records, row_counts, split_tables
from autocompress.compress._meta import QuantRecord
from autocompress.compress._tiers import hot_count
from autocompress.errors import ArtifactError, PlanError
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan
from autocompress.tasks import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS, DIM = 40, 32


class EmbNet(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> linear head."""

    def __init__(self, rows: int = ROWS, dim: int = DIM, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(dim=1))


def _counts(rows: int = ROWS) -> torch.Tensor:
    """Counts with ties: rows 7 and 3 tie at 5 (3 must win), row 30 leads, row 12 next."""
    c = torch.zeros(rows)
    c[30], c[12], c[7], c[3], c[20] = 9.0, 6.0, 5.0, 5.0, 1.0
    return c


def _tiered(padding_idx: int | None = None, k: int = 4) -> tuple[nn.Embedding, TieredEmbedding]:
    torch.manual_seed(0)
    emb = nn.Embedding(ROWS, DIM, padding_idx=padding_idx)
    return emb, TieredEmbedding(emb, _counts(), k)


ALL_IDS = torch.arange(ROWS).reshape(4, 10)


# --- the module -------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 30, 0])  # 30 is hot, 0 is cold
def test_forward_and_weight_equal_the_table_for_every_id(padding_idx: int | None) -> None:
    emb, t = _tiered(padding_idx)
    assert torch.equal(t(ALL_IDS), emb(ALL_IDS))
    assert torch.equal(t(torch.tensor(5)), emb(torch.tensor(5)))  # a 0-d id
    assert torch.equal(t(ALL_IDS.int()), emb(ALL_IDS.int()))  # int32 ids as nn.Embedding takes
    assert torch.equal(t(input=ALL_IDS), emb(input=ALL_IDS))  # nn.Embedding's keyword
    assert torch.equal(t.weight, emb.weight)
    assert (t.num_embeddings, t.embedding_dim, t.padding_idx) == (ROWS, DIM, padding_idx)


def test_hot_rows_are_the_most_counted_ties_by_row_id() -> None:
    _, t = _tiered(k=4)
    assert t.hot_mask.nonzero().flatten().tolist() == [3, 7, 12, 30]  # 7 and 3 tie: 3 first
    _, t3 = _tiered(k=3)
    assert t3.hot_mask.nonzero().flatten().tolist() == [3, 12, 30]
    # each table keeps its rows in row-id order
    emb, t = _tiered(k=4)
    assert torch.equal(t.hot.weight, emb.weight[[3, 7, 12, 30]])
    assert torch.equal(
        t.cold.weight, emb.weight[[i for i in range(ROWS) if i not in (3, 7, 12, 30)]]
    )


def test_hot_count_bounds() -> None:
    assert hot_count(40, 0.1) == 4
    assert hot_count(40, 0.001) == 1  # at least one hot row
    assert hot_count(40, 0.999) == 39  # at least one cold row
    assert hot_count(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floats: still 3


@pytest.mark.parametrize("padding_idx", [30, 0])
def test_padding_row_is_on_the_right_table_and_gets_no_gradient(padding_idx: int) -> None:
    emb, t = _tiered(padding_idx)
    if padding_idx == 30:  # hot: slot 3 of the hot table (rows 3, 7, 12, 30)
        assert (t.hot.padding_idx, t.cold.padding_idx) == (3, None)
    else:  # cold: row 0 is the first cold row
        assert (t.hot.padding_idx, t.cold.padding_idx) == (None, 0)
    t(ALL_IDS).sum().backward()
    emb(ALL_IDS).sum().backward()
    assert torch.equal(_full_grad(t), emb.weight.grad)
    assert float(_full_grad(t)[padding_idx].abs().sum()) == 0.0


def _full_grad(t: TieredEmbedding) -> torch.Tensor:
    g = torch.zeros(t.num_embeddings, t.embedding_dim)
    g[t.hot_mask] = t.hot.weight.grad
    g[~t.hot_mask] = t.cold.weight.grad
    return g


def test_gradients_reach_both_tables_and_no_grad_works() -> None:
    emb, t = _tiered()
    ids = torch.tensor([[30, 0, 12, 5, 30]])  # hot 30 twice, hot 12, cold 0 and 5
    t(ids).pow(2).sum().backward()
    emb(ids).pow(2).sum().backward()
    assert torch.allclose(_full_grad(t), emb.weight.grad)
    hot_rows = t.hot.weight.grad.abs().sum(dim=1).ne(0).tolist()
    cold_rows = t.cold.weight.grad.abs().sum(dim=1).ne(0).nonzero().flatten().tolist()
    assert hot_rows == [False, False, True, True]  # slots of rows 12 and 30 only
    assert cold_rows == [0, 4]  # rows 0 and 5 (3 is hot, so row 5 is cold slot 4)
    with torch.no_grad():
        y = t(ids)
    assert not y.requires_grad and torch.equal(y, emb(ids).detach())
    with torch.inference_mode():
        assert torch.equal(t(ids), emb(ids))


def test_state_dict_holds_both_tables_and_the_mask_not_the_slots() -> None:
    _, t = _tiered()
    sd = t.state_dict()
    assert sorted(sd) == ["cold.weight", "hot.weight", "hot_mask"]
    assert sd["hot_mask"].dtype == torch.bool and sd["hot_mask"].shape == (ROWS,)
    assert t.slot.dtype == torch.int32  # rebuilt from the mask, never saved
    net = EmbNet()
    split_tables(net, {"emb": 0.1}, {"emb": _counts()})
    keys = set(net.state_dict())
    assert {"emb.hot.weight", "emb.cold.weight", "emb.hot_mask"} <= keys
    assert not any("slot" in k for k in keys) and "emb.weight" not in keys


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 30])
def test_load_into_a_fresh_layout_restores_the_mask_and_slots(
    assign: bool, padding_idx: int | None
) -> None:
    emb, t = _tiered(padding_idx)
    fresh = TieredEmbedding(nn.Embedding(ROWS, DIM, padding_idx=padding_idx), None, 4)
    assert fresh.hot_mask.nonzero().flatten().tolist() == [0, 1, 2, 3]  # the loader's default
    assert not torch.equal(fresh(ALL_IDS), emb(ALL_IDS))
    fresh.load_state_dict(copy.deepcopy(t.state_dict()), assign=assign)
    assert torch.equal(fresh.hot_mask, t.hot_mask)
    assert torch.equal(fresh.slot, t.slot)
    assert torch.equal(fresh(ALL_IDS), emb(ALL_IDS))
    assert (fresh.hot.padding_idx, fresh.cold.padding_idx) == (
        t.hot.padding_idx,
        t.cold.padding_idx,
    )


def test_a_mask_of_another_layout_is_refused_on_load() -> None:
    _, t = _tiered()
    fresh = TieredEmbedding(nn.Embedding(ROWS, DIM), None, 4)
    sd = t.state_dict()
    wrong = sd["hot_mask"].clone()
    wrong[0] = True  # 5 hot rows for a 4-row hot table: every slot after row 0 would shift
    with pytest.raises(ArtifactError, match="hot_mask marks 5 hot rows but hot holds 4") as e:
        fresh.load_state_dict({**sd, "hot_mask": wrong})
    assert "\n" not in str(e.value)
    with pytest.raises(ArtifactError, match=r"not a \[40\] bool row mask"):
        fresh.load_state_dict({**sd, "hot_mask": sd["hot_mask"].float()})
    with pytest.raises(RuntimeError, match="Missing key.*hot_mask"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "hot_mask"})


def test_deepcopy_and_to_keep_the_layout() -> None:
    emb, t = _tiered(30)
    c = copy.deepcopy(t)
    assert c.slot is not t.slot and torch.equal(c.slot, t.slot)
    assert torch.equal(c(ALL_IDS), emb(ALL_IDS))
    d = copy.deepcopy(t).to(torch.float64)
    assert d.hot.weight.dtype == torch.float64 and d.slot.dtype == torch.int32
    assert d.hot_mask.dtype == torch.bool and d.weight.dtype == torch.float64
    assert torch.equal(d(ALL_IDS), emb(ALL_IDS).double())
    m = copy.deepcopy(t).to("meta")
    assert m.slot.device.type == "meta" and m.hot.weight.device.type == "meta"


class ScaledEmbedding(nn.Embedding):
    """A table whose forward scales the rows (as Hugging Face's scaled word embeddings do)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 8.0


class PlainSubclass(nn.Embedding):
    """A subclass that only adds a method: still a plain lookup."""

    def rows(self) -> int:
        return self.num_embeddings


def test_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(PlanError, match="ScaledEmbedding computes more than a lookup"):
        TieredEmbedding(ScaledEmbedding(ROWS, DIM), None, 4)
    emb = PlainSubclass(ROWS, DIM)
    assert torch.equal(TieredEmbedding(emb, _counts(), 4)(ALL_IDS), emb(ALL_IDS))
    with pytest.raises(PlanError, match="max_norm"):
        TieredEmbedding(nn.Embedding(ROWS, DIM, max_norm=1.0), None, 4)
    with pytest.raises(PlanError, match="scale_grad_by_freq"):
        TieredEmbedding(nn.Embedding(ROWS, DIM, scale_grad_by_freq=True), None, 4)
    with pytest.raises(PlanError, match=r"shape \[39\].*shape \[40\]"):
        TieredEmbedding(nn.Embedding(ROWS, DIM), torch.ones(39), 4)
    for k in (0, ROWS):
        with pytest.raises(PlanError, match="0 < hot rows < 40"):
            TieredEmbedding(nn.Embedding(ROWS, DIM), None, k)
    with pytest.raises(PlanError, match="'head' is a Linear"):
        split_tables(EmbNet(), {"head": 0.1})
    with pytest.raises(PlanError, match="does not have"):
        split_tables(EmbNet(), {"nope": 0.1})


def test_row_counts_stop_after_the_tables_and_count_every_lookup() -> None:
    net = EmbNet()
    calls = []
    net.head.register_forward_pre_hook(lambda m, a: calls.append(1))
    batches = [torch.tensor([[1, 1, 5]]), torch.tensor([[5, 39], [0, 5]])]
    c = row_counts(net, ["emb"], batches)["emb"]
    assert c.shape == (ROWS,) and c.dtype == torch.float64
    assert {i: int(v) for i, v in enumerate(c.tolist()) if v} == {0: 1, 1: 2, 5: 3, 39: 1}
    assert not calls  # the forward stopped at the embedding
    assert not net.emb._forward_pre_hooks  # hooks removed


def test_row_counts_run_in_eval_mode_and_restore_the_modes() -> None:
    """Counting must not move BatchNorm statistics of layers before the table; every module
    gets its own mode back."""

    class Front(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.drop = nn.BatchNorm1d(4), nn.Dropout(0.5)
            self.emb = nn.Embedding(ROWS, DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ids = (self.drop(self.bn(x.float())).abs() * 3).long().clamp(max=ROWS - 1)
            return self.emb(ids)

    net = Front().train()
    net.drop.eval()  # a mixed-mode model
    before = net.bn.running_mean.clone()
    row_counts(net, ["emb"], [torch.tensor([[1, 5, 7, 9], [2, 3, 4, 8]])])
    assert torch.equal(net.bn.running_mean, before)
    assert net.training and net.bn.training and net.emb.training and not net.drop.training


def test_a_frozen_table_stays_frozen_and_bad_ids_raise() -> None:
    emb = nn.Embedding(ROWS, DIM)
    emb.weight.requires_grad_(False)
    tiered = TieredEmbedding(emb, torch.arange(ROWS).flip(0).double(), 4)
    assert not tiered.hot.weight.requires_grad and not tiered.cold.weight.requires_grad
    assert TieredEmbedding(nn.Embedding(ROWS, DIM), None, 4).hot.weight.requires_grad
    for bad in (-1, ROWS):
        with pytest.raises(IndexError):
            tiered(torch.tensor([[0, bad]]))


def test_row_counts_skip_the_padding_row() -> None:
    """Padded batches look up [PAD] most; it must not take a word's hot row."""
    net = EmbNet()
    net.emb.padding_idx = 0
    batches = [torch.tensor([[4, 0, 0, 0], [4, 9, 9, 0]])]
    c = row_counts(net, ["emb"], batches)["emb"]
    assert {i: int(v) for i, v in enumerate(c.tolist()) if v} == {4: 2, 9: 2}
    tiered = TieredEmbedding(net.emb, c, 2)
    assert tiered.hot_mask.nonzero().flatten().tolist() == [4, 9]


class KeywordNet(EmbNet):
    """Calls its table as ``emb(input=ids)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input=x).mean(dim=1))


def test_row_counts_of_a_table_called_by_keyword() -> None:
    c = row_counts(KeywordNet(), ["emb"], [torch.tensor([[2, 2, 7]])])["emb"]
    assert {i: int(v) for i, v in enumerate(c.tolist()) if v} == {2: 2, 7: 1}


def test_a_tied_table_is_not_split() -> None:
    """``split_tables`` is public: a table shared with an output layer must not be split
    (the output layer would keep the whole table, untied)."""
    net = EmbNet()
    net.out = nn.Linear(DIM, ROWS, bias=False)
    net.out.weight = net.emb.weight
    with pytest.raises(PlanError, match="shared with 'out.weight'"):
        split_tables(net, {"emb": 0.1})
    assert isinstance(net.emb, nn.Embedding)


# --- apply --------------------------------------------------------------------------------


def _zipf_ids(n: int, seed: int, length: int = 6) -> torch.Tensor:
    """Ids of rows 0..9 only, row ``r`` used about ``r + 1`` times as often as row 0 (a
    shuffled pool, so the ranking is exact: row 9 first, then 8, ...); rows 10.. never."""
    pool = torch.cat([torch.full((r + 1,), r) for r in range(10)])
    ids = pool.repeat(-(-n * length // len(pool)))[: n * length]
    g = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(len(ids), generator=g)].reshape(n, length)


def _task(rows: int = ROWS) -> Task:
    torch.manual_seed(0)
    net = EmbNet(rows).eval()

    def split(n: int, seed: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x = _zipf_ids(n, seed) + shift
        return x, x[:, 0] % 3

    # val and test use rows 20..29, more often than train uses 6..9: counting them would
    # make rows 26..29 hot
    return Task.from_module(net, split(256, 0), split(512, 1, 20), split(512, 2, 20))


def _on_grid(w: torch.Tensor, rec: QuantRecord) -> bool:
    """``w`` is ``code * scale`` of ``rec`` with codes within ``rec.bits``."""
    assert rec.scale is not None
    s = rec.scale
    if rec.group:
        s = s.repeat_interleave(rec.group, dim=1)[:, : w.shape[1]]
    else:
        s = s[:, None].expand_as(w)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.where(s == 0, torch.zeros_like(w), torch.round(w / safe))
    qmax = 2 ** (rec.bits - 1) - 1
    return bool(q.abs().max() <= qmax) and torch.equal(q * s, w)


NO_FT = FinetuneSettings(epochs=0)
PLAN = Plan(layers={"emb": LayerPlan(bits=2, group=16, hot_rows=0.1, hot_bits=4)}, finetune=NO_FT)


def _check_tiered(q: nn.Module, hot: list[int], hot_bits: int = 4, group: int = 16) -> None:
    t = q.emb
    assert isinstance(t, TieredEmbedding)
    assert t.hot_mask.nonzero().flatten().tolist() == hot
    recs = quant_records(q)
    assert set(recs) == {"emb.hot.weight", "emb.cold.weight"}
    h, c = recs["emb.hot.weight"], recs["emb.cold.weight"]
    assert (h.bits, h.group, h.scheme) == (hot_bits, group, "uniform")
    assert (c.bits, c.group, c.scheme) == (2, 16, "uniform")
    assert h.scale.shape == (4, DIM // group) and c.scale.shape == (ROWS - 4, DIM // 16)
    assert _on_grid(t.hot.weight.detach(), h) and _on_grid(t.cold.weight.detach(), c)
    assert not _on_grid(t.hot.weight.detach(), QuantRecord(2, "uniform", h.scale, group=group))


def test_apply_with_a_task_ranks_rows_by_its_train_split() -> None:
    task = _task()
    q = apply(task.teacher(), PLAN, task)
    _check_tiered(q, [6, 7, 8, 9])  # the 4 most drawn rows of the train split
    flat = apply(task.teacher(), Plan({"emb": LayerPlan(bits=2, group=16)}, finetune=NO_FT), task)
    ref, mask = task.teacher().emb.weight.detach(), q.emb.hot_mask
    w, w_flat = q.emb.weight.detach(), flat.emb.weight.detach()
    # scales are per row (groups of 16 within a row): cold rows are rounded as in the
    # whole 2-bit table, hot rows on the finer 4-bit grid
    assert torch.equal(w[~mask], w_flat[~mask])
    assert (w[mask] - ref[mask]).abs().mean() < 0.5 * (w_flat[mask] - ref[mask]).abs().mean()
    assert isinstance(task.teacher().emb, nn.Embedding)  # input model untouched


def test_apply_with_row_counts_and_no_task() -> None:
    torch.manual_seed(0)
    net = EmbNet().eval()
    counts = {"emb": _counts()}
    q = apply(net, PLAN, row_counts=counts)  # no task, no example input
    _check_tiered(q, [3, 7, 12, 30])
    x = torch.randint(0, ROWS, (3, 5))
    q2 = apply(net, PLAN, example_input=x, row_counts=counts)  # the restructure path
    _check_tiered(q2, [3, 7, 12, 30])
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_row_counts_override_the_task_s() -> None:
    task = _task()
    q = apply(task.teacher(), PLAN, task, row_counts={"emb": _counts()})
    _check_tiered(q, [3, 7, 12, 30])


def test_hot_bits_16_keeps_the_hot_rows_in_fp16() -> None:
    plan = Plan(layers={"emb": LayerPlan(bits=2, group=16, hot_rows=0.1, hot_bits=16)})
    torch.manual_seed(0)
    net = EmbNet().eval()
    q = apply(net, plan, row_counts={"emb": _counts()})
    recs = quant_records(q)
    assert recs["emb.hot.weight"].bits == 16 and recs["emb.hot.weight"].group == 0
    assert torch.equal(q.emb.hot.weight, net.emb.weight[[3, 7, 12, 30]].half().float())


def test_apply_with_gptq() -> None:
    task = _task()
    plan = PLAN.replace(calibration="gptq")
    q = apply(task.teacher(), plan, task)
    _check_tiered(q, [6, 7, 8, 9])


@pytest.mark.parametrize("hot_bits", [4, 8])
def test_fine_tune_of_a_tiny_hf_bert(hot_bits: int) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    bert = transformers.BertForSequenceClassification(cfg).eval()

    def data(n: int, seed: int) -> dict[str, torch.Tensor]:
        ids = _zipf_ids(n, seed) + 1  # rows 1..10 used, 0 is [PAD]
        ids = torch.cat([ids, torch.zeros(n, 2, dtype=torch.long)], dim=1)
        mask = (ids != 0).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 2}

    task = Task.from_hf(bert, data(64, 0), data(16, 1), data(16, 2))
    name = "bert.embeddings.word_embeddings"
    ft = FinetuneSettings(epochs=1, max_steps=2, batch_size=16, lr=1e-2)
    lp = LayerPlan(bits=2, group=16, hot_rows=0.1, hot_bits=hot_bits)
    plan = Plan(layers={name: lp}, calibration="gptq", finetune=ft)
    q = apply(bert, plan, task)
    t = q.bert.embeddings.word_embeddings
    assert isinstance(t, TieredEmbedding)
    assert t.hot_mask.nonzero().flatten().tolist() == [5, 6, 7, 8, 9, 10]  # 10% of 60 rows
    assert t.hot.padding_idx is None and t.cold.padding_idx == 0  # [PAD] trimmed, so cold
    recs = quant_records(q)
    assert recs[f"{name}.hot.weight"].bits == hot_bits and recs[f"{name}.cold.weight"].bits == 2
    assert _on_grid(t.hot.weight.detach(), recs[f"{name}.hot.weight"])
    assert _on_grid(t.cold.weight.detach(), recs[f"{name}.cold.weight"])
    assert not torch.equal(t.hot.weight, bert.bert.embeddings.word_embeddings.weight[5:11])
    x = task.example_input(4)
    with torch.no_grad():
        assert torch.isfinite(q(**x).logits).all()


# --- plans refused up front -------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if row counting, copying or quantization starts."""

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("expensive work started before the plan was refused")

    for fn in ("count_rows", "restructure", "attach", "calibrate", "factorize"):
        monkeypatch.setattr(apply_mod, fn, boom)


def _refused(model: nn.Module, plan: Plan, match: str, **kw: object) -> None:
    with pytest.raises(PlanError, match=match) as e:
        apply(model, plan, **kw)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_plans_refused_before_any_work(no_work: None) -> None:
    net = EmbNet().eval()
    counts = {"emb": _counts()}
    _refused(
        net,
        Plan(layers={"head": LayerPlan(bits=2, hot_rows=0.1, hot_bits=4)}),
        "layer 'head' cannot use hot_rows .*embedding tables only.*use hot_rows=0",
        row_counts=counts,
    )
    _refused(net, PLAN, r"hot_rows on \['emb'\] ranks rows .*pass task= \(or row_counts=\)")
    _refused(net, PLAN, r"row_counts\['emb'\] has shape \[39\]", row_counts={"emb": torch.ones(39)})
    _refused(net, PLAN.replace(calibration="gptq"), "calibration='gptq' needs", row_counts=counts)
    capped = EmbNet()
    capped.emb = nn.Embedding(ROWS, DIM, max_norm=1.0)
    _refused(capped, PLAN, "layer 'emb' cannot use hot_rows .*max_norm", row_counts=counts)
    scaled = EmbNet()
    scaled.emb = ScaledEmbedding(ROWS, DIM)
    _refused(scaled, PLAN, "layer 'emb' cannot use hot_rows", row_counts=counts)


def test_tied_embedding_is_refused(no_work: None) -> None:
    pytest.importorskip("transformers")
    from autocompress._zoo import VOCAB, ZOO

    gpt2 = ZOO["gpt2"].build()
    for name in ("transformer.wte", "lm_head"):
        plan = Plan(layers={name: LayerPlan(bits=2, hot_rows=0.1, hot_bits=4)})
        _refused(
            gpt2,
            plan,
            f"layer '{name}' cannot use hot_rows .*tied",
            row_counts={name: torch.ones(VOCAB)},
        )


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"bits": 4, "hot_bits": 4}, "needs hot_bits > bits"),
        ({"bits": 4, "hot_bits": 2}, "needs hot_bits > bits"),
        ({"bits": 2, "hot_bits": 4, "rank_ratio": 0.5}, "cannot be combined with rank_ratio"),
        ({"bits": 16, "hot_bits": 8}, "needs scheme 'uniform' and bits <= 8"),
        ({"bits": 32}, "needs scheme 'uniform' and bits <= 8"),
        ({"bits": 2, "hot_bits": 4, "scheme": "codebook"}, "needs scheme 'uniform'"),
        ({"bits": 2, "hot_bits": 4, "hot_rows": 1.0}, r"outside \[0, 1\)"),
        ({"bits": 2, "hot_bits": 4, "hot_rows": 1.5}, r"outside \[0, 1\)"),
        ({"bits": 2, "hot_bits": 4, "hot_rows": -0.1}, r"outside \[0, 1\)"),
        ({"bits": 2, "hot_bits": 32}, "hot_bits=32 is not allowed"),
    ],
)
def test_contradicting_knobs_are_one_line_plan_errors(knobs: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match) as e:
        LayerPlan(**{"hot_rows": 0.1, **knobs})
    assert "\n" not in str(e.value)


def test_a_table_the_model_never_calls_is_refused() -> None:
    from autocompress.compress import row_counts

    class ReadsWeight(nn.Module):  # looks rows up through .weight, never calls the module
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(8, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb.weight[ids]

    with pytest.raises(PlanError, match="never looked up rows of \\['emb'\\]"):
        row_counts(ReadsWeight(), ["emb"], [torch.tensor([[1, 2]])])
