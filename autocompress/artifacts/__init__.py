"""Artifacts: the real, verifiable files of a compressed model, and their size.

``export(model, plan, path)`` writes one directory:

* ``weights.safetensors``: a valid safetensors file with ONE uint8 tensor ``blob`` holding every
  stored tensor's stream, and ``__metadata__`` = ``{"format": "autocompress-weights/2",
  "layout": ...}`` (one short text entry per tensor: name, shape, kind, encoding, codec, bytes;
  or ``name = target`` for a tied tensor, stored once). Quantized weights are stored as integer
  codes (bit-packed, little-endian bit order) plus fp16 per-channel scales or an fp16 codebook;
  other tensors as fp16 when that is exact, else fp32. Each tensor takes the smallest of dense /
  byte-plane / bitmask / relative-index (Deep Compression, gap width 1..8 bits, filler entries for
  long gaps) encodings, chosen from counts without building the others, then zstd-compressed
  when that shrinks it (small models also try LZMA2). Format-1 artifacts (deflate, no aliases)
  still load.
* ``plan.json``: the plan (``Plan.to_json()``).
* ``model.onnx`` (optional, with ``export(..., onnx_example=batch)``): the ONNX Runtime
  deployment form (low-bit, int8 or fp32: the fastest within 1.25x of the smallest file),
  listed and hashed in the manifest but not counted in ``size_bytes`` (an alternative encoding
  of the same model; see ``_io``).
* ``manifest.json``: format name and version, ``task_spec``, byte size and sha256 of the files
  above, and ``size_bytes``; written last, so a directory without a valid manifest is never
  an artifact.
* ``metrics.json`` (optional, informational: not hashed, not counted in the size).

``cached_export`` is ``export`` reusing an earlier export of the same content (a teacher's
artifact is exported once per content hash and linked into every run that needs it).

``size_bytes`` is the on-disk byte count of weights + plan + manifest. ``load(path)`` verifies
everything before parsing, rebuilds the architecture (from ``model=`` or the task) and returns a
model whose weights are bit-identical to the exported ones (signed zeros become +0.0) and whose
tied parameters are one ``Parameter`` again;
``load(path, runtime="onnxruntime")`` returns the verified ``model.onnx`` as an ONNX Runtime
session (:class:`~autocompress.deploy.OnnxModel`). No pickle.

Example:
    >>> import tempfile, torch
    >>> from autocompress.spaces._plan import Plan
    >>> tmp = tempfile.TemporaryDirectory()
    >>> net = torch.nn.Linear(4, 2)
    >>> art = export(net, Plan(), tmp.name + "/a")
    >>> art.size_bytes == artifact_size(art.path)
    True
    >>> torch.equal(load(art.path, model=torch.nn.Linear(4, 2)).weight, net.weight)
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

from autocompress.artifacts._cache import cached_export
from autocompress.artifacts._export import (
    Artifact,
    artifact_size,
    export,
    inspect_artifact,
    write_metrics,
)
from autocompress.artifacts._load import load

__all__ = [
    "Artifact",
    "artifact_size",
    "cached_export",
    "export",
    "inspect_artifact",
    "load",
    "write_metrics",
]
