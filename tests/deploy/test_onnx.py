"""ONNX deployment form: fp32 and int8 round trips, dynamic batch, corrupt files."""

from __future__ import annotations

import sys

import pytest
import torch
from onnx import load_from_string, numpy_helper
from torch import nn

from autocompress.compress import apply, quant_records
from autocompress.deploy import OnnxModel, deploy_forms, export_fp32, load_onnx, to_onnx
from autocompress.errors import ArtifactError, AutocompressError
from autocompress.spaces import Plan
from autocompress.spaces._discover import discover_layers
from autocompress.spaces._plan import FinetuneSettings
from autocompress.tasks import Task, get_task

TASKS = ["digits-mlp", "mnist1d-cnn", "mnist1d-transformer"]
# int8 tolerances against the fake-quantized torch model on the val split (measured: top-1
# agreement 100% / 99.7% / 98.2%, max |logit diff| 0.4% / 0.3% / 4.2% of the largest logit).
MIN_AGREEMENT = {"digits-mlp": 0.98, "mnist1d-cnn": 0.98, "mnist1d-transformer": 0.97}
MAX_REL_LOGIT_DIFF = 0.06
MAX_ACCURACY_DROP = 0.01


@pytest.fixture(scope="module", params=TASKS)
def compressed(request: pytest.FixtureRequest) -> tuple[Task, nn.Module, dict[str, bytes]]:
    """A task, its teacher compressed 50% sparse / 8-bit with a 2-epoch fine-tune, its forms."""
    torch.manual_seed(0)
    task = get_task(request.param)
    teacher = task.teacher()
    layers = [info.name for info in discover_layers(teacher)[0]]
    plan = Plan.uniform(layers, sparsity=0.5, bits=8, finetune=FinetuneSettings(epochs=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust on a busy machine
    try:
        model = apply(teacher, plan, task)
    finally:
        torch.set_num_threads(threads)
    return task, model, deploy_forms(model, task.example_input())


def test_fp32_matches_torch(compressed) -> None:
    task, model, forms = compressed
    x = task.data("val").tensors[0]
    om = OnnxModel(forms["fp32"])
    assert om.form == "fp32"
    with torch.no_grad():
        ref = model(x)
    assert (om(x) - ref).abs().max() <= 1e-4
    assert task.evaluate(om, "val") == task.evaluate(model, "val")  # Task scores an OnnxModel


def test_int8_within_tolerance(compressed) -> None:
    task, model, forms = compressed
    assert "int8" in forms  # every task has 8-bit Linear layers
    x = task.data("val").tensors[0]
    om = OnnxModel(forms["int8"])
    assert om.form == "int8"
    with torch.no_grad():
        ref = model(x)
    out = om(x)
    agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
    assert agreement >= MIN_AGREEMENT[task.name]
    assert (out - ref).abs().max() <= MAX_REL_LOGIT_DIFF * ref.abs().max()
    drop = task.evaluate(model, "val")["accuracy"] - task.evaluate(om, "val")["accuracy"]
    assert drop <= MAX_ACCURACY_DROP


def test_dynamic_batch(compressed) -> None:
    task, model, forms = compressed  # exported from a batch of 2
    for form in ("fp32", "int8"):
        om = OnnxModel(forms[form])
        for batch in (1, 37):
            x = task.data("val").tensors[0][:batch]
            out = om(x.numpy())  # numpy in, torch out
            with torch.no_grad():
                assert isinstance(out, torch.Tensor) and out.shape == model(x).shape


def test_int8_keeps_the_exact_codes(digits_mlp: Task) -> None:
    """4-bit codes survive int8 exactly: ONNX Runtime gets the per-channel scales."""
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=4, finetune=FinetuneSettings(epochs=0))
    model = apply(digits_mlp.teacher(), plan)
    proto = load_from_string(deploy_forms(model, digits_mlp.example_input())["int8"])
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    codes = {k: v for k, v in inits.items() if k.endswith("_quantized")}
    assert len(codes) == 3
    for name, q in codes.items():
        assert q.dtype.name == "int8" and abs(q).max() <= 7  # 4-bit codes, not re-gridded
        scale = inits[name.removesuffix("_quantized") + "_scale"]
        weights = [getattr(model, f).weight.detach().numpy().T for f in ("fc1", "fc2", "fc3")]
        assert any(w.shape == q.shape and (q * scale == w).all() for w in weights)


def test_only_low_bit_linear_layers_become_int8(digits_mlp: Task) -> None:
    plan = Plan.uniform(["fc1"], bits=8, finetune=FinetuneSettings(epochs=0))
    model = apply(digits_mlp.teacher(), plan)
    assert set(quant_records(model)) == {"fc1.weight"}
    proto = load_from_string(deploy_forms(model, digits_mlp.example_input())["int8"])
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") == 1


def test_to_onnx_writes_a_loadable_file(compressed, tmp_path) -> None:
    task, model, _ = compressed
    path = to_onnx(model, task.example_input(2), tmp_path / "m.onnx", int8=True)
    x = task.data("val").tensors[0][:5]
    om = load_onnx(path)
    assert om.form == "int8" and om(x).shape == (5, 10)


def test_uncompressed_model_stays_fp32(tmp_path) -> None:
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    assert list(deploy_forms(net, torch.randn(3, 6))) == ["fp32"]
    path = to_onnx(net, torch.randn(3, 6), tmp_path / "n.onnx", int8=True)
    assert load_onnx(path).form == "fp32"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_auto_writes_one_of_the_forms(digits_mlp: Task, tmp_path) -> None:
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=8, finetune=FinetuneSettings(epochs=0))
    model = apply(digits_mlp.teacher(), plan)
    path = to_onnx(model, digits_mlp.example_input(), tmp_path / "a.onnx", batch_size=64)
    # which one is a timing matter; fp32 is 4x the 8-bit forms' file, so never shipped
    assert load_onnx(path, threads=1).form in ("lowbit", "int8")


