"""The teacher artifact cache: exported once, reused by content hash, corrupt entries rebuilt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from autocompress.artifacts import _cache as cache_mod
from autocompress.artifacts import export, load
from autocompress.artifacts._cache import artifact_key, cached_export, teacher_cache_dir
from autocompress.spaces import Plan


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the real exports cached_export runs."""
    calls: list[Path] = []

    def counted(model, plan, path, **kw):  # type: ignore[no-untyped-def]
        calls.append(Path(path))
        return export(model, plan, path, **kw)

    monkeypatch.setattr(cache_mod, "export", counted)
    return calls


def test_miss_then_hit_gives_the_same_artifact(tmp_path: Path, exports: list[Path]) -> None:
    lines: list[str] = []
    model = net()
    a = cached_export(model, None, tmp_path / "run1", cache=tmp_path / "c", progress=lines.append)
    b = cached_export(model, None, tmp_path / "run2", cache=tmp_path / "c", progress=lines.append)
    assert len(exports) == 1
    assert any("exporting" in s for s in lines) and any("reused" in s for s in lines)
    ref = export(model, Plan(), tmp_path / "plain")
    for art in (a, b):
        assert art.size_bytes == ref.size_bytes
        assert (art.path / "weights.safetensors").read_bytes() == (
            ref.path / "weights.safetensors"
        ).read_bytes()
    assert torch.equal(load(b.path, model=net(1))[0].weight, model[0].weight)
    entries = [p for p in (tmp_path / "c").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")


def test_other_weights_or_task_spec_miss(tmp_path: Path, exports: list[Path]) -> None:
    cached_export(net(0), None, tmp_path / "a", cache=tmp_path / "c", progress=None)
    cached_export(net(1), None, tmp_path / "b", cache=tmp_path / "c", progress=None)
    cached_export(net(0), None, tmp_path / "d", task_spec="x", cache=tmp_path / "c", progress=None)
    assert len(exports) == 3
    assert artifact_key(net(0)) != artifact_key(net(0), task_spec="x")
    bigger = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    bigger.load_state_dict(net(0).state_dict())
    assert artifact_key(bigger) != artifact_key(net(0))  # same tensors, other architecture


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_corrupt_entry_is_rebuilt_with_a_warning(
    tmp_path: Path, exports: list[Path], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = net()
    cached_export(model, None, tmp_path / "a", cache=tmp_path / "c", progress=None)
    (entry,) = list((tmp_path / "c").iterdir())
    w = entry / "weights.safetensors"
    data = w.read_bytes()
    w.unlink()  # the run's hard link keeps the old bytes; the cache gets a damaged file
    if damage == "truncate":
        w.write_bytes(data[:-10])
    elif damage == "flip":
        w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        w.write_bytes(data)
        (entry / "manifest.json").write_text("{")
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="autocompress.artifacts._cache"):
        art = cached_export(
            model, None, tmp_path / "b", cache=tmp_path / "c", progress=lines.append
        )
    assert len(exports) == 2
    assert len([r for r in caplog.records if "corrupt" in r.message]) == 1
    assert any(s.startswith("warning:") and "rebuilding" in s for s in lines)
    assert torch.equal(load(art.path, model=net(1))[0].weight, model[0].weight)
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == data  # run copy untouched


def test_killed_export_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(model, plan, path, **kw):  # type: ignore[no-untyped-def]
        export(model, plan, path, **kw)
        raise KeyboardInterrupt  # the process dies after writing, before the rename

    monkeypatch.setattr(cache_mod, "export", killed)
    with pytest.raises(KeyboardInterrupt):
        cached_export(net(), None, tmp_path / "a", cache=tmp_path / "c", progress=None)
    assert [p for p in (tmp_path / "c").iterdir()] == []
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(cache_mod, "export", export)
    art = cached_export(net(), None, tmp_path / "a", cache=tmp_path / "c", progress=None)
    assert art.size_bytes > 0


def test_delivers_into_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "teacher"
    target.mkdir()
    (target / "weights.safetensors").write_bytes(b"half an interrupted export")
    art = cached_export(net(), None, target, cache=tmp_path / "c", progress=None)
    again = cached_export(net(), None, target, cache=tmp_path / "c", progress=None)
    assert art.size_bytes == again.size_bytes
    assert torch.equal(load(target, model=net(1))[0].weight, net()[0].weight)


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    assert teacher_cache_dir() == tmp_path / "teachers" / "artifacts"
    cached_export(net(), None, tmp_path / "run", progress=None)
    assert len(list(teacher_cache_dir().iterdir())) == 1
