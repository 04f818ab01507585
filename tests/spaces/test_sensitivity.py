"""The sensitivity pass: one unit at a time, real bytes, a fragile layer ranked first, cached."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from autocompress import PlanError
from autocompress.spaces import CompressionSpace, Knobs, sensitivity
from autocompress.spaces._sensitivity import greedy_plan
from autocompress.tasks import Task


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).mean(dim=1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _task(fragile: bool = False) -> Task:
    torch.manual_seed(0)
    model = Toy().eval()
    if fragile:  # fc2 reads a dead unit through a huge weight: its quantization grid collapses
        with torch.no_grad():
            model.fc1.weight[0] = 0.0
            model.fc1.bias[0] = -10.0
            model.fc2.weight[:, 0] = 1000.0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (96, 6), generator=g), torch.randint(0, 4, (96,), generator=g)
    return Task.from_module(model, (x[:64], y[:64]), (x[64:], y[64:]), (x[64:], y[64:]))


def _space(task: Task, **knobs: object) -> CompressionSpace:
    return CompressionSpace.from_model(task.teacher(), Knobs(**{"sparsity": None, **knobs}))


def test_fragile_layer_ranked_most_sensitive() -> None:
    task = _task(fragile=True)
    sens = sensitivity(task, _space(task, bits=(3, 4, 8)), examples=32)
    assert sens.ranking()[0] == "fc2"
    assert sens.ranking(bits=8)[0] == "fc2"
    fc2 = sens.unit("fc2")
    assert min(m.distortion for m in fc2.settings) > max(
        m.distortion for u in sens.units if u.key != "fc2" for m in u.settings
    )


def test_measures_each_setting_with_real_bytes() -> None:
    task = _task()
    space = _space(task, bits=(2, 4, 5, 8, 32))
    sens = sensitivity(task, space, bits=(2, 4, 8), examples=32)
    assert [u.key for u in sens.units] == ["emb", "fc1", "fc2", "head"]
    assert sens.evaluations == 4 * 3 and sens.examples == 32
    for u in sens.units:
        assert [m.knobs["bits"] for m in u.settings] == [8, 4, 2]
        sizes = [m.bytes for m in u.settings]
        assert u.base_bytes > sizes[0] > sizes[1] > sizes[2] > 0
        assert u.keep is not None and u.keep["bits"] == 32  # 32 in the space: may stay fp32
        assert all(m.distortion >= 0 for m in u.settings)
    assert sens.other_bytes > 0  # biases: outside the units, still counted
    assert sens.teacher_bytes == sens.other_bytes + sum(u.base_bytes for u in sens.units)
    default = sensitivity(task, space, examples=8)  # the space's widths among 8/6/4/3
    assert [m.knobs["bits"] for m in default.unit("fc1").settings] == [8, 4]


def test_grouped_space_is_measured_per_group() -> None:
    task = _task()
    space = CompressionSpace.from_model(
        task.teacher(), Knobs(sparsity=None, bits=(4, 8)), groups=[["fc1", "fc2"]]
    )
    sens = sensitivity(task, space, examples=16)
    assert [u.layers for u in sens.units] == [("emb",), ("fc1", "fc2"), ("head",)]
    assert sens.evaluations == 3 * 2


def test_sparsity_levels_when_the_space_has_sparsity() -> None:
    task = _task()
    space = CompressionSpace.from_model(task.teacher(), Knobs(sparsity=(0.0, 0.8), bits=(4, 8)))
    sens = sensitivity(task, space, examples=16)
    knobs = [(m.knobs["bits"], m.knobs["sparsity"]) for m in sens.unit("fc1").settings]
    # levels 0.5, 0.75, 0.9 at the top bit-width; 0.9 is outside the range: snapped to 0.8
    assert knobs == [(8, 0.0), (4, 0.0), (8, 0.5), (8, 0.75), (8, 0.8)]


def test_cache_is_reused_and_keyed_by_the_teacher(tmp_path) -> None:  # noqa: ANN001
    task = _task()
    space = _space(task, bits=(4, 8))
    first = sensitivity(task, space, examples=16, run_dir=tmp_path)
    assert not first.cached and len(list((tmp_path / "sensitivity").glob("*.json"))) == 1
    again = sensitivity(task, space, examples=16, run_dir=tmp_path)
    assert again.cached and again.units == first.units and again.key == first.key
    other = _task(fragile=True)  # same architecture, other weights: measured again
    third = sensitivity(other, _space(other, bits=(4, 8)), examples=16, run_dir=tmp_path)
    assert not third.cached and third.key != first.key
    more = sensitivity(task, space, examples=8, run_dir=tmp_path)  # other settings: new key
    assert not more.cached


def test_greedy_meets_its_byte_budget() -> None:
    task = _task()
    space = _space(task, bits=(2, 3, 4, 6, 8, 32))
    sens = sensitivity(task, space, examples=16)
    smallest = sens.other_bytes + sum(min(m.bytes for m in u.options()) for u in sens.units)
    last = None
    for frac in (0.9, 0.5, 0.3, 0.2, 0.1):
        budget = max(smallest, round(frac * sens.teacher_bytes))
        plan = greedy_plan(sens, space, budget)
        est = sens.estimate(plan)
        assert est is not None and est <= budget
        assert last is None or est <= last
        last = est
    assert sens.estimate(greedy_plan(sens, space, sens.teacher_bytes)) == sens.teacher_bytes


def test_refuses_test_split_and_bad_sizes() -> None:
    task = _task()
    space = _space(task, bits=(4, 8))
    with pytest.raises(PlanError, match="never 'test'"):
        sensitivity(task, space, split="test")
    with pytest.raises(PlanError, match="examples=0"):
        sensitivity(task, space, examples=0)


@pytest.mark.parametrize("zoo", ["lstm", "transformer-encoder", "gpt2"])
def test_in_place_unit_equals_the_engine_on_the_whole_model(zoo: str) -> None:
    from autocompress._zoo import ZOO, zoo_inputs
    from autocompress.compress import apply
    from autocompress.spaces import LayerPlan, Plan
    from autocompress.spaces._sensitivity import _swapped
    from autocompress.tasks._batch import call_model, pick_output

    if ZOO[zoo].hf:
        pytest.importorskip("transformers")
    teacher = ZOO[zoo].build()
    work = ZOO[zoo].build()
    x = zoo_inputs(zoo, 4)
    space = CompressionSpace.from_model(teacher)
    before = {k: v.clone() for k, v in work.state_dict().items()}
    for infos in ([space.layers[0]], space.layers[1:3]):  # tied/param-level layers included
        lp = LayerPlan(bits=3)
        with torch.no_grad(), _swapped(work, teacher, infos, lp) as coded:
            got = pick_output(call_model(work, x))
        full = apply(teacher, Plan(layers={i.name: lp for i in infos}))
        with torch.no_grad():
            want = pick_output(call_model(full, x))
        assert torch.equal(got, want)
        assert set(coded) == {i.tensor for i in infos}
    after = work.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored


def test_group_wise_scales_are_measured_at_low_bits() -> None:
    task = _task()
    space = _space(task, bits=(3, 4, 8), groups=(0, 16, 32))
    sens = sensitivity(task, space, examples=8)
    got = [(m.knobs["bits"], m.knobs["group"]) for m in sens.unit("fc2").settings]
    assert got == [(8, 0), (4, 0), (3, 0), (4, 16), (4, 32), (3, 16), (3, 32)]
    fc2 = {(m.knobs["bits"], m.knobs["group"]): m for m in sens.unit("fc2").settings}
    assert fc2[(4, 16)].bytes > fc2[(4, 0)].bytes  # two fp16 scales per row instead of one
    assert fc2[(4, 32)].bytes == fc2[(4, 0)].bytes  # 32 inputs: one group is the whole row


def test_gptq_unit_equals_the_engine_with_gptq() -> None:
    """With calibration 'gptq', a unit measured in place is what ``compress.apply`` gives for a
    plan compressing that unit alone with ``calibration="gptq"``: GPTQ from the teacher's input
    Hessian for Linear layers, clipped-scale rounding for the embedding."""
    from autocompress.compress import apply
    from autocompress.spaces import FinetuneSettings, LayerPlan, Plan
    from autocompress.spaces._sensitivity import _hessians, _swapped
    from autocompress.tasks._batch import call_model

    task = _task()
    teacher = task.teacher()
    work = Toy()
    work.load_state_dict(teacher.state_dict())
    space = _space(task, bits=(3, 8), calibration=("gptq",))
    hess = _hessians(task, teacher, space.layers)
    assert set(hess) == {"fc1.weight", "fc2.weight", "head.weight"}  # no input for an embedding
    x = task.example_input(16)
    for name in ("emb", "fc2"):
        lp = LayerPlan(bits=3, group=16)
        with torch.no_grad(), _swapped(work, teacher, [space.layer(name)], lp, hess):
            got = call_model(work, x)
        plan = Plan(layers={name: lp}, calibration="gptq", finetune=FinetuneSettings(epochs=0))
        full = apply(teacher, plan, task)
        with torch.no_grad():
            want = call_model(full, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    sens = sensitivity(task, space, examples=16)
    assert sens.unit("fc1").settings[-1].knobs["bits"] == 3
    plain = sensitivity(task, space, examples=16, calibration="none")
    assert plain.key != sens.key
    with pytest.raises(PlanError, match="calibration='awq'"):
        sensitivity(task, space, calibration="awq")


def test_token_embeddings_are_also_measured_at_two_bits() -> None:
    task = _task()
    space = _space(task, bits=(2, 3, 4, 8))
    sens = sensitivity(task, space, examples=8)
    assert [m.knobs["bits"] for m in sens.unit("emb").settings] == [8, 4, 3, 2]
    assert [m.knobs["bits"] for m in sens.unit("fc1").settings] == [8, 4, 3]


def test_hand_plans_near_eight_x_carry_their_groups() -> None:
    from autocompress.spaces._sensitivity import hand_plans

    task = _task()
    space = _space(task, bits=(2, 3, 4, 6, 8), groups=(0, 16, 32))
    plans = hand_plans(space)
    got = [(p.layers["fc1"].bits, p.layers["fc1"].group, p.layers["emb"].bits,
            p.layers["emb"].group) for p in plans]  # fmt: skip
    # groups snap to the space's nearest (128 -> 32, 64 -> 32); 8/6-bit plans keep group 0
    assert got == [(8, 0, 8, 0), (8, 0, 4, 0), (6, 0, 8, 0), (6, 0, 4, 0), (4, 32, 4, 32),
                   (4, 32, 3, 32), (4, 32, 2, 32)]  # fmt: skip


def test_fine_tuned_spaces_open_with_smaller_plans() -> None:
    from autocompress.spaces import FinetuneSettings
    from autocompress.spaces._sensitivity import sensitivity_plans

    task = _task()
    knobs = Knobs(sparsity=None, bits=(2, 3, 4, 6, 8))
    post = CompressionSpace.from_model(task.teacher(), knobs, finetune=FinetuneSettings(epochs=0))
    tuned = CompressionSpace.from_model(task.teacher(), knobs, finetune=FinetuneSettings(epochs=1))
    measured = sensitivity(task, post, examples=16)  # drops on random labels are all 0: use
    units = [replace(u, settings=tuple(replace(m, drop=m.distortion) for m in u.settings))
             for u in measured.units]  # fmt: skip
    sens = replace(measured, units=units)  # drops that grow with the distortion
    small = [min(sens.estimate(p) for p in sensitivity_plans(task, s, 0.002, sens=sens, hand=False))
             for s in (post, tuned)]  # fmt: skip
    assert small[1] < small[0]


def test_calibration_subset_skips_what_gptq_fits() -> None:
    from autocompress.spaces._sensitivity import _calibration

    task = _task()
    x = torch.cat([inputs for inputs, _ in task.batches("train", 64)])
    for skip in (0, 5, 40):
        got = torch.cat([inputs for inputs, _ in _calibration(task, "train", 16, skip)])
        assert torch.equal(got, x[skip : skip + 16])
    tail = torch.cat([inputs for inputs, _ in _calibration(task, "train", 16, 60)])
    assert torch.equal(tail, x[60:])  # what is left after the skip
    short = torch.cat([inputs for inputs, _ in _calibration(task, "train", 16, 500)])
    assert torch.equal(short, x[:16])  # nothing left: the first examples
