"""Batches and outputs as real models see them: tensors, tuples, dicts and ``ModelOutput``s.

The one contract every part of autocompress uses to feed a model and read its answer:

- a *batch* (what a data source yields) is a tensor, a tuple/list ``(inputs..., targets)``, or a
  mapping as Hugging Face tokenizers and collators produce (``input_ids``, ``attention_mask``,
  ..., ``labels``);
- model *inputs* are a tensor (``model(x)``), a tuple (``model(*xs)``) or a dict
  (``model(**kw)``);
- a model *output* is a tensor, a tuple/list, a dict or a ``transformers`` ``ModelOutput`` (an
  ordered dict); :func:`pick_output` selects the tensor the loss, distillation and metric use
  (``logits``, else ``last_hidden_state``, else the first tensor), or the one a setting names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autocompress.errors import AutocompressError

#: Keys of a dict batch that hold targets, not model inputs (tried in this order).
LABEL_KEYS: tuple[str, ...] = ("labels", "label", "targets", "target", "y")
#: Output keys tried in order when no output is named.
OUTPUT_KEYS: tuple[str, ...] = ("logits", "last_hidden_state")

Inputs = torch.Tensor | tuple[Any, ...] | dict[str, Any]


def split_batch(batch: Any, label_key: str | None = None) -> tuple[Inputs, Any]:
    """``(inputs, targets)`` of one batch; ``targets`` is ``None`` for unlabeled data.

    A tensor is all inputs; a pair is ``(inputs, targets)``; a longer tuple is
    ``(*inputs, targets)``; a mapping gives every key but the label key as keyword inputs.

    Example:
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> split_batch((x, y))[1].tolist()
        [0, 1]
        >>> sorted(split_batch({"input_ids": x, "labels": y})[0])
        ['input_ids']
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        keys = (label_key,) if label_key else LABEL_KEYS
        key = next((k for k in keys if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != key}
        if not inputs:
            raise AutocompressError(f"batch has no model inputs besides {key!r}: got {list(batch)}")
        return inputs, (batch[key] if key is not None else None)
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        items = tuple(batch)
        if len(items) == 1:
            return items[0], None
        if len(items) == 2:
            return items[0], items[1]
        if len(items) > 2:
            return items[:-1], items[-1]
    raise AutocompressError(
        f"a batch of type {type(batch).__name__} is not understood: "
        "yield a tensor, a tuple (inputs..., targets) or a dict of tensors"
    )


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` as the inputs' form says."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def pick_output(out: Any, key: str | int | None = None) -> torch.Tensor:
    """The tensor of a model output that losses and metrics use.

    ``key`` names a dict/``ModelOutput`` field or a tuple index; by default ``logits``, else
    ``last_hidden_state``, else the first tensor.

    Example:
        >>> pick_output({"last_hidden_state": torch.ones(1), "pooler": torch.zeros(1)}).item()
        1.0
        >>> pick_output((torch.zeros(1), torch.ones(1)), 1).item()
        1.0
    """
    if isinstance(out, torch.Tensor):
        if key not in (None, 0):
            raise AutocompressError(f"output={key!r} names a field, but the model returns a tensor")
        return out
    if isinstance(out, Mapping):
        if key is not None:
            if key not in out or not isinstance(out[key], torch.Tensor):
                fields = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
                raise AutocompressError(f"model output has no tensor {key!r}: it has {fields}")
            return out[key]
        for k in OUTPUT_KEYS:
            if isinstance(out.get(k), torch.Tensor):
                return out[k]
        values = list(out.values())
    elif isinstance(out, Sequence) and not isinstance(out, str):
        if key is not None:
            if not isinstance(key, int) or not -len(out) <= key < len(out):
                raise AutocompressError(
                    f"output={key!r} is not an index of the model's {len(out)} outputs"
                )
            return pick_output(out[key])
        values = list(out)
    else:
        raise AutocompressError(f"model output of type {type(out).__name__} holds no tensor")
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, Mapping | Sequence) and not isinstance(v, str):
            try:
                return pick_output(v)
            except AutocompressError:
                continue
    raise AutocompressError(f"model output of type {type(out).__name__} holds no tensor")


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_len(inputs: Inputs) -> int:
    """Number of examples in ``inputs`` (the first dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return len(inputs)
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return len(v)
    raise AutocompressError("inputs hold no batched tensor")


def take(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` examples of ``inputs`` (each batched tensor sliced, cloned)."""

    def cut(v: Any) -> Any:
        return v[:n].clone() if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    if isinstance(inputs, torch.Tensor):
        return cut(inputs)
    if isinstance(inputs, Mapping):
        return {k: cut(v) for k, v in inputs.items()}
    return tuple(cut(v) for v in inputs)


def select(inputs: Any, idx: torch.Tensor | slice) -> Any:
    """``inputs`` (a tensor, tuple or dict, or a whole in-memory batch) at example indices
    ``idx``: every batched tensor is indexed, anything else is kept as it is.

    Example:
        >>> select({"ids": torch.arange(4), "n": 3}, torch.tensor([2, 0]))["ids"].tolist()
        [2, 0]
    """
    if isinstance(inputs, torch.Tensor):
        return inputs[idx]
    if isinstance(inputs, Mapping):
        return {k: select(v, idx) if _batched(v) else v for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(select(v, idx) if _batched(v) else v for v in inputs)
    return inputs


def _batched(v: Any) -> bool:
    return isinstance(v, Mapping | tuple | list) or (isinstance(v, torch.Tensor) and v.dim() > 0)


def model_device(model: nn.Module) -> torch.device:
    """Device of ``model``'s first parameter (or buffer); CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
