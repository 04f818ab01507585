"""``to_onnx``: the deployment form of a compressed model, fp32 or int8, whichever runs faster."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.artifacts._io import atomic_write
from autocompress.deploy._export import export_fp32
from autocompress.deploy._int8 import int8_form
from autocompress.deploy._latency import measure_latency
from autocompress.deploy._runtime import OnnxModel
from autocompress.deploy._signature import tile_rows
from autocompress.errors import AutocompressError
from autocompress.tasks._batch import Inputs, batch_len

INT8_CHOICES = ("auto", True, False)
# An int8 form must beat fp32 by this factor to be chosen: on a tie, keep the exact fp32 form.
_MARGIN = 0.95


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
) -> dict[str, bytes]:
    """Serialized ONNX forms of ``model``: ``fp32`` always, ``int8`` if asked for and it applies
    (some Linear-type layer has uniform <= 8-bit weights). ``example_input`` and ``output``: see
    :func:`~autocompress.deploy.export_fp32`.

    Example:
        >>> sorted(deploy_forms(nn.Linear(4, 3), torch.randn(2, 4)))
        ['fp32']
    """
    fp32 = export_fp32(model, example_input, output=output)
    out = {"fp32": fp32.SerializeToString()}
    q = int8_form(fp32, model) if int8 else None
    if q is not None:
        out["int8"] = q.SerializeToString()
    return out


def fastest_form(
    forms: Mapping[str, bytes | OnnxModel],
    inputs: Any,
    threads: int = 1,
    repeats: int = 7,
) -> str:
    """The name of the fastest form on ``inputs`` (fp32 unless an int8 form is >5% faster).

    ``forms`` maps names to serialized ONNX or open :class:`OnnxModel` sessions.
    """
    if len(forms) == 1:
        return next(iter(forms))
    runners = {
        k: runner(f if isinstance(f, OnnxModel) else OnnxModel(f, threads=threads))
        for k, f in forms.items()
    }
    stats = measure_latency(runners, inputs, warmup=2, repeats=repeats, threads=threads)
    best = min(stats, key=lambda k: stats[k].median_ms)
    if best != "fp32" and stats[best].median_ms > _MARGIN * stats["fp32"].median_ms:
        return "fp32"
    return best


def to_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: str | Path,
    *,
    int8: str | bool = "auto",
    batch_size: int = 256,
    threads: int = 1,
    output: str | int | None = None,
) -> Path:
    """Write the deployment form of ``model`` to ``path`` as ONNX (opset 18, dynamic batch axis).

    The model is exported as is: a width-shrunk or factorized model has really smaller layers;
    pruned weights stay dense (zeros). Linear-type layers quantized to <= 8 bits (uniform scheme,
    per ``quant_records``) can run as int8 through ONNX Runtime dynamic quantization (their exact
    per-channel codes as int8 weights, uint8 activations quantized at run time); other layers,
    convolutions included, stay fp32.

    Args:
        model: the (compressed) torch model; it is not modified.
        example_input: a batch of real inputs (any batch size; used for tracing and timing): a
            tensor, a tuple or a dict of tensors (Hugging Face ``input_ids``,
            ``attention_mask`` ...; the ONNX inputs are named after the keys, and token inputs
            get a dynamic sequence axis).
        path: the ``.onnx`` file to write (atomically: temporary file, then rename).
        int8: ``"auto"`` writes the int8 form if it runs >5% faster than fp32 at ``batch_size``
            with ``threads`` threads, else fp32; ``True`` the int8 form (fp32 when it does not
            apply); ``False`` always fp32.
        batch_size: the batch size ``"auto"`` optimizes for.
        threads: ONNX Runtime threads ``"auto"`` times with.
        output: which output the graph returns when the model answers with a dict,
            ``ModelOutput`` or tuple (a field name or index; default ``logits``, else
            ``last_hidden_state``, else the first tensor; a tensor or flat tuple whole).

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
        model, example_input, int8=int8, batch_size=batch_size, threads=threads, output=output
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
) -> bytes:
    """The serialized deployment form :func:`to_onnx` writes (same arguments, no file).

    Example:
        >>> data = onnx_form(nn.Linear(4, 2), torch.randn(3, 4))
        >>> OnnxModel(data).form
        'fp32'
    """
    if int8 not in INT8_CHOICES or (isinstance(int8, str) and int8 != "auto"):
        raise AutocompressError(f"int8={int8!r} is not allowed: use 'auto', True or False")
    forms = deploy_forms(model, example_input, int8=bool(int8), output=output)
    if int8 == "auto":
        x = as_numpy(tile_batch(example_input, batch_size))
        form = fastest_form(forms, x, threads=threads)
    else:
        form = "int8" if int8 and "int8" in forms else "fp32"
    return forms[form]
