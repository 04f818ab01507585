"""``to_onnx``: the deployment form of a compressed model (fp32, low-bit, int8 ...).

Forms (see :mod:`autocompress.deploy._fidelity`):

* exact: ``fp32`` (the verified export) and ``lowbit`` (every recorded weight stored as its own
  codes: :mod:`autocompress.deploy._lowbit`; checked against the fp32 form before it is offered);
* with int8 activations (outputs move): ``int8`` (ONNX Runtime dynamic quantization of the Linear
  layers with <= 8-bit uniform records, embeddings and other recorded weights low-bit as in
  ``lowbit``) and ``lowbit_int8`` (the low-bit form with ``MatMulNBits`` ``accuracy_level=4``,
  5..8-bit Linear weights through its 8-bit kernel).

``"auto"`` ships the fastest of the forms whose file is within :data:`SIZE_SLACK` of the
smallest one, so a low-bit plan deploys as small as its artifact; a form with int8 activations
is only a candidate when calibration data (and optionally a check) show it stays within
tolerance: without them ``"auto"`` ships an exact form.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from autocompress.artifacts._io import atomic_write
from autocompress.deploy._export import ATOL, RTOL, export_fp32, set_form
from autocompress.deploy._fidelity import Fidelity, as_batches, is_exact
from autocompress.deploy._int8 import int8_form
from autocompress.deploy._latency import measure_latency
from autocompress.deploy._lowbit import lowbit_form
from autocompress.deploy._runtime import OnnxModel
from autocompress.deploy._signature import tile_rows
from autocompress.errors import AutocompressError
from autocompress.tasks._batch import Inputs, batch_len

INT8_CHOICES = ("auto", True, False)
FORMS = ("fp32", "int8", "lowbit", "lowbit_int8", "int8_token")
# A form must beat the reference form by this factor to be chosen: on a tie, keep the exact one.
_MARGIN = 0.95
SIZE_SLACK = 1.25
"""``"auto"`` only ships a form whose file is at most this many times the smallest form's."""
LOG = logging.getLogger("autocompress.deploy")


def tile_batch(example: Inputs, batch: int) -> Inputs:
    """A batch of ``batch`` rows made by repeating the rows of ``example`` (each tensor of a
    tuple or dict whose first axis is the batch; other entries are kept as they are).

    Example:
        >>> tile_batch(torch.arange(3.0).reshape(3, 1), 5).flatten().tolist()
        [0.0, 1.0, 2.0, 0.0, 1.0]
        >>> ids = torch.tensor([[1, 2], [3, 4]])
        >>> tile_batch({"input_ids": ids, "attention_mask": ids > 0}, 3)["input_ids"].tolist()
        [[1, 2], [3, 4], [1, 2]]
    """
    if not (isinstance(batch, int) and batch >= 1):
        raise AutocompressError(f"batch size {batch!r} must be an integer >= 1")
    n = batch_len(example)

    def tile(v: Any) -> Any:
        batched = isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == n
        return tile_rows(v, batch) if batched else v

    if isinstance(example, torch.Tensor):
        return tile(example)
    if isinstance(example, Mapping):
        return {k: tile(v) for k, v in example.items()}
    return tuple(tile(v) for v in example)


def as_numpy(x: Inputs) -> Any:
    """``x`` (a tensor, or a tuple or dict of them) with every tensor as a numpy array."""

    def arr(v: Any) -> Any:
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v

    if isinstance(x, Mapping):
        return {k: arr(v) for k, v in x.items()}
    return tuple(arr(t) for t in x) if isinstance(x, tuple) else arr(x)


def runner(model: OnnxModel):
    """``fn(inputs)`` calling ``model.run_numpy`` with one array, a tuple or a dict of arrays."""
    run = model.run_numpy

    def call(x: Any) -> Any:
        if isinstance(x, Mapping):
            return run(**x)
        return run(*x) if isinstance(x, tuple) else run(x)

    return call


