"""``Task.from_hf``: a raw Hugging Face ``transformers`` model and tokenized data as a Task.

No wrapper: batches are dicts (``input_ids``, ``attention_mask``, ``token_type_ids``, ...,
``labels``) passed as ``model(**inputs)``, and the loss, distillation and metric read the
``ModelOutput``'s ``logits`` (else ``last_hidden_state``, or the field ``output=`` names). The
architecture is rebuilt from ``model.config`` (random init, nothing downloaded), which is all
``load(path, model=task.build_model())`` needs. ``transformers`` is an optional extra.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from autocompress.errors import AutocompressError
from autocompress.tasks._base import Metric, Task, TrainSettings, accuracy_metric
from autocompress.tasks._batch import LABEL_KEYS
from autocompress.tasks._data import DictDataset

INSTALL_HINT = 'pip install "autocompress[hf]"'


def require_transformers() -> Any:
    """The ``transformers`` module, or a one-line error with the install command."""
    try:
        import transformers
    except ImportError as e:
        raise AutocompressError(f"Hugging Face models need transformers: {INSTALL_HINT}") from e
    return transformers


def infer_kind(model: nn.Module) -> str:
    """``"regression"`` for a one-label sequence regressor, ``"classification"`` for a model
    with a task head (``...ForSequenceClassification``, ``...ForCausalLM``,
    ``...LMHeadModel``, ...), else
    ``"embedding"`` (a bare encoder such as ``BertModel``)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if "For" not in name and "LMHead" not in name:  # GPT2LMHeadModel has a head, no "For"
        return "embedding"
    if getattr(config, "problem_type", None) == "regression" or (
        "SequenceClassification" in name and getattr(config, "num_labels", 2) == 1
    ):
        return "regression"
    return "classification"


def _pad(values: list[Any], key: str, pad_id: int) -> torch.Tensor:
    """Examples' values of one field as a tensor, 1-D sequences right-padded to one length."""
    ts = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
    if len({tuple(t.shape) for t in ts}) == 1:
        return torch.stack(ts)
    if any(t.dim() != 1 for t in ts):
        raise AutocompressError(
            f"field {key!r} has examples of different shapes that are not 1-D sequences: "
            "pad them yourself or pass a DataLoader with your collator"
        )
    fill = -100 if key in LABEL_KEYS else (pad_id if key == "input_ids" else 0)
    out = torch.full((len(ts), max(len(t) for t in ts)), fill, dtype=ts[0].dtype)
    for i, t in enumerate(ts):
        out[i, : len(t)] = t
    return out


def _columns(model: nn.Module, label_key: str | None) -> set[str] | None:
    """Batch keys the model's ``forward`` names, plus label keys (``None``: keep every key);
    ``**kwargs`` of HF models carry attention flags, not data columns, so they admit nothing."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named | set(LABEL_KEYS) | ({label_key} if label_key else set())


def hf_split(model: nn.Module, split: str, data: Any, label_key: str | None = None) -> Any:
    """One split as a Task data source: a ``DataLoader`` as given; a dict of tensors or of
    lists (a tokenizer's ``BatchEncoding``), a list of example dicts or a ``datasets.Dataset``
    collated once into padded tensors (columns ``forward`` does not take are dropped)."""
    if isinstance(data, DataLoader):
        return data
    keep = _columns(model, label_key)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    if isinstance(data, Mapping):
        fields = {k: v for k, v in data.items() if keep is None or k in keep}
        cols = {
            k: v if isinstance(v, torch.Tensor) else _pad(list(v), k, pad_id)
            for k, v in fields.items()
        }
        return DictDataset(cols)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, str):
        n = len(data)
        examples = [data[i] for i in range(n)] if not isinstance(data, Sequence) else list(data)
        if n and all(isinstance(e, Mapping) for e in examples):
            keys = [k for k in examples[0] if keep is None or k in keep]
            return DictDataset({k: _pad([e[k] for e in examples], k, pad_id) for k in keys})
    raise AutocompressError(
        f"split {split!r} of type {type(data).__name__} is not tokenized data: pass a dict of "
        "tensors (tokenizer(..., return_tensors='pt') plus 'labels'), a list of example dicts, "
        "a datasets.Dataset or a DataLoader"
    )


def task_from_hf(
    model: nn.Module,
    train: Any,
    val: Any,
    test: Any,
    *,
    metric: Metric | None = None,
    metric_name: str | None = None,
    kind: str | None = None,
    name: str | None = None,
    output: str | int | None = None,
    label_key: str | None = None,
    eval_batch_size: int = 256,
    embedding_loss: str = "mse",
) -> Task:
    """A Task from a raw ``transformers`` model (the teacher, never modified) and tokenized
    train/val/test data.

    Args:
        model: a ``transformers`` ``PreTrainedModel``, e.g. ``BertForSequenceClassification``.
        train, val, test: dicts of tensors (``input_ids``, ``attention_mask``, ...,
            ``labels``), dicts of lists or lists of example dicts (padded here with the
            config's ``pad_token_id``, labels with -100), ``datasets.Dataset``s, or
            ``DataLoader``s yielding such dicts (used as given).
        metric: ``(outputs, targets[, teacher_outputs]) -> float``; default by ``kind``.
        kind: ``"classification"``, ``"regression"`` or ``"embedding"``; by default from the
            model class (a head -> classification, a bare encoder -> embedding).
        name: task name (default: the model class name).
        output: which output field the loss, the distillation and the metric use (default
            ``logits``, else ``last_hidden_state``).
        label_key: the batch key holding the labels (default ``labels``, ``label``, ...).
        eval_batch_size: batch size of evaluation on tensor data.
        embedding_loss: ``"mse"`` or ``"cosine"`` for ``kind="embedding"``.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=32)
        >>> bert = BertForSequenceClassification(cfg)
        >>> ids = torch.randint(1, 50, (8, 6))
        >>> data = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
        ...         "labels": torch.randint(0, 2, (8,))}
        >>> task = Task.from_hf(bert, data, data, data)
        >>> task.kind, sorted(task.example_input())
        ('classification', ['attention_mask', 'input_ids'])
    """
    transformers = require_transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise AutocompressError(
            f"Task.from_hf needs a transformers PreTrainedModel, got {type(model).__name__}: "
            "use Task.from_module for other models"
        )
    kind = kind or infer_kind(model)
    causal = "ForCausalLM" in type(model).__name__ or "LMHeadModel" in type(model).__name__
    splits = {
        s: hf_split(model, s, d, label_key)
        for s, d in (("train", train), ("val", val), ("test", test))
    }
    teacher = copy.deepcopy(model).eval()
    config = copy.deepcopy(model.config)
    cls = type(model)

    def build_model() -> nn.Module:
        return cls(copy.deepcopy(config))  # random init from the config: nothing downloaded

    return Task(
        name=name or cls.__name__,
        build_model=build_model,
        load_data=lambda: splits,
        metric=metric or accuracy_metric,
        metric_name=metric_name or ("accuracy" if metric is None else "score"),
        kind=kind,
        train=TrainSettings(),
        teacher_model=teacher,
        output=output,
        eval_batch_size=eval_batch_size,
        label_key=label_key,
        embedding_loss=embedding_loss,
        shift_labels=causal,  # HF shifts a causal LM's labels inside its loss; so do we
    )
