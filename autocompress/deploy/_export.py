"""torch -> fp32 ONNX with a dynamic batch axis.

torch 2.13 ships two exporters and both handle the built-in tasks (MultiheadAttention included)
with identical outputs: the TorchScript one (``dynamo=False``, deprecated since torch 2.9 but
present) takes 5-250 ms per model here, the ``torch.export`` one (``dynamo=True``, via
``onnxscript``) 0.6-3 s. A search exports every trial, so ``exporter="auto"`` tries TorchScript
first and falls back to ``torch.export``. Tracing can silently bake in Python control flow, so
every export is verified: ONNX Runtime must reproduce the torch outputs at a batch size other than
the traced one, else the next exporter is tried. Node metadata (stack traces with local file
paths) is stripped from the result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import torch
from torch import nn

from autocompress.deploy._deps import missing_module, onnxruntime
from autocompress.errors import AutocompressError

OPSET = 18
INPUT = "input"
OUTPUT = "output"
FORM_KEY = "autocompress.form"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' deprecation warnings and registration log lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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


def as_args(example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The export arguments, with the batch tiled to >= 2 so it is not traced as a constant 1."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in args):
        raise AutocompressError(
            "example_input must be a batched tensor (or a tuple of them): pass task.example_input()"
        )
    return tuple(
        a.detach().cpu().repeat(2, *([1] * (a.dim() - 1))) if len(a) < 2 else a.detach().cpu()
        for a in args
    )


def _names(n: int, stem: str) -> list[str]:
    return [stem] if n == 1 else [f"{stem}{i}" for i in range(n)]


def _dynamo(model: nn.Module, args: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1)
    prog = torch.onnx.export(
        model,
        args,
        None,
        dynamo=True,
        opset_version=OPSET,
        input_names=_names(len(args), INPUT),
        dynamic_shapes=tuple({0: batch} for _ in args),
        verbose=False,
    )
    proto = prog.model_proto
    outs = [o.name for o in proto.graph.output]
    names = _names(len(outs), OUTPUT)
    if outs != names:  # rename graph outputs to the stable names, wherever they appear
        rename = dict(zip(outs, names, strict=True))
        for node in proto.graph.node:
            node.output[:] = [rename.get(o, o) for o in node.output]
            node.input[:] = [rename.get(i, i) for i in node.input]
        for o, name in zip(proto.graph.output, names, strict=True):
            o.name = name
    return proto


def _torchscript(model: nn.Module, args: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    with torch.no_grad():
        out = model(*args)
    n_out = len(out) if isinstance(out, tuple | list) else 1
    ins, outs = _names(len(args), INPUT), _names(n_out, OUTPUT)
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        args,
        buf,
        dynamo=False,
        opset_version=OPSET,
        input_names=ins,
        output_names=outs,
        dynamic_axes={n: {0: "batch"} for n in ins + outs},
    )
    return onnx.load_from_string(buf.getvalue())


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


def verify(proto: onnx.ModelProto, model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """Raise ``AutocompressError`` unless ONNX Runtime matches ``model`` on a new batch size."""
    ort = onnxruntime("ONNX export")
    from autocompress.deploy._runtime import session_options  # (imports this module)

    batch = tuple(torch.cat([a, a[:1]]) for a in args)  # traced at len(a); check len(a) + 1
    with torch.no_grad():
        ref = model(*batch)
    refs = list(ref) if isinstance(ref, tuple | list) else [ref]
    opts = session_options(1)
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), batch, strict=True)}
    outs = sess.run(None, feed)
    for r, o in zip(refs, outs, strict=True):
        r = r.detach().numpy()
        if r.shape != o.shape or not np.allclose(o, r, rtol=1e-3, atol=1e-4):
            err = float(np.abs(o - r).max()) if r.shape == o.shape else f"shape {o.shape}"
            raise AutocompressError(f"ONNX output differs from torch at batch {len(o)} ({err})")


EXPORTERS = ("auto", "torchscript", "dynamo")


def export_fp32(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    exporter: str = "auto",
) -> onnx.ModelProto:
    """``model`` as an fp32 ONNX graph whose first axis (the batch) is dynamic, verified.

    ``exporter``: ``"auto"`` (TorchScript, then ``torch.export``), ``"torchscript"`` or
    ``"dynamo"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> proto = export_fp32(net, torch.randn(2, 4))
        >>> [i.name for i in proto.graph.input], proto.opset_import[0].version >= 17
        (['input'], True)
    """
    if exporter not in EXPORTERS:
        raise AutocompressError(f"exporter={exporter!r} is unknown: use one of {list(EXPORTERS)}")
    chain = {"auto": (_torchscript, _dynamo), "torchscript": (_torchscript,), "dynamo": (_dynamo,)}
    args = as_args(example_input)
    onnxruntime("ONNX export")  # it verifies every export: if missing, say so first
    errors = []
    with eval_mode(model), quiet():
        for fn in chain[exporter]:
            try:
                proto = fn(model, args)
                verify(proto, model, args)
                return set_form(strip(proto), "fp32")
            except ImportError as e:  # a missing module (onnxscript ...), not the model's fault
                raise missing_module(e, f"the {fn.__name__[1:]} ONNX exporter") from None
            except Exception as e:  # noqa: BLE001 - try the next exporter, report all
                errors.append(f"{fn.__name__[1:]}: {type(e).__name__}: {e}")
    why = " | ".join(" ".join(e.split())[:300] for e in errors)
    raise AutocompressError(
        f"the model cannot be exported to ONNX ({why}): make its forward traceable by "
        "torch.export (no data-dependent Python control flow)"
    )