def deploy_forms(
    model: nn.Module,
    example_input: Inputs,
    int8: bool = True,
    *,
    output: str | int | None = None,
    lowbit: bool = True,
) -> dict[str, bytes]:
    """Serialized ONNX forms of ``model``: ``fp32`` always; ``lowbit`` if asked for and some
    weight has a quantization record, and only when ONNX Runtime reproduces the fp32 form's
    outputs on ``example_input`` within the export tolerance (else it is left out and the reason
    logged on the ``autocompress.deploy`` logger); with ``int8``, the forms with int8
    activations that apply: ``int8`` (some Linear-type layer has uniform <= 8-bit
    per-channel weights) and ``lowbit_int8`` (some Linear weight runs as ``MatMulNBits``).
    ``example_input`` and ``output``: see :func:`~autocompress.deploy.export_fp32`.

    The ``int8`` forms are not exact: :func:`onnx_form` only ships one after a fidelity check.

    Example:
        >>> sorted(deploy_forms(nn.Linear(4, 3), torch.randn(2, 4)))
        ['fp32']
    """
    fp32 = export_fp32(model, example_input, output=output)
    out = {"fp32": fp32.SerializeToString()}
    if int8:
        q = int8_form(_copy(fp32), model)
        if q is not None:
            low, _ = _lowbit(_copy(q), model)  # its embeddings and other weights as codes too
            q = set_form(low, "int8") if low is not None else q
            out["int8"] = q.SerializeToString()
        fast, conv = _lowbit(_copy(fp32), model, accuracy_level=4, nbits_max=8)
        if fast is not None and any(v.startswith("MatMulNBits") for v in conv.done.values()):
            out["lowbit_int8"] = set_form(fast, "lowbit_int8").SerializeToString()
        tok, conv = _lowbit(_copy(fp32), model, token8=True)
        if tok is not None and any(v.startswith("MatMulInteger") for v in conv.done.values()):
            out["int8_token"] = set_form(tok, "int8_token").SerializeToString()
    if lowbit:
        low, conv = _lowbit(_copy(fp32), model)
        for name, why in conv.kept.items():
            LOG.info("low-bit ONNX form: %s stays fp32: %s", name, why)
        if low is not None:
            data = low.SerializeToString()
            why = agreement(out["fp32"], data, example_input)
            if why is None:
                out["lowbit"] = data
            else:
                LOG.warning("low-bit ONNX form not offered: %s; fp32/int8 forms used", why)
    return out


def _lowbit(
    proto: onnx.ModelProto, model: nn.Module, **options: int
) -> tuple[onnx.ModelProto | None, Any]:
    """:func:`lowbit_form`, or no form (with a warning) if the conversion itself fails: the
    fp32/int8 forms are still offered."""
    from autocompress.deploy._lowbit import Conversion

    try:
        return lowbit_form(proto, model, **options)
    except Exception as e:  # noqa: BLE001 - an unforeseen graph: keep the other forms
        LOG.warning("low-bit ONNX form not built (%s: %s)", type(e).__name__, e)
        return None, Conversion()


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(proto)
    return c


def agreement(reference: bytes, candidate: bytes, example_input: Inputs) -> str | None:
    """None when ``candidate`` reproduces ``reference`` (both serialized ONNX) on
    ``example_input`` within the export tolerance (``ATOL``/``RTOL``), else why not."""
    x = as_numpy(tile_batch(example_input, max(2, batch_len(example_input))))
    try:
        want = runner(OnnxModel(reference))(x)
        got = runner(OnnxModel(candidate))(x)
    except Exception as e:  # noqa: BLE001 - ORT raises private types; the form is unusable
        return f"ONNX Runtime cannot run it ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    for r, o in zip(want, got, strict=True):
        atol = ATOL * max(1.0, float(np.abs(r).max()) if r.size else 1.0)
        if r.shape != o.shape or not np.allclose(o, r, rtol=RTOL, atol=atol):
            diff = float(np.abs(o - r).max()) if r.shape == o.shape else float("nan")
            return f"its outputs differ from the fp32 form (max diff {diff:.3g})"
    return None


def form_sizes(forms: Mapping[str, bytes]) -> dict[str, int]:
    """Bytes of each serialized form."""
    return {k: len(v) for k, v in forms.items()}


def small_forms(
    forms: Mapping[str, bytes], slack: float = SIZE_SLACK, max_bytes: int | None = None
) -> list[str]:
    """The forms whose file is at most ``slack`` times the smallest one's, smallest first; with
    ``max_bytes`` (e.g. 1.25x the artifact's ``size_bytes``) also at most that many bytes,
    unless no form is (then the smallest alone).

    Example:
        >>> forms = {"fp32": b"x" * 400, "int8": b"x" * 120, "lowbit": b"x" * 100}
        >>> small_forms(forms), small_forms(forms, max_bytes=110)
        (['lowbit', 'int8'], ['lowbit'])
    """
    sizes = form_sizes(forms)
    least = min(sizes.values())
    cap = max(least, max_bytes) if max_bytes is not None else math.inf
    ok = (k for k, n in sizes.items() if n <= slack * least and n <= cap)
    return sorted(ok, key=lambda k: sizes[k])


