"""``OnnxModel``: an ONNX file run by ONNX Runtime behind a torch-like call."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autocompress.deploy._deps import onnxruntime
from autocompress.deploy._export import FORM_INPUTS, FORM_KEY, FORM_OUTPUT
from autocompress.errors import ArtifactError, AutocompressError

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
CPU = ("CPUExecutionProvider",)


def session_options(threads: int):
    """ONNX Runtime options with intra- and inter-op threads pinned and sequential execution."""
    ort = onnxruntime()

    if not (isinstance(threads, int) and threads >= 1):
        raise AutocompressError(f"threads={threads!r} must be an integer >= 1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class OnnxModel:
    """A callable ``input -> torch.Tensor`` backed by an ``onnxruntime.InferenceSession``.

    Called like the torch model it was exported from: numpy arrays or torch tensors positionally
    (one per graph input) or by keyword (``om(**batch)`` with ``input_ids``, ``attention_mask``
    ...; integer ids stay int64; non-array keywords such as ``use_cache=False`` are ignored).
    Returns a torch tensor (a tuple for several outputs), or ``{field: tensor}`` when the torch
    model answered with a dict or ``ModelOutput`` (the exported field, e.g. ``logits``). It has
    ``eval()``/``training`` so ``Task.evaluate`` can score it like an ``nn.Module``; it cannot be
    trained.

    Args:
        model: path of an ``.onnx`` file, or its bytes.
        threads: ``intra_op_num_threads`` (``inter_op_num_threads`` is 1); 1 gives the most
            repeatable latency.
        providers: ONNX Runtime execution providers, CPU by default. GPU users (with the
            ``onnxruntime-gpu`` package) pass ``("CUDAExecutionProvider", "CPUExecutionProvider")``.

    Example:
        >>> import tempfile, torch
        >>> from autocompress.deploy import to_onnx
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> path = to_onnx(net, torch.randn(2, 4), tempfile.mkdtemp() + "/m.onnx")
        >>> om = OnnxModel(path)
        >>> om(torch.ones(5, 4)).shape, om.form
        (torch.Size([5, 3]), 'fp32')
    """

    training = False

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        threads: int = 1,
        providers: Sequence[str] = CPU,
    ) -> None:
        ort = onnxruntime()
        self.path = None if isinstance(model, bytes) else Path(model)
        self.threads = threads
        if self.path is not None and not self.path.is_file():
            raise ArtifactError(f"no ONNX file at {str(self.path)!r}: export one with to_onnx()")
        src = model if isinstance(model, bytes) else str(self.path)
        opts = session_options(threads)
        try:
            self.session = ort.InferenceSession(src, opts, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - ORT raises several private exception types
            where = "ONNX bytes" if self.path is None else repr(str(self.path))
            msg = " ".join(str(e).split())[:200]
            raise ArtifactError(
                f"{where} is not a loadable ONNX model ({type(e).__name__}: {msg}): "
                "re-export it with to_onnx()"
            ) from None
        self.inputs = [(i.name, _DTYPES.get(i.type)) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.form = meta.get(FORM_KEY, "unknown")
        # The export's input names (an input the model ignores may be absent from the graph).
        self.input_names = json.loads(meta[FORM_INPUTS]) if FORM_INPUTS in meta else None
        self.input_names = self.input_names or [n for n, _ in self.inputs]
        self.output_form = meta.get(FORM_OUTPUT, "tensor")

    def _feed(self, xs: tuple, kw: dict[str, Any]) -> dict[str, np.ndarray]:
        if xs and kw:
            raise AutocompressError(
                "pass the ONNX model's inputs positionally or by name, not both"
            )
        if kw:
            arrays = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor | np.ndarray)}
            unknown = sorted(set(arrays) - set(self.input_names))
            if unknown:
                raise AutocompressError(
                    f"the ONNX model has no input {unknown[0]!r}: its inputs are {self.input_names}"
                )
        else:
            if len(xs) != len(self.input_names):
                raise AutocompressError(
                    f"the ONNX model takes {len(self.input_names)} input(s) "
                    f"{self.input_names}, got {len(xs)}: pass one array or tensor per input"
                )
            arrays = dict(zip(self.input_names, xs, strict=True))
        feed = {}
        for name, dtype in self.inputs:
            if name not in arrays:
                raise AutocompressError(
                    f"the ONNX model needs input {name!r}: pass it (inputs: {self.input_names})"
                )
            x = arrays[name]
            a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if dtype is not None and a.dtype != dtype:
                a = a.astype(dtype)
            feed[name] = np.ascontiguousarray(a)
        return feed

    def run_numpy(self, *xs: np.ndarray, **kw: Any) -> list[np.ndarray]:
        """The raw ONNX Runtime outputs for numpy inputs (what latency measurement times)."""
        return self.session.run(self.output_names, self._feed(xs, kw))

    def __call__(
        self, *xs: torch.Tensor | np.ndarray, **kw: Any
    ) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
        outs = [torch.from_numpy(o) for o in self.run_numpy(*xs, **kw)]
        if self.output_form == "dict":
            return dict(zip(self.output_names, outs, strict=True))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def eval(self) -> OnnxModel:
        """No-op (an ONNX model is always in inference mode); returns ``self``."""
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        """Only ``train(False)`` is allowed: an ONNX deployment model cannot be trained."""
        if mode:
            raise AutocompressError(
                "an OnnxModel cannot be trained: fine-tune the torch model, then export it again"
            )
        return self

    def __repr__(self) -> str:
        src = "bytes" if self.path is None else str(self.path)
        return f"OnnxModel({src!r}, form={self.form!r}, threads={self.threads})"


def load_onnx(path: str | Path, threads: int = 1, providers: Sequence[str] = CPU) -> OnnxModel:
    """Open an ONNX file written by :func:`to_onnx` for inference with ONNX Runtime.

    Raises :class:`ArtifactError` if the file is missing or is not a valid ONNX model.

    Example:
        >>> load_onnx("/nonexistent/model.onnx")
        Traceback (most recent call last):
        ...
        autocompress.errors.ArtifactError: no ONNX file at '/nonexistent/model.onnx': ...
    """
    return OnnxModel(path, threads=threads, providers=providers)
