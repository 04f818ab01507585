"""Hot/cold embedding tiers (``hot_rows``/``hot_bits``) in the sensitivity pass, the hand-style
plans and the sampler: measured like the engine applies them, bytes of both tables counted."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

from autocompress.compress import TieredEmbedding, apply, quant_records, row_counts
from autocompress.compress._gptq import calibration_inputs
from autocompress.compress._tiers import COUNT_SAMPLES
from autocompress.spaces import (
    CompressionSpace,
    FinetuneSettings,
    Knobs,
    LayerPlan,
    Plan,
    sensitivity,
)
from autocompress.spaces._sensitivity import (
    HAND,
    _hessians,
    _swapped,
    _tensor_bytes,
    candidate_settings,
    hand_plans,
)
from autocompress.tasks import Task
from autocompress.tasks._batch import call_model

TIERED = dict(hot_rows=(0.0, 0.2), hot_bits=(4, 8))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(60, 16)
        self.pos = nn.Embedding(6, 16)
        self.fc1 = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.emb(x) + self.pos.weight[: x.shape[1]]).mean(dim=1)
        return self.head(torch.relu(self.fc1(h)))


def _task() -> Task:
    torch.manual_seed(0)
    model = Toy().eval()
    g = torch.Generator().manual_seed(0)
    # skewed ids: a few rows carry most lookups, as words do
    x = torch.multinomial(1.0 / torch.arange(1, 61.0), 96 * 6, True, generator=g).view(96, 6)
    y = torch.randint(0, 4, (96,), generator=g)
    return Task.from_module(model, (x[:64], y[:64]), (x[64:], y[64:]), (x[64:], y[64:]))


def _space(task: Task, **knobs: object) -> CompressionSpace:
    kw = {"sparsity": None, "bits": (2, 3, 4, 8), "groups": (0, 16), **knobs}
    return CompressionSpace.from_model(task.teacher(), Knobs(**kw))


def _tiers(settings: list[LayerPlan]) -> list[tuple]:
    return [(lp.bits, lp.group, lp.hot_rows, lp.hot_bits) for lp in settings if lp.hot_rows]


def test_embeddings_are_measured_with_tiers_only_when_offered() -> None:
    task = _task()
    space = _space(task, **TIERED)
    emb, _ = candidate_settings(space, ["emb"], role="embed")
    # cold rows at 3 and 2 bits, hot 10% at each wider hot width, at the space's group size
    assert _tiers(emb) == [(3, 16, 0.1, 4), (3, 16, 0.1, 8), (2, 16, 0.1, 4), (2, 16, 0.1, 8)]
    assert not _tiers(candidate_settings(space, ["fc1"], role="linear")[0])
    narrow = _space(task, hot_rows=(0.0, 0.05), hot_bits=(4,))
    assert {t[2:] for t in _tiers(candidate_settings(narrow, ["emb"], role="embed")[0])} == {
        (0.05, 4)
    }
    plain, _ = candidate_settings(_space(task), ["emb"], role="embed")
    assert not _tiers(plain)


@pytest.mark.parametrize("gptq", [False, True])
def test_tiered_unit_equals_the_engine(gptq: bool) -> None:
    """A tiered setting measured in place is what ``compress.apply`` gives for a plan splitting
    that table alone, with the task's row ranking (and with GPTQ-style clipped scales)."""
    task = _task()
    teacher = task.teacher()
    work = Toy()
    work.load_state_dict(teacher.state_dict())
    before = {k: v.clone() for k, v in work.state_dict().items()}
    space = _space(task, **TIERED, calibration=("gptq",) if gptq else ("none",))
    hess = _hessians(task, teacher, space.layers) if gptq else None
    counts = row_counts(teacher, ["emb"], calibration_inputs(task, COUNT_SAMPLES))
    lp = LayerPlan(bits=2, group=16, hot_rows=0.1, hot_bits=4)
    x = task.example_input(16)
    with torch.no_grad(), _swapped(work, teacher, [space.layer("emb")], lp, hess, counts) as coded:
        got = call_model(work, x)
        assert set(coded) == {"emb.hot.weight", "emb.cold.weight", "emb.hot_mask"}
        assert coded["emb.hot.weight"][1].bits == 4 and coded["emb.cold.weight"][1].bits == 2
        assert int(coded["emb.hot_mask"][0].sum()) == 6  # ceil(0.1 * 60)
    plan = Plan(
        layers={"emb": lp},
        calibration="gptq" if gptq else "none",
        finetune=FinetuneSettings(epochs=0),
    )
    full = apply(teacher, plan, task)
    assert isinstance(full.emb, TieredEmbedding)
    with torch.no_grad():
        want = call_model(full, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got, call_model(teacher, x))
    assert all(torch.equal(before[k], v) for k, v in work.state_dict().items())  # restored


