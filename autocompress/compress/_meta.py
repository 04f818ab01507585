"""Quantization records attached to a compressed model.

The engine leaves every compressed weight *baked*: pruned entries are exact zeros and quantized
weights hold exactly the values the artifact stores (``code * scale`` or ``codebook[code]``, all
scales and codebooks representable in fp16). The record of how each weight was quantized is kept
on the model as the attribute ``QUANT_ATTR`` (a plain dict, so ``copy.deepcopy`` keeps it), keyed
by the parameter's fully qualified name (``"fc1.weight"``, ``"fc1.0.weight"`` for a factorized
layer, ``"lstm.weight_ih_l0"`` for a parameter-level layer). A tied tensor (one ``nn.Parameter``
held by several modules, e.g. GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``) has the
same record object under *every* name it has in the state dict, so whichever name an artifact
stores it under finds its record. Artifacts read these records to encode codes; nothing here is
pickled.

Conventions (shared with ``autocompress.artifacts``):

* ``scheme == "uniform"``: symmetric per-output-channel, the channels on dim ``axis`` (0, except
  1 for Hugging Face ``Conv1D`` whose weight is stored ``(in, out)``). Integer codes
  ``q in [-(2**(bits-1) - 1), 2**(bits-1) - 1]``, weight ``= q * scale[c]`` computed in fp32
  (``c`` the index along ``axis``), with ``scale`` a float32 tensor of shape
  ``(weight.shape[axis],)`` whose values are fp16-exact. ``bits=2`` is ternary {-1, 0, 1}.
* Group-wise uniform (``group > 0``, one of :data:`GROUPS`): ``group`` consecutive weights
  along the *input* dimension share one scale. View the weight as ``(out, n_in)``: dim ``axis``
  moved first, every other dim flattened in its natural order (``Conv2d``: ``in * kh * kw``;
  ``Embedding``: rows are channels, groups run along the embedding dim). ``scale`` then has
  shape ``(out, ceil(n_in / group))`` and weight ``= q * scale[c, j // group]``; the last group
  of a row may be partial. This is the layout of ONNX ``MatMulNBits`` (blocks of ``block_size``
  along K) and ``GatherBlockQuantized`` (``quantize_axis`` last, ``block_size = group``).
* ``scheme == "codebook"``: ``codebook`` a float32 tensor of ``2**bits`` fp16-exact values with
  ``codebook[0] == 0.0`` (so pruned zeros have a code); weight ``= codebook[code]``.
* ``scheme == "fp16"``: ``bits == 16``; the weight is fp16-exact, no scale.
* The ``bias`` of any module whose ``weight`` has a record is fp16-exact too (parameter-level
  weights such as ``lstm.weight_ih_l0`` leave their biases as they are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocompress.spaces._knobs import ALLOWED_GROUPS

QUANT_ATTR = "_autocompress_quant"
GROUPS: tuple[int, ...] = tuple(g for g in ALLOWED_GROUPS if g)
"""Allowed nonzero group sizes of group-wise uniform scales (powers of two, as ONNX's
``MatMulNBits``/``GatherBlockQuantized`` need); ``0`` is one scale per output channel."""


@dataclass
class QuantRecord:
    """How one weight tensor was quantized (see module docstring for the conventions)."""

    bits: int
    scheme: str  # "uniform" | "codebook" | "fp16"
    scale: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    axis: int = 0  # dim of the output channels the uniform scales follow
    group: int = 0  # weights along the input dim sharing one scale; 0: one per channel


def quant_records(model: nn.Module) -> dict[str, QuantRecord]:
    """The records of ``model`` (an empty dict for an uncompressed model)."""
    return getattr(model, QUANT_ATTR, {})


def set_quant_records(model: nn.Module, records: dict[str, QuantRecord]) -> None:
    """Attach ``records`` to ``model`` (replacing any previous ones)."""
    object.__setattr__(model, QUANT_ATTR, dict(records))


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest fp16 value, returned as float32."""
    return t.detach().to(torch.float16).to(torch.float32)
