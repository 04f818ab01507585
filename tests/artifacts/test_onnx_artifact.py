"""model.onnx in artifacts: listed and verified, not counted, loaded with runtime="onnxruntime"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.artifacts import Artifact, artifact_size, export, inspect_artifact, load
from autocompress.artifacts._load import INT8_REL, ONNX_ATOL
from autocompress.compress import apply
from autocompress.deploy import OnnxModel
from autocompress.errors import ArtifactError
from autocompress.spaces import Plan
from autocompress.spaces._discover import discover_layers
from autocompress.spaces._plan import FinetuneSettings
from autocompress.tasks import Task, get_task

ONNX = "model.onnx"
MIN_AGREEMENT = 0.97


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_onnx_is_listed_hashed_and_not_counted(tmp_path: Path) -> None:
    net, x = small_net(), torch.randn(4, 6)
    plain = export(net, Plan(), tmp_path / "plain")
    art = export(net, Plan(), tmp_path / "onnx", onnx_example=x)
    manifest = json.loads((art.path / "manifest.json").read_text())
    entry = manifest["files"][ONNX]
    assert entry["bytes"] == (art.path / ONNX).stat().st_size > 0
    assert len(entry["sha256"]) == 64 and manifest["version"] == 1
    deploy = ("weights.safetensors", "plan.json", "manifest.json")
    assert art.size_bytes == sum((art.path / n).stat().st_size for n in deploy)
    assert art.size_bytes == artifact_size(art.path) == manifest["size_bytes"]
    # only the manifest's own listing line differs from the artifact without model.onnx
    grown = art.files["manifest.json"] - plain.files["manifest.json"]
    assert art.size_bytes - plain.size_bytes == grown < 120
    assert art.files[ONNX] == entry["bytes"] and art.onnx_path == art.path / ONNX
    assert plain.onnx_path is None and ONNX not in plain.files
    assert inspect_artifact(art.path)["files"][ONNX] == entry["bytes"]
    assert Artifact.open(art.path) == art


def test_manifest_without_onnx_is_unchanged(tmp_path: Path) -> None:
    """Old (pre-ONNX) manifests are exactly what export writes without onnx_example."""
    art = export(small_net(), Plan(), tmp_path / "a")
    m = json.loads((art.path / "manifest.json").read_text())
    assert sorted(m["files"]) == ["plan.json", "weights.safetensors"]
    assert sorted(m) == ["files", "format", "size_bytes", "task_spec", "version"]
    assert isinstance(load(art.path, model=small_net()), nn.Module)


def test_load_onnxruntime_matches_torch_fp32(tmp_path: Path) -> None:
    net, x = small_net(), torch.randn(50, 6)
    art = export(net, Plan(), tmp_path / "a", onnx_example=x[:4])
    om = load(art.path, runtime="onnxruntime")
    assert isinstance(om, OnnxModel) and om.form == "fp32" and om.threads == 1
    ref = load(art.path, model=small_net(), runtime="torch")
    with torch.no_grad():
        assert (om(x) - ref(x)).abs().max() <= ONNX_ATOL
    assert load(art.path, runtime="onnxruntime", threads=2).threads == 2


@pytest.fixture(scope="module", params=["digits-mlp", "mnist1d-cnn"])
def compressed(request: pytest.FixtureRequest) -> tuple[Task, nn.Module, Plan]:
    """A real task's teacher, half width, 50% sparse, 8-bit, 1 fine-tune epoch."""
    task = get_task(request.param)
    teacher = task.teacher()
    layers = [i.name for i in discover_layers(teacher)[0]]
    plan = Plan.uniform(
        layers, sparsity=0.5, bits=8, width=0.5, finetune=FinetuneSettings(epochs=1)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = apply(teacher, plan, task)
    finally:
        torch.set_num_threads(threads)
    return task, model, plan


def _check_tolerance(task: Task, path: Path) -> str:
    om = load(path, runtime="onnxruntime")
    ref = load(path, model=task.build_model(), example_input=task.example_input())
    x = task.data("val").tensors[0]
    with torch.no_grad():
        y, want = om(x), ref(x)
    diff = float((y - want).abs().max())
    if om.form == "fp32":
        assert diff <= ONNX_ATOL
    else:
        assert diff <= INT8_REL * float(want.abs().max())
        agree = float((y.argmax(1) == want.argmax(1)).float().mean())
        assert agree >= MIN_AGREEMENT
    return om.form


def test_real_tasks_within_the_stated_tolerance(compressed, tmp_path: Path) -> None:
    task, model, plan = compressed
    art = export(
        model, plan, tmp_path / "a", task_spec=task.spec, onnx_example=task.example_input()
    )
    _check_tolerance(task, art.path)


def test_int8_form_within_the_stated_tolerance(compressed, tmp_path: Path, monkeypatch) -> None:
    task, model, plan = compressed
    import autocompress.deploy as deploy_pkg

    real = deploy_pkg.onnx_form  # int8="auto" keeps exact forms without calibration data
    monkeypatch.setattr(deploy_pkg, "onnx_form", lambda m, x, **k: real(m, x, int8=True))
    art = export(
        model, plan, tmp_path / "a", task_spec=task.spec, onnx_example=task.example_input()
    )
    assert _check_tolerance(task, art.path) == "int8"


def test_onnx_tampering_is_detected(tmp_path: Path) -> None:
    net, x = small_net(), torch.randn(4, 6)
    art = export(net, Plan(), tmp_path / "a", onnx_example=x)
    p = art.path / ONNX
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    for runtime in ("onnxruntime", "torch"):
        with pytest.raises(ArtifactError, match="model.onnx fails its sha256 check"):
            load(art.path, model=small_net(), runtime=runtime)
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="model.onnx has .* bytes, manifest says"):
        load(art.path, runtime="onnxruntime")
    p.unlink()
    with pytest.raises(ArtifactError, match="model.onnx is missing"):
        load(art.path, runtime="onnxruntime")
    with pytest.raises(ArtifactError, match="model.onnx is missing"):
        Artifact.open(art.path)


def test_manifest_listing_an_unknown_file_is_refused(tmp_path: Path) -> None:
    art = export(small_net(), Plan(), tmp_path / "a")
    mpath = art.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["extra.bin"] = m["files"]["plan.json"]
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"optionally model.onnx"):
        load(art.path, model=small_net())


def test_artifact_without_onnx_says_how_to_get_one(tmp_path: Path) -> None:
    art = export(small_net(), Plan(), tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"has no model.onnx: re-export it with .*onnx_example"):
        load(art.path, runtime="onnxruntime")
    with pytest.raises(ArtifactError, match=r"runtime='tensorrt' is unknown"):
        load(art.path, runtime="tensorrt")


def test_reexport_without_onnx_removes_the_stale_file(tmp_path: Path) -> None:
    net, x = small_net(), torch.randn(4, 6)
    path = tmp_path / "a"
    export(net, Plan(), path, onnx_example=x)
    assert (path / ONNX).is_file()
    art = export(net, Plan(), path)
    assert not (path / ONNX).exists() and art.onnx_path is None
    assert isinstance(load(path, model=small_net()), nn.Module)
