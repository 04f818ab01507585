"""torch -> fp32 ONNX with a dynamic batch axis (and sequence axis for token inputs), verified.

torch 2.13 ships two exporters and both handle the built-in tasks (MultiheadAttention included)
with identical outputs: the TorchScript one (``dynamo=False``, deprecated since torch 2.9 but
present) takes 5-250 ms per model here (1-3 s for tiny Hugging Face models), the
``torch.export`` one (``dynamo=True``, via ``onnxscript``) 0.6-9 s. A search exports every trial,
so ``exporter="auto"`` tries TorchScript first and falls back to ``torch.export``. Tracing can
silently bake in Python control flow, so every export is verified: ONNX Runtime must reproduce
the torch outputs at a batch size (and, for token inputs, a sequence length) other than the
traced one, else the next exporter is tried. A model whose forward only works at one sequence
length is exported with a fixed sequence axis. Models go through
:class:`~autocompress.deploy._signature.Positional` (dict/tuple inputs, ``ModelOutput``
outputs, ``use_cache=False``). Node metadata (stack traces with local file paths) is stripped
from the result.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from autocompress.deploy._deps import missing_module, onnxruntime
from autocompress.deploy._diagnose import export_error
from autocompress.deploy._signature import (
    OutputSpec,
    OutputTypeError,
    Positional,
    Signature,
    no_cache,
    other_shape,
    select,
    signature,
    tile_rows,
)
from autocompress.errors import AutocompressError

OPSET = 18
RTOL = 1e-3
ATOL = 1e-4
FORM_KEY = "autocompress.form"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' deprecation warnings and registration log lines."""
    names = (
        "torch.onnx",
        "torch.export",
        "torch._export",
        "torch.fx",
        "torch._dynamo",
        "onnxscript",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sink = io.StringIO()  # the exporters print graphs on failure
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own flag."""
    training = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for n, m in model.named_modules():
            m.training = training.get(n, m.training)


def as_args(example_input: Any) -> tuple[Signature, tuple[torch.Tensor, ...]]:
    """The input signature and export tensors, the batch tiled to >= 2 rows so it is not traced
    as a constant 1."""
    sig, xs = signature(example_input)
    n = len(xs[0])
    args = tuple(
        tile_rows(a, 2) if b and n < 2 else a.detach().cpu()
        for a, b in zip(xs, sig.batched, strict=True)
    )
    return sig, args


def _input_axes(sig: Signature, seq: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name, tok, batched in zip(sig.names, sig.token, sig.batched, strict=True):
        d = {0: "batch"} if batched else {}
        if seq and tok:
            d[1] = f"{name}_seq"
        if d:
            axes[name] = d
    return axes


def _output_axes(spec: OutputSpec, refs0: tuple, refs1: tuple) -> dict[str, dict[int, str]]:
    """Output axes whose length changed between the two reference runs are dynamic."""
    axes = {}
    for name, a, b in zip(spec.names, refs0, refs1, strict=True):
        d = {
            i: ("batch" if i == 0 else f"{name}_dim{i}")
            for i in range(a.dim())
            if a.shape[i] != b.shape[i]
        }
        if d:
            axes[name] = d
    return axes


def _dynamo(model: Positional, args: tuple, sig: Signature, seq: bool, spec: OutputSpec):
    batch = torch.export.Dim("batch", min=1)
    shapes = []
    for tok, batched in zip(sig.token, sig.batched, strict=True):
        d: dict[int, Any] = {0: batch} if batched else {}
        if seq and tok:
            d[1] = torch.export.Dim.AUTO
        shapes.append(d or None)
    prog = torch.onnx.export(
        model,
        args,
        None,
        dynamo=True,
        opset_version=OPSET,
        input_names=list(sig.names),
        dynamic_shapes=(tuple(shapes),),  # one entry: Positional.forward(*xs)
        verbose=False,
    )
    proto = prog.model_proto
    outs = [o.name for o in proto.graph.output]
    names = list(spec.names)
    if outs != names:  # rename graph outputs to the stable names, wherever they appear
        rename = dict(zip(outs, names, strict=True))
        for node in proto.graph.node:
            node.output[:] = [rename.get(o, o) for o in node.output]
            node.input[:] = [rename.get(i, i) for i in node.input]
        for o, name in zip(proto.graph.output, names, strict=True):
            o.name = name
    return proto


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null for the block: the TorchScript exporter logs
    the whole graph from C++ when it fails (its log switch is always on in torch 2.13)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
    except OSError:  # no such descriptors (embedded interpreters): leave them
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            for fd, _ in saved:
                os.dup2(null.fileno(), fd)
        yield
    finally:
        for fd, dup in saved:
            os.dup2(dup, fd)
            os.close(dup)


def _torchscript(
    model: Positional, args: tuple, sig: Signature, seq: bool, spec: OutputSpec, out_axes: dict
) -> onnx.ModelProto:
    buf = io.BytesIO()
    with _quiet_fds():
        _ts_export(model, args, sig, seq, spec, out_axes, buf)
    return onnx.load_from_string(buf.getvalue())


def _ts_export(
    model: Positional,
    args: tuple,
    sig: Signature,
    seq: bool,
    spec: OutputSpec,
    out_axes: dict,
    buf: io.BytesIO,
) -> None:
    torch.onnx.export(
        model,
        args,
        buf,
        dynamo=False,
        verbose=False,  # else the graph is logged to stderr on a failure
        opset_version=OPSET,
        input_names=list(sig.names),
        output_names=list(spec.names),
        dynamic_axes={**_input_axes(sig, seq), **out_axes},
    )


def strip(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop node metadata and doc strings (stack traces with local paths, exporter notes)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.doc_string = ""
    return proto


def set_form(proto: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Record the deployment form (``fp32``, ``int8`` ...) in the model's metadata."""
    kept = [p for p in proto.metadata_props if p.key != FORM_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=FORM_KEY, value=form)
    return proto


class Mismatch(AutocompressError):
    """ONNX Runtime does not reproduce torch on inputs of another shape (a baked-in trace)."""


def verify(proto: onnx.ModelProto, xs: tuple[torch.Tensor, ...], refs: tuple, sig: Signature):
    """Raise :class:`Mismatch` unless ONNX Runtime reproduces ``refs`` (torch's outputs on
    ``xs``, inputs of another batch size and sequence length than the traced ones).

    Tolerance per element: ``|ort - torch| <= ATOL * max(1, max|torch|) + RTOL * |torch|``.
    """
    ort = onnxruntime("ONNX export")
    from autocompress.deploy._runtime import session_options  # (imports this module)

    where = f"batch {len(xs[0])}" + "".join(
        f", {n} length {a.shape[1]}" for n, a, t in zip(sig.names, xs, sig.token, strict=True) if t
    )
    try:
        opts = session_options(1)
        opts.log_severity_level = 4  # a failure is reported below, with the shapes
        sess = ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        given = dict(zip(sig.names, xs, strict=True))
        feed = {i.name: given[i.name].numpy() for i in sess.get_inputs()}
        outs = sess.run(None, feed)
    except Exception as e:  # noqa: BLE001 - ORT raises private types; the graph is wrong
        msg = " ".join(str(e).split())[:200]
        raise Mismatch(f"ONNX Runtime fails at {where} ({type(e).__name__}: {msg})") from None
    for r, o in zip(refs, outs, strict=True):
        r = r.detach().numpy()
        atol = ATOL * max(1.0, float(np.abs(r).max()) if r.size else 1.0)
        if r.shape != o.shape or not np.allclose(o, r, rtol=RTOL, atol=atol):
            err = (
                f"max diff {float(np.abs(o - r).max()):.3g}"
                if r.shape == o.shape
                else (f"shape {tuple(o.shape)} instead of {tuple(r.shape)}")
            )
            raise Mismatch(f"ONNX output differs from torch at {where} ({err})")


EXPORTERS = ("auto", "torchscript", "dynamo")
FORM_INPUTS = "autocompress.inputs"
FORM_INPUT = "autocompress.input_form"
FORM_OUTPUT = "autocompress.output_form"


def set_meta(proto: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    """Set metadata entries of ``proto`` (replacing entries of the same keys)."""
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def _reference(model: Positional, xs: tuple, output: str | int | None) -> tuple:
    with torch.no_grad():
        return select(model.call(xs), output)


def export_fp32(
    model: nn.Module,
    example_input: Any,
    exporter: str = "auto",
    *,
    output: str | int | None = None,
) -> onnx.ModelProto:
    """``model`` as a verified fp32 ONNX graph with a dynamic batch (and sequence) axis.

    ``example_input`` is what the model is called with: a tensor, a tuple (``model(*xs)``) or a
    dict of tensors (``model(**batch)``, e.g. ``input_ids``/``attention_mask``); the ONNX inputs
    are named after the dict keys. Every input's axis 0 is dynamic, and axis 1 of token inputs
    (2-D integer tensors, HF masks) too when the model allows it. A key/value cache is switched
    off (``use_cache=False``). The graph returns the model's tensor (or flat tuple of tensors)
    or, from a dict / ``ModelOutput``, the tensor ``output`` names (default ``logits``, else
    ``last_hidden_state``, else the first tensor), named after its field.

    ``exporter``: ``"auto"`` (TorchScript, then ``torch.export``), ``"torchscript"`` or
    ``"dynamo"``. Every graph is verified by ONNX Runtime at another batch size and sequence
    length; a model that cannot be exported raises an ``AutocompressError`` naming the cause
    (its output type, a cache, an unsupported operator, data-dependent control flow).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> proto = export_fp32(net, torch.randn(2, 4))
        >>> [i.name for i in proto.graph.input], proto.opset_import[0].version >= 17
        (['input'], True)
    """
    if exporter not in EXPORTERS:
        raise AutocompressError(f"exporter={exporter!r} is unknown: use one of {list(EXPORTERS)}")
    if output is not None and (isinstance(output, bool) or not isinstance(output, str | int)):
        raise AutocompressError(f"output={output!r} must be an output field name or an index")
    chain = {"auto": (_torchscript, _dynamo), "torchscript": (_torchscript,), "dynamo": (_dynamo,)}
    sig, args = as_args(example_input)
    onnxruntime("ONNX export")  # it verifies every export: if missing, say so first
    errors: list[tuple[str, BaseException]] = []
    with eval_mode(model), no_cache(model), quiet():
        wrapper = Positional(model, sig, output)
        try:
            spec, refs0 = _reference(wrapper, args, output)
        except OutputTypeError as e:
            raise AutocompressError(export_error([("torch", e)])) from None
        except Exception as e:  # noqa: BLE001 - the model itself fails: say so, with its words
            raise AutocompressError(export_error([("torch", e)], in_torch=True)) from None
        if set(spec.names) & set(sig.names):
            spec = OutputSpec(spec.form, tuple(f"{n}_output" for n in spec.names))
        for seq in (True, False) if any(sig.token) else (False,):
            other = other_shape(sig, args, seq)
            try:
                _, refs1 = _reference(wrapper, other, output)
            except Exception as e:  # noqa: BLE001 - e.g. a model needing one sequence length
                errors.append(
                    ("torch", Mismatch(f"the model fails in torch at another shape: {e}"))
                )
                continue
            for fn in chain[exporter]:
                name = fn.__name__[1:]
                try:
                    if fn is _torchscript:
                        proto = fn(wrapper, args, sig, seq, spec, _output_axes(spec, refs0, refs1))
                    else:
                        proto = fn(wrapper, args, sig, seq, spec)
                    verify(proto, other, refs1, sig)
                except ImportError as e:  # a missing module (onnxscript ...), not the model's
                    raise missing_module(e, f"the {name} ONNX exporter") from None
                except Exception as e:  # noqa: BLE001 - try the next exporter, report all
                    errors.append((name, e))
                    continue
                meta = {
                    FORM_INPUTS: json.dumps(list(sig.names)),
                    FORM_INPUT: sig.form,
                    FORM_OUTPUT: spec.form,
                }
                return set_form(set_meta(strip(proto), meta), "fp32")
            if not any(isinstance(e, Mismatch) for _, e in errors):
                break  # the exporters failed outright: a fixed sequence length will not help
    raise AutocompressError(export_error(errors))
