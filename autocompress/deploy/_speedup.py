"""``latency_and_speedup``: a model and its dense teacher, timed interleaved in one runtime."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autocompress.deploy._export import eval_mode
from autocompress.deploy._latency import LatencyStats, measure_latency, paired_ratio
from autocompress.deploy._onnx import (
    Inputs,
    as_numpy,
    choose_form,
    deploy_forms,
    runner,
    tile_batch,
)
from autocompress.deploy._runtime import OnnxModel
from autocompress.errors import AutocompressError
from autocompress.tasks._batch import call_model

RUNTIMES = ("onnxruntime", "torch")
_TEACHERS: OrderedDict[tuple, OnnxModel] = OrderedDict()
_MAX_TEACHERS = 4


def fingerprint(model: nn.Module, example_input: Inputs) -> str:
    """A hash of ``model``'s class, state and input signature (the teacher-cache key).

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> x = torch.zeros(1, 2)
        >>> fingerprint(a, x) == fingerprint(a, x), fingerprint(a, x) == fingerprint(b, x)
        (True, False)
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(example_input, Mapping):
        items = list(example_input.items())
    elif isinstance(example_input, tuple):
        items = list(enumerate(example_input))
    else:
        items = [(0, example_input)]
    for k, x in items:
        sig = f"{tuple(x.shape[1:])}:{x.dtype}" if isinstance(x, torch.Tensor) else repr(x)
        h.update(f"{k}={sig};".encode())
    return h.hexdigest()


def teacher_onnx(
    teacher: nn.Module,
    example_input: Inputs,
    threads: int = 1,
    output: str | int | None = None,
) -> OnnxModel:
    """The dense teacher's fp32 ONNX session, exported once per process (cached by content)."""
    key = (fingerprint(teacher, example_input), threads, output)
    if key in _TEACHERS:
        _TEACHERS.move_to_end(key)
        return _TEACHERS[key]
    forms = deploy_forms(teacher, example_input, int8=False, output=output)
    om = OnnxModel(forms["fp32"], threads=threads)
    _TEACHERS[key] = om
    while len(_TEACHERS) > _MAX_TEACHERS:
        _TEACHERS.popitem(last=False)
    return om


def _call(model: nn.Module):
    return lambda x: call_model(model, x)


def _summary(out: dict[str, float], b: int, model: LatencyStats, teacher: LatencyStats) -> None:
    speedup, spread = paired_ratio(teacher, model)
    out[f"latency_ms@{b}"] = model.median_ms
    out[f"latency_iqr_ms@{b}"] = model.iqr_ms
    out[f"latency_cv@{b}"] = model.cv
    out[f"teacher_latency_ms@{b}"] = teacher.median_ms
    out[f"teacher_latency_iqr_ms@{b}"] = teacher.iqr_ms
    out[f"teacher_latency_cv@{b}"] = teacher.cv
    out[f"speedup@{b}"] = speedup
    out[f"speedup_iqr@{b}"] = spread


def latency_and_speedup(
    model: nn.Module | OnnxModel,
    teacher: nn.Module,
    example_batch: Inputs,
    batch_sizes: Sequence[int] = (1, 256),
    runtime: str = "onnxruntime",
    threads: int = 1,
    *,
    int8: str | bool = "auto",
    warmup: int = 3,
    repeats: int = 25,
    max_seconds: float | None = None,
    output: str | int | None = None,
) -> dict[str, float]:
    """Latency of ``model`` and its speedup over the dense ``teacher``, per batch size.

    Both run in the same process and runtime and are timed interleaved
    (:func:`measure_latency`); the speedup is the median of per-round teacher/model ratios.

    * ``runtime="onnxruntime"``: the deployment form. The model is exported (:func:`to_onnx`'s
      forms; with ``int8="auto"`` the form ``to_onnx`` would ship is chosen *per batch size*); an
      :class:`OnnxModel` is timed as is. The teacher is exported fp32 once per process.
    * ``runtime="torch"``: eager PyTorch under ``torch.inference_mode``.

    Args:
        model: the compressed model (or its loaded ONNX form).
        teacher: the uncompressed model it is compared with.
        example_batch: real inputs (a tensor, a tuple or a dict of tensors); rows are
            repeated to make each batch size.
        batch_sizes: batch sizes to measure.
        runtime: ``"onnxruntime"`` or ``"torch"``.
        threads: threads of both runtimes during the measurement.
        int8, warmup, repeats, max_seconds: see :func:`to_onnx` and :func:`measure_latency`.
        output: the output the ONNX graphs return (see :func:`to_onnx`).

    Returns:
        Floats keyed ``<name>@<batch>``: ``latency_ms``, ``latency_iqr_ms``, ``latency_cv``,
        ``teacher_latency_ms``, ``teacher_latency_iqr_ms``, ``teacher_latency_cv``, ``speedup``,
        ``speedup_iqr`` and, for ONNX Runtime, ``int8`` / ``lowbit`` (1.0 when that form was
        used).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> small = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> r = latency_and_speedup(small, net, torch.randn(4, 16), batch_sizes=(8,), repeats=5)
        >>> sorted(k for k in r if k.endswith("@8"))[:3]
        ['int8@8', 'latency_cv@8', 'latency_iqr_ms@8']
    """
    if runtime not in RUNTIMES:
        raise AutocompressError(f"runtime={runtime!r} is unknown: use one of {list(RUNTIMES)}")
    if not batch_sizes:
        raise AutocompressError("batch_sizes is empty: pass e.g. (1, 256)")
    settings = {
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads,
        "max_seconds": max_seconds,
    }
    out: dict[str, float] = {}
    if runtime == "torch":
        if isinstance(model, OnnxModel):
            raise AutocompressError("runtime='torch' needs a torch model, got an OnnxModel")
        with eval_mode(model), eval_mode(teacher), torch.inference_mode():
            for b in batch_sizes:
                x = tile_batch(example_batch, b)
                cands = {"teacher": _call(teacher), "model": _call(model)}
                stats = measure_latency(cands, x, **settings)
                _summary(out, b, stats["model"], stats["teacher"])
        return out
    ref = teacher_onnx(teacher, example_batch, threads, output)
    if isinstance(model, OnnxModel):
        forms = {model.form: model}
    else:
        raw = deploy_forms(
            model, example_batch, int8=int8 is True, output=output, lowbit=int8 == "auto"
        )
        forms = {k: OnnxModel(v, threads=threads) for k, v in raw.items()}
    for b in batch_sizes:
        x = as_numpy(tile_batch(example_batch, b))
        if len(forms) == 1:
            form = next(iter(forms))
        elif int8 == "auto":
            form = choose_form(raw, x, threads=threads, sessions=forms)
        else:
            form = "int8" if int8 and "int8" in forms else "fp32"
        cands = {"teacher": runner(ref), "model": runner(forms[form])}
        stats = measure_latency(cands, x, **settings)
        _summary(out, b, stats["model"], stats["teacher"])
        out[f"int8@{b}"] = 1.0 if form.startswith("int8") else 0.0
        out[f"lowbit@{b}"] = 1.0 if form == "lowbit" else 0.0
    return out
