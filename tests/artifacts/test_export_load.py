from __future__ import annotations

import copy
import json
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import autocompress.artifacts._export as export_mod
from autocompress.artifacts import (
    Artifact,
    artifact_size,
    export,
    inspect_artifact,
    load,
    write_metrics,
)
from autocompress.artifacts._io import manifest_bytes
from autocompress.compress._meta import QuantRecord, fp16_exact, quant_records, set_quant_records
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import LayerPlan, Plan

DEPLOY = ("weights.safetensors", "plan.json", "manifest.json")


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (12, 20, 16, 5), bn: bool = False) -> None:
        super().__init__()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
            setattr(self, f"fc{i}", nn.Linear(a, b))
        self.n = len(sizes) - 1
        self.bn = nn.BatchNorm1d(sizes[1]) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n + 1):
            x = getattr(self, f"fc{i}")(x)
            if i == 1 and self.bn is not None:
                x = self.bn(x)
            x = torch.relu(x) if i < self.n else x
        return x


def bake_layer(lin: nn.Linear, sparsity: float, bits: int, scheme: str) -> QuantRecord | None:
    """Bake one layer the way the engine does (see autocompress.compress._meta)."""
    w = lin.weight.detach().clone()
    k = int(sparsity * w.numel())
    if k:
        w = w * (w.abs() > w.abs().flatten().kthvalue(k).values)  # exact zeros (maybe -0.0)
    rec: QuantRecord | None = None
    if scheme == "uniform":
        qmax = max(1, 2 ** (bits - 1) - 1)
        scale = fp16_exact((w.abs().amax(dim=1) / qmax).clamp(min=2.0**-14))
        w = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax) * scale[:, None]
        rec = QuantRecord(bits, "uniform", scale=scale)
    elif scheme == "codebook":
        nz = w[w != 0]
        lo, hi = (float(nz.min()), float(nz.max())) if nz.numel() else (0.0, 0.0)
        cb = torch.cat([torch.zeros(1), fp16_exact(torch.linspace(lo, hi, 2**bits - 1))])
        code = torch.argmin((w.reshape(-1, 1) - cb[None, 1:]).abs(), dim=1) + 1
        w = cb[code * (w.reshape(-1) != 0)].reshape(w.shape)
        rec = QuantRecord(bits, "codebook", codebook=cb)
    elif scheme == "fp16":
        w, rec = fp16_exact(w), QuantRecord(16, "fp16")
    lin.weight.data = w
    if rec is not None:
        lin.bias.data = fp16_exact(lin.bias.data)
    return rec


def bake(model: nn.Module, knobs: dict[str, tuple[float, int, str]]) -> nn.Module:
    records = {}
    for name, (sparsity, bits, scheme) in knobs.items():
        rec = bake_layer(model.get_submodule(name), sparsity, bits, scheme)
        if rec is not None:
            records[f"{name}.weight"] = rec
    set_quant_records(model, records)
    return model.eval()


def plan_of(knobs: dict[str, tuple[float, int, str]]) -> Plan:
    layers = {}
    for name, (sp, bits, scheme) in knobs.items():
        b = {"fp16": 16, "none": 32}.get(scheme, bits)
        layers[name] = LayerPlan(
            sparsity=sp, bits=b, scheme="codebook" if scheme == "codebook" else "uniform"
        )
    return Plan(layers=layers)


def assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    ra, rb = quant_records(a), quant_records(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert (ra[k].bits, ra[k].scheme) == (rb[k].bits, rb[k].scheme)
        for f in ("scale", "codebook"):
            va, vb = getattr(ra[k], f), getattr(rb[k], f)
            assert (va is None and vb is None) or torch.equal(va, vb)


KNOBS = {"fc1": (0.9, 4, "uniform"), "fc2": (0.5, 3, "codebook"), "fc3": (0.3, 16, "fp16")}


def make_model() -> nn.Module:
    model = MLP(bn=True)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.num_batches_tracked.fill_(7)
    return bake(model, KNOBS)


def test_round_trip_is_exact_and_reexport_identical(tmp_path: Path) -> None:
    model, x = make_model(), torch.randn(8, 12)
    art = export(model, plan_of(KNOBS), tmp_path / "a", task_spec="pkg.mod:fn")
    assert isinstance(art, Artifact) and art.task_spec == "pkg.mod:fn"
    assert art.size_bytes == sum((tmp_path / "a" / n).stat().st_size for n in DEPLOY)
    loaded = load(art.path, model=MLP(bn=True))
    assert not loaded.training
    assert_same_model(model, loaded, x)
    again = export(loaded, plan_of(KNOBS), tmp_path / "b", task_spec="pkg.mod:fn")
    for name in DEPLOY:
        assert (art.path / name).read_bytes() == (again.path / name).read_bytes(), name
    kinds = {t["name"]: t["kind"] for t in inspect_artifact(art.path)["tensors"]}
    assert kinds["fc1.weight"] == "u4" and kinds["fc2.weight"] == "c3"
    assert kinds["fc3.weight"] == "h16" and kinds["fc3.bias"] == "f16"
    assert kinds["bn.running_mean"] == "f32" and kinds["bn.num_batches_tracked"] == "int64"


def test_weights_file_is_standard_safetensors(tmp_path: Path) -> None:
    art = export(make_model(), plan_of(KNOBS), tmp_path / "a")
    with safe_open(art.path / "weights.safetensors", framework="numpy") as f:
        assert list(f.keys()) == ["blob"]
        meta = f.metadata()
        assert meta["format"] == "autocompress-weights/2"
        assert meta["layout"].startswith("fc1.weight 20,12 u4 ")
        assert f.get_tensor("blob").dtype.name == "uint8"


layer_knob = st.tuples(
    st.sampled_from([0.0, 0.2, 0.5, 0.9, 0.99]),
    st.integers(2, 8),
    st.sampled_from(["uniform", "codebook", "fp16", "none"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(layer_knob, layer_knob, layer_knob), st.integers(0, 2**16))
def test_round_trip_property(knobs: tuple, seed: int) -> None:
    torch.manual_seed(seed)
    named = dict(zip(("fc1", "fc2", "fc3"), knobs, strict=True))
    model, x = bake(MLP(), named), torch.randn(4, 12)
    with tempfile.TemporaryDirectory() as tmp:
        art = export(model, plan_of(named), Path(tmp) / "a")
        loaded = load(art.path, model=MLP())
        assert_same_model(model, loaded, x)
        again = export(loaded, plan_of(named), Path(tmp) / "b")
        assert (art.path / "weights.safetensors").read_bytes() == (
            again.path / "weights.safetensors"
        ).read_bytes()


def gaussian_mlp() -> MLP:
    """64-300-100-10 with bell-shaped weights like a trained net (std 1/sqrt(fan_in))."""
    torch.manual_seed(0)
    m = MLP((64, 300, 100, 10))
    for i in (1, 2, 3):
        lin = getattr(m, f"fc{i}")
        lin.weight.data = torch.randn_like(lin.weight) / lin.in_features**0.5
        lin.bias.data = 0.05 * torch.randn_like(lin.bias)
    return m


def test_size_ratios_on_lenet_300_100(tmp_path: Path) -> None:
    names = ["fc1", "fc2", "fc3"]
    base = gaussian_mlp()
    fp32 = export(base, Plan(), tmp_path / "fp32").size_bytes
    q4 = bake(copy.deepcopy(base), {n: (0.9, 4, "uniform") for n in names})
    q8 = bake(copy.deepcopy(base), {n: (0.0, 8, "uniform") for n in names})
    s4 = export(q4, Plan.uniform(names, sparsity=0.9, bits=4), tmp_path / "q4").size_bytes
    s8 = export(q8, Plan.uniform(names, bits=8), tmp_path / "q8").size_bytes
    raw = 50_610 * 4
    print(
        f"\n64-300-100-10 (50,610 params, raw fp32 {raw} B): fp32 artifact {fp32} B; "
        f"4-bit+90% sparse {s4} B = {fp32 / s4:.1f}x ({raw / s4:.1f}x raw); "
        f"8-bit dense {s8} B = {fp32 / s8:.2f}x ({raw / s8:.2f}x raw)"
    )
    assert fp32 / s4 >= 18
    assert fp32 / s8 >= 3.6
    layout = {t["name"]: t for t in inspect_artifact(tmp_path / "q4")["tensors"]}
    assert layout["fc2.weight"]["encoding"].startswith("r")  # relative index beats bitmask


def test_metrics_are_written_but_not_counted(tmp_path: Path) -> None:
    model = make_model()
    plain = export(model, plan_of(KNOBS), tmp_path / "a")
    with_m = export(model, plan_of(KNOBS), tmp_path / "b", metrics={"accuracy": 0.5})
    assert with_m.size_bytes == plain.size_bytes == artifact_size(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == {"accuracy": 0.5}
    write_metrics(tmp_path / "a", {"size": torch.tensor(3).item()})
    assert Artifact.open(tmp_path / "a").files["metrics.json"] > 0
    export(model, plan_of(KNOBS), tmp_path / "b")  # re-export drops stale metrics
    assert not (tmp_path / "b" / "metrics.json").exists()


def test_overwrite_existing_artifact(tmp_path: Path) -> None:
    first, second = make_model(), make_model()
    export(first, plan_of(KNOBS), tmp_path / "a")
    export(second, plan_of(KNOBS), tmp_path / "a")
    assert_same_model(second, load(tmp_path / "a", model=MLP(bn=True)), torch.randn(3, 12))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(DEPLOY)


def _fail_on_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod.atomic_write

    def flaky(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(export_mod, "atomic_write", flaky)


def test_interrupted_export_leaves_nothing_valid(tmp_path: Path, monkeypatch) -> None:
    export(make_model(), plan_of(KNOBS), tmp_path / "old")
    _fail_on_manifest(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        export(make_model(), plan_of(KNOBS), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # temp dir cleaned up
    with pytest.raises(OSError, match="disk full"):
        export(make_model(), plan_of(KNOBS), tmp_path / "old")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(tmp_path / "old", model=MLP(bn=True))


def _resign(path: Path, weights: bytes) -> None:
    """Rewrite weights with a matching manifest (a tamperer who also fixes the hashes)."""
    plan = (path / "plan.json").read_bytes()
    (path / "weights.safetensors").write_bytes(weights)
    files = {"weights.safetensors": weights, "plan.json": plan}
    (path / "manifest.json").write_bytes(manifest_bytes(files, None))


def _edit_layout(path: Path, old: str, new: str) -> None:
    data = (path / "weights.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["layout"] = header["__metadata__"]["layout"].replace(old, new, 1)
    h = json.dumps(header, separators=(",", ":")).encode()
    _resign(path, len(h).to_bytes(8, "little") + h + data[8 + n :])


def _flip(p: Path) -> None:
    d = bytearray((p / "weights.safetensors").read_bytes())
    d[len(d) // 2] ^= 0xFF
    (p / "weights.safetensors").write_bytes(bytes(d))


def _edit_manifest(p: Path, **changes: object) -> None:
    m = json.loads((p / "manifest.json").read_text())
    m.update(changes)
    (p / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "flipped byte": (_flip, "weights.safetensors fails its sha256 check"),
    "truncated": (
        lambda p: (p / "weights.safetensors").write_bytes(
            (p / "weights.safetensors").read_bytes()[:-10]
        ),
        "weights.safetensors has",
    ),
    "plan deleted": (lambda p: (p / "plan.json").unlink(), "plan.json is missing"),
    "unknown field": (lambda p: _edit_manifest(p, extra=1), "must hold exactly"),
    "newer version": (lambda p: _edit_manifest(p, version=2), "format version 2"),
    "manifest garbage": (
        lambda p: (p / "manifest.json").write_bytes(b"{nope"),
        "not valid JSON",
    ),
    "absurd shape": (
        lambda p: _edit_layout(p, "fc1.weight 20,12 ", "fc1.weight 65536,65536 "),
        "absurd shape",
    ),
    "shape vs blob": (
        lambda p: _edit_layout(p, "fc3.weight 5,16 h16 d n 160", "fc3.weight 5,17 h16 d n 160"),
        "layout implies",
    ),
    "unknown kind": (lambda p: _edit_layout(p, " u4 ", " u99 "), "unknown kind"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_artifacts_are_refused(tmp_path: Path, case: str) -> None:
    knobs = {**KNOBS, "fc3": (0.0, 16, "fp16")}  # dense fp16 fc3: a predictable layout entry
    art = export(bake(MLP(bn=True), knobs), plan_of(knobs), tmp_path / "a")
    corrupt, message = CORRUPTIONS[case]
    corrupt(art.path)
    with pytest.raises(ArtifactError, match=message) as err:
        load(art.path, model=MLP(bn=True))
    assert "\n" not in str(err.value) and (
        "re-export" in str(err.value) or "upgrade" in str(err.value)
    )


def test_temp_leftover_without_manifest_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    (d / ".weights.safetensors.123.abcd.tmp").write_bytes(b"partial")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(d, model=MLP())
    with pytest.raises(ArtifactError, match="no artifact directory"):
        load(tmp_path / "nothing", model=MLP())


def test_wrong_architecture_names_the_tensor(tmp_path: Path) -> None:
    art = export(bake(MLP(), KNOBS), plan_of(KNOBS), tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"tensor 'fc1.weight' has shape \[20, 12\]"):
        load(art.path, model=MLP((12, 21, 16, 5)))
    with pytest.raises(ArtifactError, match="artifact has no tensor 'bn.weight'"):
        load(art.path, model=MLP(bn=True))


def test_unbaked_or_inconsistent_models_are_refused(tmp_path: Path) -> None:
    model = bake(MLP(), KNOBS)
    model.fc1.weight.data[0, 0] += 1e-3
    with pytest.raises(ArtifactError, match="'fc1.weight' holds values that are not q"):
        export(model, plan_of(KNOBS), tmp_path / "a")
    set_quant_records(model, {"nope.weight": QuantRecord(16, "fp16")})
    with pytest.raises(ArtifactError, match="nope.weight"):
        export(model, plan_of(KNOBS), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_load_from_task_and_structural_plan(tmp_path: Path, monkeypatch) -> None:
    small = bake(MLP((12, 10, 16, 5)), KNOBS)
    plan = plan_of(KNOBS).replace(width=0.5)
    art = export(small, plan, tmp_path / "a", task_spec="fake-task")
    calls = []
    example = torch.ones(2, 12)

    def restructure(model: nn.Module, p: Plan, x: torch.Tensor) -> nn.Module:
        calls.append((type(model), p, x))
        return MLP((12, 10, 16, 5))

    task = types.SimpleNamespace(build_model=lambda: MLP(), example_input=lambda: example)
    fake_tasks = types.ModuleType("autocompress.tasks")
    fake_tasks.get_task = lambda spec: task if spec == "fake-task" else None
    fake_tasks.task_names = lambda: ["fake-task"]
    monkeypatch.setitem(sys.modules, "autocompress.tasks", fake_tasks)
    import autocompress.compress as cc

    monkeypatch.setattr(cc, "restructure", restructure, raising=False)
    loaded = load(art.path)
    assert calls == [(MLP, plan, example)]
    assert_same_model(small, loaded, torch.randn(3, 12))
    load(art.path, model=MLP(), example_input=example)
    assert len(calls) == 2
    load(art.path, model=MLP((12, 10, 16, 5)))  # the compressed architecture itself: no restructure
    assert len(calls) == 2


def test_real_engine_round_trip(tmp_path: Path) -> None:
    from autocompress import compress

    if not hasattr(compress, "apply"):
        pytest.skip("autocompress.compress.apply is not available yet")
    base = MLP((12, 24, 16, 5))
    plan = Plan(
        layers={
            "fc1": LayerPlan(sparsity=0.5, bits=4, rank_ratio=0.5),
            "fc2": LayerPlan(sparsity=0.8, bits=3, scheme="codebook"),
            "fc3": LayerPlan(bits=16),
        }
    )
    model = compress.apply(base, plan)
    art = export(model, plan, tmp_path / "a")
    x = torch.randn(4, 12)
    loaded = load(art.path, model=base, example_input=x)
    assert_same_model(model, loaded, x)


def test_uniform_scales_on_dim_1_round_trip(tmp_path) -> None:
    """HF Conv1D keeps its weight (in, out): its uniform scales follow dim 1 (kind u{b}.1)."""
    net = torch.nn.Linear(6, 4, bias=False)
    scale = torch.tensor([0.5, 0.25, 1.0, 2.0, 0.125, 4.0])  # one per column (dim 1)
    q = torch.randint(-7, 8, (4, 6)).float()
    with torch.no_grad():
        net.weight.copy_(q * scale)
    set_quant_records(net, {"weight": QuantRecord(bits=4, scheme="uniform", scale=scale, axis=1)})
    art = export(net, Plan(), tmp_path / "a")
    back = load(art.path, model=torch.nn.Linear(6, 4, bias=False))
    assert torch.equal(back.weight, net.weight)
    rec = quant_records(back)["weight"]
    assert rec.axis == 1 and torch.equal(rec.scale, scale)
