"""Fidelity of the deployment forms that do not compute the PyTorch model exactly.

Two forms run exactly the model's weights in floating point: ``fp32`` and ``lowbit`` (the
artifact's codes, decoded or multiplied in fp32). The others also round *activations* to 8
bits at run time, so their outputs move by an amount only data can tell: ``int8`` (ONNX
Runtime dynamic quantization: ``MatMulInteger``, one uint8 scale per tensor), ``int8_token``
(``MatMulInteger`` with one uint8 scale and zero point per token: :mod:`._token8`) and
``lowbit_int8`` (``MatMulNBits`` with ``accuracy_level=4``: int8 activations with one scale
per block of the inner dimension).

:class:`Fidelity` is the check such a form must pass before ``to_onnx(int8="auto")`` ships it,
on calibration batches: the caller's own ``check`` (e.g. the task metric against a
constraint) when given, else the outputs' distance to the exact form's (:func:`output_error`
<= ``tolerance``; both when a tolerance is also given). Without calibration data nothing can
be checked, and ``"auto"`` ships an exact form (fidelity first).

On all-MiniLM-L6-v2 (Linear 8-bit + word embedding 4-bit, 64 sentences) an ``output_error``
of 1.1e-3 went with a 0.0006 drop of the mean-pooled sentence cosine to the teacher, 1.2e-2
with a 0.005 drop (``benchmarks/onnx_forms.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autocompress.errors import AutocompressError

LOG = logging.getLogger("autocompress.deploy")
EXACT_FORMS = ("fp32", "lowbit")
"""Forms computing the PyTorch model's weights with fp32 activations (no fidelity check)."""
TOLERANCE = 1e-3
"""Default bound of :func:`output_error` (1 - mean per-example cosine to the exact form) when no
``check`` is given."""


def is_exact(form: str) -> bool:
    """True for a form that computes the model exactly (``fp32``, ``lowbit``).

    Example:
        >>> is_exact("lowbit"), is_exact("int8"), is_exact("lowbit_int8")
        (True, False, False)
    """
    return form in EXACT_FORMS


def as_batches(calibration: Any) -> list[Any]:
    """Calibration data as a list of batches: a list holds batches; anything else (a tensor, a
    tuple of tensors, a dict of tensors) is one batch.

    Example:
        >>> import torch
        >>> len(as_batches(torch.zeros(4, 2))), len(as_batches([torch.zeros(4, 2)] * 3))
        (1, 3)
    """
    if isinstance(calibration, list):
        if not calibration:
            raise AutocompressError("calibration is an empty list: pass at least one batch")
        return calibration
    return [calibration]


def _rows(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Each example's outputs flattened into one row (float64)."""
    n = len(outputs[0])
    return np.concatenate([np.asarray(o, np.float64).reshape(n, -1) for o in outputs], axis=1)


def output_error(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Any]) -> float:
    """``1 - mean cosine`` between each example's outputs (all outputs of an example flattened
    into one vector) in ``candidate`` and in ``reference``: 0 for identical outputs.

    Both are lists (one entry per batch) of the graph's output arrays.

    Example:
        >>> a = [[np.array([[1.0, 0.0], [0.0, 2.0]])]]
        >>> output_error(a, a)
        0.0
        >>> round(output_error(a, [[np.array([[1.0, 1.0], [0.0, 2.0]])]]), 4)
        0.1464
    """
    cos = []
    for r, c in zip(reference, candidate, strict=True):
        a, b = _rows(r), _rows(c)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        same = np.all(a == b, axis=1)
        cos.append(np.where(same, 1.0, (a * b).sum(1) / np.where(den == 0, 1.0, den)))
    return float(1.0 - np.concatenate(cos).mean())


@dataclass
class Fidelity:
    """What a form that is not exact must pass to be shipped.

    Args:
        batches: calibration batches (as the model is called; see :func:`as_batches`).
        tolerance: largest :func:`output_error` to the exact form on ``batches``; ``None``
            (default): :data:`TOLERANCE` without a ``check``, not applied with one.
        check: an optional ``check(onnx_model) -> bool`` run on the candidate
            :class:`~autocompress.deploy.OnnxModel` (e.g. the task metric on validation data
            against a constraint); False rejects the form.

    ``verdicts`` collects ``{form: (error, accepted)}`` of the forms checked.
    """

    batches: list[Any]
    tolerance: float | None = None
    check: Callable[[Any], bool] | None = None
    verdicts: dict[str, tuple[float, bool]] = field(default_factory=dict)
    _reference: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.check is not None and not callable(self.check):
            raise AutocompressError("check must be a function check(onnx_model) -> bool")
        t = self.tolerance
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2:
            raise AutocompressError(f"tolerance={t!r} must be a number in [0, 2] (1 - cosine)")

    def outputs(self, model: Any) -> list[Any]:
        """``model``'s outputs (numpy) on every calibration batch."""
        from autocompress.deploy._onnx import as_numpy, runner

        run = runner(model)
        return [run(as_numpy(b)) for b in self.batches]

    def set_reference(self, model: Any) -> None:
        """Outputs of the exact form every candidate is compared with."""
        self._reference = self.outputs(model)

    def error(self, model: Any) -> float:
        """:func:`output_error` of ``model`` to the reference form on the batches."""
        if self._reference is None:
            raise AutocompressError("Fidelity.set_reference(exact form) must be called first")
        return output_error(self._reference, self.outputs(model))

    def accepts(self, name: str, model: Any) -> bool:
        """Whether form ``name`` (open as ``model``) may ship; the verdict is logged."""
        err = self.error(model)
        tol = self.tolerance if self.tolerance is not None or self.check else TOLERANCE
        ok = tol is None or err <= tol
        why = f"output error {err:.3g}" + ("" if tol is None else f", tolerance {tol:g}")
        if ok and self.check is not None:
            ok = bool(self.check(model))
            why += "; check " + ("passed" if ok else "failed")
        self.verdicts[name] = (err, ok)
        LOG.info("ONNX form %s %s (%s)", name, "accepted" if ok else "rejected", why)
        return ok
