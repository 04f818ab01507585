"""export, inspect and size of artifact directories (the format is described in ``__init__``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.artifacts._format import describe, encode_chunks, parse_weights
from autocompress.artifacts._io import (
    DEPLOY_FILES,
    MANIFEST,
    METRICS,
    ONNX,
    OPTIONAL_FILES,
    PLAN,
    WEIGHTS,
    Content,
    atomic_write,
    fsync_dir,
    listing,
    manifest_bytes,
    read_manifest,
    read_verified,
    tmp_name,
)
from autocompress.compress._meta import quant_records
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import Plan


@dataclass(frozen=True)
class Artifact:
    """An exported artifact directory.

    Args:
        path: the directory.
        size_bytes: on-disk bytes a deployment needs: ``weights.safetensors`` + ``plan.json`` +
            ``manifest.json`` (``metrics.json`` and ``model.onnx`` are not counted).
        files: on-disk bytes of each file in the artifact, ``metrics.json`` and ``model.onnx``
            included if present.
        task_spec: the task that rebuilds the architecture (``"digits-mlp"``,
            ``"pkg.mod:function"``), or None.
    """

    path: Path
    size_bytes: int
    files: dict[str, int] = field(default_factory=dict)
    task_spec: str | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Artifact:
        """Reopen an exported directory, checking its manifest and on-disk sizes."""
        p = Path(path)
        m = read_manifest(p)
        names = [*DEPLOY_FILES, MANIFEST] + [n for n in OPTIONAL_FILES if n in m["files"]]
        names += [METRICS] if (p / METRICS).is_file() else []
        try:
            files = {n: (p / n).stat().st_size for n in names}
        except FileNotFoundError as e:
            name = Path(e.filename).name
            raise ArtifactError(f"artifact {str(p)!r}: {name} is missing: re-export it") from None
        return cls(p, artifact_size(p), files, m["task_spec"])

    @property
    def onnx_path(self) -> Path | None:
        """``model.onnx`` (the ONNX Runtime form), or None if the artifact was exported without
        ``onnx_example``."""
        return self.path / ONNX if ONNX in self.files else None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise ArtifactError(f"metrics value {obj!r} is not JSON-serializable: pass numbers or strings")


def _metrics_bytes(metrics: dict[str, Any]) -> bytes:
    return json.dumps(
        metrics, separators=(",", ":"), sort_keys=True, default=_json_default
    ).encode()


def _write_dir(
    path: Path, files: dict[str, Content], metrics: bytes | None, manifest: Callable[[], bytes]
) -> None:
    """Write ``files``, then ``manifest()`` last, so that no half-written directory ever looks
    valid (the manifest is asked for only once every other file is written: the exporter
    hashes them meanwhile)."""
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{str(path)!r} exists and is not a directory: choose another path")
    order = list(files)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(path)
        tmp.mkdir()
        try:
            for name in order:
                atomic_write(tmp / name, files[name])
            if metrics is not None:
                atomic_write(tmp / METRICS, metrics)
            atomic_write(tmp / MANIFEST, manifest())
            try:
                os.rename(tmp, path)
                fsync_dir(path.parent)
                return
            except OSError:
                if not path.is_dir():  # lost a race only if someone else created it
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (path / MANIFEST).unlink(missing_ok=True)  # the directory is invalid until the new manifest
    fsync_dir(path)
    for name in order:
        atomic_write(path / name, files[name])
    for name in OPTIONAL_FILES:
        if name not in files:
            (path / name).unlink(missing_ok=True)  # a stale ONNX form is another model
    if metrics is None:
        (path / METRICS).unlink(missing_ok=True)  # stale metrics would describe another model
    else:
        atomic_write(path / METRICS, metrics)
    atomic_write(path / MANIFEST, manifest())


def export(
    model: nn.Module,
    plan: Plan | None,
    path: str | os.PathLike[str],
    *,
    task_spec: str | None = None,
    metrics: dict[str, Any] | None = None,
    onnx_example: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> Artifact:
    """Write the compressed, baked ``model`` as one artifact directory at ``path``.

    Each state-dict tensor is stored in its smallest lossless encoding (see the package
    docstring); the write is atomic and the same model always gives the same bytes.

    Args:
        model: the compressed model (``compress.apply``'s result) or any ``nn.Module``.
        plan: the plan it was made with (``None``: an empty plan, e.g. for a teacher).
        path: the directory to write (created; an existing artifact there is replaced).
        task_spec: the task that rebuilds the architecture on load (``task.spec``).
        metrics: numbers written to ``metrics.json`` (not hashed, not counted).
        onnx_example: a batch of real inputs; when given, the deployment form is also written
            as ``model.onnx`` (``to_onnx(model, onnx_example, int8="auto")``: without
            calibration data, the fastest *exact* form among those within 1.25x of the smallest
            file: low-bit (the artifact's own codes) or fp32; see docs/objectives.md), listed
            and hashed in the manifest but not counted in ``size_bytes`` (its size is the
            ``onnx_bytes`` metric). Open it with
            ``load(path, runtime="onnxruntime")``.

    Example:
        >>> import tempfile, torch
        >>> from autocompress.spaces._plan import Plan
        >>> tmp = tempfile.TemporaryDirectory()
        >>> art = export(torch.nn.Linear(4, 2), Plan(), tmp.name + "/a", task_spec=None)
        >>> sorted(art.files), art.size_bytes == sum(art.files.values())
        (['manifest.json', 'plan.json', 'weights.safetensors'], True)
        >>> tmp.cleanup()
    """
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"export needs an nn.Module, got {type(model).__name__}")
    plan = Plan() if plan is None else plan
    if not isinstance(plan, Plan):
        raise ArtifactError(f"plan must be an autocompress Plan, got {type(plan).__name__}")
    if task_spec is not None and (not isinstance(task_spec, str) or not task_spec.isprintable()):
        raise ArtifactError(f"task_spec={task_spec!r} must be a one-line string like 'digits-mlp'")
    if metrics is not None and not isinstance(metrics, dict):
        raise ArtifactError(f"metrics must be a dict, got {type(metrics).__name__}")
    p = Path(path)
    if p.exists() and not p.is_dir():  # before the encoding, which takes seconds on big models
        raise ArtifactError(f"{str(p)!r} exists and is not a directory: choose another path")
    files: dict[str, Content] = {
        WEIGHTS: encode_chunks(model.state_dict(), quant_records(model)),
        PLAN: plan.deployment_json().encode(),
    }
    if onnx_example is not None:
        from autocompress.deploy import onnx_form

        files[ONNX] = onnx_form(model, onnx_example, int8="auto")
    metrics_b = None if metrics is None else _metrics_bytes(metrics)
    with ThreadPoolExecutor(1) as pool:  # sha256 of the files while they are written
        listed = pool.submit(listing, files)
        _write_dir(p, files, metrics_b, lambda: manifest_bytes(files, task_spec, listed.result()))
    return Artifact.open(p)


def write_metrics(path: str | os.PathLike[str], metrics: dict[str, Any]) -> None:
    """Atomically (re)write ``metrics.json`` of an existing artifact (not part of its size).

    Example:
        >>> import tempfile, torch
        >>> from autocompress.spaces._plan import Plan
        >>> tmp = tempfile.TemporaryDirectory()
        >>> art = export(torch.nn.Linear(2, 2), Plan(), tmp.name + "/a")
        >>> write_metrics(art.path, {"accuracy": 0.97})
        >>> tmp.cleanup()
    """
    p = Path(path)
    read_manifest(p)
    atomic_write(p / METRICS, _metrics_bytes(dict(metrics)))


def artifact_size(path: str | os.PathLike[str]) -> int:
    """On-disk bytes a deployment of artifact ``path`` needs (weights + plan + manifest).

    Measured with ``os.stat`` and checked against the manifest's ``size_bytes``.
    """
    p = Path(path)
    m = read_manifest(p)
    try:
        size = sum((p / n).stat().st_size for n in (*DEPLOY_FILES, MANIFEST))
    except FileNotFoundError as e:
        name = Path(e.filename).name
        raise ArtifactError(f"artifact {str(p)!r}: {name} is missing: re-export it") from None
    if size != m["size_bytes"]:
        raise ArtifactError(
            f"artifact {str(p)!r}: files total {size} bytes, manifest says {m['size_bytes']}: "
            "re-export it"
        )
    return size


def inspect_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verified summary of an artifact: size, files, task, per-tensor encodings and bytes, and
    ``aliases`` (``{tied key: stored key}``, tensors stored once)."""
    p = Path(path)
    m, data = read_verified(p)
    return {
        "path": str(p),
        "size_bytes": m["size_bytes"],
        "task_spec": m["task_spec"],
        "files": {n: i["bytes"] for n, i in m["files"].items()},
        "tensors": describe(data[WEIGHTS]),
        "aliases": parse_weights(data[WEIGHTS])[1],
    }