def fastest_form(
    forms: Mapping[str, bytes | OnnxModel],
    inputs: Any,
    threads: int = 1,
    repeats: int = 7,
    reference: str | None = None,
) -> str:
    """The name of the fastest form on ``inputs``: ``reference`` (default ``fp32`` when present,
    else the first form given) unless another form is >5% faster.

    ``forms`` maps names to serialized ONNX or open :class:`OnnxModel` sessions.
    """
    if len(forms) == 1:
        return next(iter(forms))
    ref = reference or ("fp32" if "fp32" in forms else next(iter(forms)))
    runners = {
        k: runner(f if isinstance(f, OnnxModel) else OnnxModel(f, threads=threads))
        for k, f in forms.items()
    }
    stats = measure_latency(runners, inputs, warmup=2, repeats=repeats, threads=threads)
    best = min(stats, key=lambda k: stats[k].median_ms)
    if best != ref and stats[best].median_ms > _MARGIN * stats[ref].median_ms:
        return ref
    return best


def choose_form(
    forms: Mapping[str, bytes],
    inputs: Any,
    threads: int = 1,
    sessions: Mapping[str, OnnxModel] | None = None,
    fidelity: Fidelity | None = None,
    max_bytes: int | None = None,
) -> str:
    """What ``"auto"`` ships: among the forms within :data:`SIZE_SLACK` of the smallest file
    (and at most ``max_bytes``, see :func:`small_forms`), the fastest on ``inputs`` that holds
    fidelity.

    Exact forms (``fp32``, ``lowbit``) always hold it. A form with int8 activations is a
    candidate only with a ``fidelity`` check (calibration batches, tolerance, optional check
    function), and ships only if it passes it and is >5% faster than the fastest exact
    candidate. Without ``fidelity`` the choice is among the exact forms: the smallest unless
    another is >5% faster. ``sessions`` may hold open sessions of some forms (reused).

    Example:
        >>> import torch
        >>> forms = deploy_forms(nn.Linear(4, 2), torch.randn(3, 4))
        >>> choose_form(forms, as_numpy(torch.randn(8, 4)))
        'fp32'
    """
    small = small_forms(forms, max_bytes=max_bytes)
    exact = [k for k in small if is_exact(k)]
    if not exact:  # no exact form within the size slack: fidelity first, the smallest exact one
        exact = small_forms({k: v for k, v in forms.items() if is_exact(k)}, slack=1.0)
    cands = exact + ([k for k in small if not is_exact(k)] if fidelity is not None else [])
    if len(cands) == 1:
        return cands[0]
    given = dict(sessions or {})
    opened = {k: given.get(k) or OnnxModel(forms[k], threads=threads) for k in cands}
    if fidelity is None or len(cands) == len(exact):
        return fastest_form(opened, inputs, threads=threads, reference=exact[0])
    runners = {k: runner(m) for k, m in opened.items()}
    stats = measure_latency(runners, inputs, warmup=2, repeats=7, threads=threads)
    best_exact = min(exact, key=lambda k: stats[k].median_ms)
    if best_exact != exact[0] and stats[best_exact].median_ms > _MARGIN * stats[exact[0]].median_ms:
        best_exact = exact[0]
    bar = _MARGIN * stats[best_exact].median_ms
    fidelity.set_reference(opened[exact[0]])
    for k in sorted(cands, key=lambda k: stats[k].median_ms):
        if is_exact(k) or stats[k].median_ms > bar:
            break
        if fidelity.accepts(k, opened[k]):
            return k
    return best_exact