def test_tiered_bytes_count_both_tables_and_the_mask() -> None:
    task = _task()
    space = _space(task, **TIERED)
    sens = sensitivity(task, space, examples=16)
    emb = {
        (m.knobs["bits"], m.knobs["group"], m.knobs["hot_rows"], m.knobs["hot_bits"]): m
        for m in sens.unit("emb").settings
    }
    plain2, plain4 = emb[(2, 16, 0.0, 8)], emb[(4, 16, 0.0, 8)]
    tiered = emb[(2, 16, 0.1, 4)]
    assert plain2.bytes < tiered.bytes < plain4.bytes
    assert tiered.distortion < plain2.distortion
    # the bytes are those of the three tensors the engine's split table stores
    plan = Plan(layers={"emb": tiered.layer_plan}, finetune=FinetuneSettings(epochs=0))
    full = apply(task.teacher(), plan, task)
    recs = quant_records(full)
    want = sum(
        _tensor_bytes(n, t, recs.get(n), True)
        for n, t in full.state_dict().items()
        if n.startswith("emb.")
    )
    assert {n for n in full.state_dict() if n.startswith("emb.")} == {
        "emb.hot.weight", "emb.cold.weight", "emb.hot_mask"
    }  # fmt: skip
    assert tiered.bytes == want
    # a plan with the tiered table is estimated with it
    plan = space.project(Plan(layers={"emb": tiered.layer_plan, "fc1": LayerPlan(bits=8)}))
    base = space.project(Plan(layers={"emb": plain2.layer_plan, "fc1": LayerPlan(bits=8)}))
    est, est2 = sens.estimate(plan), sens.estimate(base)
    assert est is not None and est2 is not None and est - est2 == tiered.bytes - plain2.bytes
    again = sensitivity(task, space, examples=16)
    assert again.key == sens.key and again.units == sens.units  # deterministic


def test_hand_plans_add_tiered_embeddings_only_when_offered() -> None:
    task = _task()
    plain = _space(task)
    assert hand_plans(plain) == hand_plans(plain, HAND)
    assert not any(lp.hot_rows for p in hand_plans(plain) for lp in p.layers.values())
    space = _space(task, **TIERED)
    plans = hand_plans(space)
    tiered = [p for p in plans if p.layers["emb"].hot_rows]
    assert plans[: len(hand_plans(space, HAND))] == hand_plans(space, HAND)
    assert len(tiered) == 2  # Linear 4-bit g64 and g128 both project onto 4-bit g16 here
    for p in tiered:
        e = p.layers["emb"]
        assert (e.bits, e.group, e.hot_rows, e.hot_bits) == (2, 16, 0.1, 4)
        assert p.layers["pos"].hot_rows == 0 and p.layers["fc1"].hot_rows == 0
        assert space.validate(p) is p
    assert {p.layers["fc1"].bits for p in tiered} == {4, 8}


def test_sampled_plans_keep_tiers_valid_and_on_embeddings() -> None:
    from autocompress._zoo import ZOO

    pytest.importorskip("transformers")
    model = ZOO["bert"].build()
    knobs = Knobs(hot_rows=(0.0, 0.2), hot_bits=(4, 8), bits=(2, 3, 4, 8), groups=(0, 32))
    space = CompressionSpace.from_model(model, knobs, group_by="role")
    offered = {r["layer"] for r in space.describe() if "hot rows" in r["knobs"].split(",")}
    assert offered and all(space.layer(n).kind == "Embedding" for n in offered)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = 0
    for _ in range(40):
        trial = study.ask()
        plan = space.suggest(trial)
        study.tell(trial, 0.0)
        assert space.validate(plan) is plan
        for name, lp in plan.layers.items():
            if lp.hot_rows:
                seen += 1
                assert name in offered and 0 < lp.hot_rows <= 0.2
                assert lp.hot_bits in (4, 8) and lp.hot_bits > lp.bits and lp.scheme == "uniform"
            else:
                assert lp.hot_bits == 8
        assert space.project(plan) == plan
    assert seen > 0
    # projection snaps a hand-written tier onto the space, or drops it when it cannot hold
    word = next(n for n in sorted(offered) if n.endswith("word_embeddings"))
    snap = space.project(Plan(layers={word: LayerPlan(bits=3, hot_rows=0.13, hot_bits=5)}))
    assert (snap.layers[word].hot_rows, snap.layers[word].hot_bits) == (0.15, 4)
    wide = space.project(Plan(layers={word: LayerPlan(bits=8, hot_rows=0.1, hot_bits=16)}))
    assert (wide.layers[word].hot_rows, wide.layers[word].hot_bits) == (0.0, 8)


def test_tpe_samples_three_hot_widths_without_a_dynamic_choice() -> None:
    """TPE refuses a categorical whose choices change between trials: the hot width is drawn
    from the whole fixed list, then lifted above the table's bits."""
    task = _task()
    space = _space(task, bits=(2, 4, 8), groups=(0,), hot_rows=(0.0, 0.2), hot_bits=(4, 6, 8))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(n_startup_trials=5, seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        plan = space.suggest(trial)
        for lp in plan.layers.values():
            if lp.hot_rows:
                assert lp.hot_bits > lp.bits
                seen.add((lp.bits, lp.hot_bits))
        study.tell(trial, 0.0)
    assert len(seen) >= 2
    assert LayerPlan(bits=4, hot_bits=6) == LayerPlan(bits=4)  # does nothing without hot_rows