def test_dynamo_exporter_gives_the_same_graph_outputs() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    proto = export_fp32(net, torch.randn(2, 4), exporter="dynamo")
    x = torch.randn(9, 4)
    assert (OnnxModel(proto.SerializeToString())(x) - net(x)).abs().max() <= 1e-5


class BatchDependent(nn.Module):
    """Python control flow on the batch size: a trace would silently bake in one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] > 2 else x


def test_silently_wrong_trace_is_refused() -> None:
    with pytest.raises(AutocompressError, match="cannot be exported to ONNX"):
        export_fp32(BatchDependent(), torch.randn(2, 3))


def test_missing_and_corrupt_files_raise_artifact_error(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="no ONNX file"):
        load_onnx(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01not an onnx model" * 10)
    with pytest.raises(ArtifactError, match="not a loadable ONNX model.*re-export"):
        load_onnx(garbage)
    good = to_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "good.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ArtifactError):
        load_onnx(truncated)


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(AutocompressError, match="int8="):
        to_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "x.onnx", int8="yes")
    with pytest.raises(AutocompressError, match="does not exist"):
        to_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "no" / "x.onnx")
    with pytest.raises(AutocompressError, match="cannot be trained"):
        OnnxModel(to_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "y.onnx")).train()
    with pytest.raises(AutocompressError, match="threads"):
        load_onnx(tmp_path / "y.onnx", threads=0)


def test_missing_onnxruntime_names_the_module_and_the_fix(tmp_path, monkeypatch) -> None:
    """Not "cannot be exported to ONNX": a ModuleNotFoundError (so callers that catch
    ImportError see it), one line, with the install command; nothing is written."""
    path = tmp_path / "m.onnx"
    good = to_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "good.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    calls = [
        lambda: to_onnx(nn.Linear(4, 2), torch.randn(2, 4), path),
        lambda: export_fp32(nn.Linear(4, 2), torch.randn(2, 4)),
        lambda: load_onnx(good),
    ]
    for call in calls:
        with pytest.raises(ModuleNotFoundError) as info:
            call()
        msg = str(info.value)
        assert info.value.name == "onnxruntime" and not isinstance(info.value, AutocompressError)
        assert "'onnxruntime', which is not installed: pip install onnxruntime" in msg
        assert "\n" not in msg and "cannot be exported" not in msg
    assert not path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]