def to_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: str | Path,
    *,
    int8: str | bool = "auto",
    batch_size: int = 256,
    threads: int = 1,
    output: str | int | None = None,
    form: str | None = None,
    calibration: Any = None,
    tolerance: float | None = None,
    check: Callable[[OnnxModel], bool] | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Write the deployment form of ``model`` to ``path`` as ONNX (opset 18, dynamic batch axis).

    The model is exported as is: a width-shrunk or factorized model has really smaller layers;
    pruned weights stay dense (zeros). Quantized weights (per ``quant_records``) are stored as
    their own codes in the ``lowbit`` form (``MatMulNBits`` for Linear layers,
    ``GatherBlockQuantized`` for embeddings, ``DequantizeLinear`` or a codebook ``Gather``
    otherwise: the same weights as the torch model); Linear-type layers with <= 8-bit uniform
    codes can also run with int8 activations quantized at run time (``int8``: ONNX Runtime
    dynamic quantization, ``MatMulInteger``; ``lowbit_int8``: ``MatMulNBits`` with
    ``accuracy_level=4``), so their outputs move: ``"auto"`` ships one of those only when
    ``calibration`` batches show its outputs within ``tolerance`` of the exact form's (and
    ``check`` accepts it); without ``calibration`` it ships an exact form (fidelity first).

    Args:
        model: the (compressed) torch model; it is not modified.
        example_input: a batch of real inputs (any batch size; used for tracing and timing): a
            tensor, a tuple or a dict of tensors (Hugging Face ``input_ids``,
            ``attention_mask`` ...; the ONNX inputs are named after the keys, and token inputs
            get a dynamic sequence axis).
        path: the ``.onnx`` file to write (atomically: temporary file, then rename).
        int8: ``"auto"`` writes, among the forms whose file is within 1.25x of the smallest,
            the fastest at ``batch_size`` with ``threads`` threads (the smallest unless another
            is >5% faster) that holds fidelity: an exact form (``fp32``, ``lowbit``), or, with
            ``calibration``, a form with int8 activations that passed the check; ``True`` the
            int8 form unchecked (fp32 when it does not apply); ``False`` always fp32.
        batch_size: the batch size ``"auto"`` optimizes for.
        threads: ONNX Runtime threads ``"auto"`` times with.
        output: which output the graph returns when the model answers with a dict,
            ``ModelOutput`` or tuple (a field name or index; default ``logits``, else
            ``last_hidden_state``, else the first tensor; a tensor or flat tuple whole).
        form: ``"fp32"``, ``"int8"``, ``"lowbit"`` or ``"lowbit_int8"`` to write that form (an
            error if it does not apply to this model); overrides ``int8``.
        calibration: real input batches (one batch, or a list of batches, as the model is
            called) on which ``"auto"`` checks the forms with int8 activations; use data the
            model will see (e.g. validation inputs), not the test split.
        tolerance: largest ``1 - mean cosine`` between each example's outputs in such a form
            and in the exact form on ``calibration``; default 1e-3 without ``check``, not
            applied with one (unless given).
        check: optional ``check(onnx_model) -> bool`` a form with int8 activations must pass
            (e.g. the task metric on validation data against a constraint: what the search
            does); it needs ``calibration``.
        max_bytes: with ``"auto"``, ship no form larger than this (e.g. 1.25x the artifact's
            ``size_bytes``, so a 4-bit model does not deploy as an int8 file twice its size).
            When no form fits, the smallest form that holds fidelity ships: the smallest one
            if it is exact or passes the check, else the smallest exact form.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. The chosen form is in the file's metadata
        (``OnnxModel(path).form``).

    Example:
        >>> import tempfile
        >>> from autocompress.deploy import load_onnx
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> p = to_onnx(net, torch.randn(3, 4), tempfile.mkdtemp() + "/net.onnx")
        >>> p.name, load_onnx(p)(torch.randn(37, 4)).shape
        ('net.onnx', torch.Size([37, 2]))
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise AutocompressError(f"directory {str(path.parent)!r} does not exist: create it first")
    data = onnx_form(
        model,
        example_input,
        int8=int8,
        batch_size=batch_size,
        threads=threads,
        output=output,
        form=form,
        calibration=calibration,
        tolerance=tolerance,
        check=check,
        max_bytes=max_bytes,
    )
    atomic_write(path, data)
    return path


def onnx_form(
    model: nn.Module,
    example_input: Inputs,
    *,
    int8: str | bool = "auto",
    batch_size: int = 256,
    threads: int = 1,
    output: str | int | None = None,
    form: str | None = None,
    calibration: Any = None,
    tolerance: float | None = None,
    check: Callable[[OnnxModel], bool] | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """The serialized deployment form :func:`to_onnx` writes (same arguments, no file).

    Example:
        >>> data = onnx_form(nn.Linear(4, 2), torch.randn(3, 4))
        >>> OnnxModel(data).form
        'fp32'
    """
    if int8 not in INT8_CHOICES or (isinstance(int8, str) and int8 != "auto"):
        raise AutocompressError(f"int8={int8!r} is not allowed: use 'auto', True or False")
    if form is not None and form not in FORMS:
        raise AutocompressError(f"form={form!r} is unknown: use one of {list(FORMS)} or None")
    fidelity = None
    if calibration is not None:
        fidelity = Fidelity(as_batches(calibration), tolerance, check)
    elif check is not None:
        raise AutocompressError("check needs calibration batches too: pass calibration=...")
    else:
        Fidelity([None], tolerance)  # validates the tolerance
    if form is not None:
        forms = deploy_forms(
            model,
            example_input,
            int8=form in ("int8", "lowbit_int8", "int8_token"),
            output=output,
            lowbit=form == "lowbit",
        )
        if form not in forms:
            raise AutocompressError(
                f"the {form} form does not apply to this model (no quantized weight it can "
                "carry, or it did not reproduce the fp32 form): use form=None"
            )
        return forms[form]
    auto = int8 == "auto"
    approx = int8 is True or (auto and fidelity is not None)
    forms = deploy_forms(model, example_input, int8=approx, output=output, lowbit=auto)
    if auto:
        x = as_numpy(tile_batch(example_input, batch_size))
        name = choose_form(forms, x, threads=threads, fidelity=fidelity, max_bytes=max_bytes)
    else:
        name = "int8" if int8 and "int8" in forms else "fp32"
    return forms[name]
