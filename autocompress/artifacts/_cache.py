"""The teacher's artifact, exported once and reused across runs (cached by content hash).

Exporting a pretrained teacher costs seconds to minutes (every tensor is encoded and
compressed), and every search exports the same teacher again. :func:`cached_export` keys an
artifact by a sha256 of everything its bytes depend on:

- every state-dict tensor's name, dtype, shape and raw bytes (read in place, no copy),
- the architecture (the model's class and ``repr``, and any quantization records),
- the plan, the ``task_spec`` written into the manifest, the artifact and weights format
  versions and the autocompress version (a new encoder may choose other bytes);

and keeps one artifact directory per key under ``$AUTOCOMPRESS_CACHE/teachers/artifacts``
(default ``~/.cache/autocompress/teachers/artifacts``). Hashing reads each byte once (sha256
runs at hundreds of MB/s), far cheaper than encoding it.

A cache entry is written to a temporary sibling and renamed into place, so a kill never leaves
a half entry (a leftover temporary directory is ignored and removed on the next miss). A hit is
verified like every artifact load (sizes and sha256 of each file against the manifest); a
corrupt entry is reported in one warning line, removed and rebuilt. The entry is then
hard-linked (or copied, across file systems) into the requested directory: the artifact code
replaces files atomically (``os.replace``) and never writes into one in place, so links are safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from autocompress.artifacts._export import Artifact, export
from autocompress.artifacts._format import WEIGHTS_FORMAT
from autocompress.artifacts._io import (
    MANIFEST,
    VERSION,
    fsync_dir,
    read_manifest,
    read_verified,
    tmp_name,
)
from autocompress.compress._meta import quant_records
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import Plan

CACHE_VERSION = 1
"""Bumped when the key's recipe changes."""
log = logging.getLogger(__name__)
Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"autocompress: {line}", file=sys.stderr, flush=True)


def teacher_cache_dir() -> Path:
    """Where cached teacher artifacts live (``$AUTOCOMPRESS_CACHE/teachers/artifacts``)."""
    from autocompress.tasks._base import cache_dir

    return cache_dir() / "teachers" / "artifacts"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (CPU, contiguous), viewed without a copy where possible."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def artifact_key(model: nn.Module, plan: Plan | None = None, task_spec: str | None = None) -> str:
    """The content hash that names ``model``'s artifact in the cache (64 hex digits).

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> artifact_key(net) == artifact_key(net), len(artifact_key(net))
        (True, 64)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> artifact_key(net) == artifact_key(torch.nn.Linear(3, 2))
        False
    """
    from autocompress import __version__

    plan = Plan() if plan is None else plan
    records = {n: repr(r) for n, r in sorted(quant_records(model).items())}
    head = {
        "cache": CACHE_VERSION,
        "artifact": VERSION,
        "weights": WEIGHTS_FORMAT,
        "autocompress": __version__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "arch": repr(model),
        "records": records,
        "plan": plan.deployment_json(),
        "task_spec": task_spec,
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name, t in model.state_dict(keep_vars=False).items():  # state-dict order is stable
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _valid(entry: Path) -> bool:
    """True if ``entry`` is a complete, verified artifact; raises for a corrupt one."""
    if not entry.exists():
        return False
    read_verified(entry)  # ArtifactError on any missing, truncated or modified file
    return True


def _files(entry: Path) -> list[str]:
    """The artifact's files, manifest last (so a copy is valid only once complete)."""
    names = sorted(read_manifest(entry)["files"])
    extra = [n for n in ("metrics.json",) if (entry / n).is_file()]
    return names + extra + [MANIFEST]


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (atomically replacing it), or copy where links fail."""
    tmp = tmp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _deliver(entry: Path, path: Path) -> None:
    """Make ``path`` a copy of the cached artifact ``entry`` without ever looking valid early:
    a new directory is filled aside and renamed; an existing one loses its manifest first and
    gets it back last."""
    names = _files(entry)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(path)
        tmp.mkdir()
        try:
            for n in names:
                _place(entry / n, tmp / n)
            os.rename(tmp, path)
            fsync_dir(path.parent)
            return
        except OSError:
            if not path.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not path.is_dir():
        raise ArtifactError(f"{str(path)!r} exists and is not a directory: choose another path")
    (path / MANIFEST).unlink(missing_ok=True)
    for stale in ("model.onnx", "metrics.json"):
        if stale not in names:
            (path / stale).unlink(missing_ok=True)
    for n in names:
        _place(entry / n, path / n)
    fsync_dir(path)


def _sweep(root: Path) -> None:
    """Remove temporary directories left by killed exports (older than an hour)."""
    now = time.time()
    for p in root.glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def cached_export(
    model: nn.Module,
    plan: Plan | None,
    path: str | os.PathLike[str],
    *,
    task_spec: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: Progress | None = _stderr,
) -> Artifact:
    """``export(model, plan, path, task_spec=task_spec)``, reusing an earlier export of the
    same content from the cache (see the module docstring); same return value.

    Args:
        model, plan, path, task_spec: as :func:`~autocompress.artifacts.export`.
        cache: the cache directory (default :func:`teacher_cache_dir`).
        progress: called with one line per step that may take seconds (hash, verify, export,
            a corrupt entry); default prints ``autocompress: ...`` to stderr; ``None`` is quiet.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> net = torch.nn.Linear(4, 2)
        >>> a = cached_export(net, None, tmp.name + "/a", cache=tmp.name + "/c", progress=None)
        >>> b = cached_export(net, None, tmp.name + "/b", cache=tmp.name + "/c", progress=None)
        >>> a.size_bytes == b.size_bytes, (b.path / "weights.safetensors").is_file()
        (True, True)
        >>> tmp.cleanup()
    """
    say = progress or (lambda line: None)
    root = Path(cache) if cache is not None else teacher_cache_dir()
    t0 = time.perf_counter()
    key = artifact_key(model, plan, task_spec)
    t_hash = time.perf_counter() - t0
    entry = root / key[:32]
    log.info("teacher artifact key %s (hashed in %.2f s)", key[:16], t_hash)
    try:
        hit = _valid(entry)
    except ArtifactError as e:
        msg = f"cached teacher artifact {str(entry)!r} is corrupt ({e}); rebuilding it"
        log.warning(msg)
        say(f"warning: {msg}")
        shutil.rmtree(entry, ignore_errors=True)
        hit = False
    if hit:
        _deliver(entry, Path(path))
        say(
            f"teacher artifact reused from the cache ({key[:12]}, hashed in {t_hash:.1f} s, "
            f"verified and linked in {time.perf_counter() - t0 - t_hash:.1f} s)"
        )
        return Artifact.open(path)
    n = sum(t.numel() for t in model.state_dict().values())
    say(f"exporting the teacher artifact ({n / 1e6:.1f}M values) once; cached for later runs")
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    t1 = time.perf_counter()
    tmp = tmp_name(entry)
    try:
        export(model, plan, tmp, task_spec=task_spec)
        try:
            os.rename(tmp, entry)
            fsync_dir(root)
        except OSError:
            if not _valid(entry):  # someone else's entry won the race; it must be sound
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _deliver(entry, Path(path))
    say(f"teacher artifact exported in {time.perf_counter() - t1:.1f} s ({key[:12]})")
    return Artifact.open(path)
