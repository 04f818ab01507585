"""Task: a model to compress, its data, how it is trained and how it is scored.

A Task owns the teacher (trained once and cached on disk by a hash of its settings), the
train/val/test splits and ``evaluate(model, split)``. The search optimizes on ``val`` and reports
the Pareto front on ``test``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.tasks._batch import (
    Inputs,
    call_model,
    model_device,
    pick_output,
    split_batch,
    take,
    to_device,
)
from autocompress.tasks._data import as_source, cat, full_batch, iter_batches

SPLITS = ("train", "val", "test")
KINDS = ("classification", "regression", "embedding")

#: ``(outputs, targets) -> float`` or ``(outputs, targets, teacher_outputs) -> float``.
Metric = Callable[..., float]

_SIGNATURE = "(outputs, targets) -> float or (outputs, targets, teacher_outputs) -> float"


def accuracy_metric(outputs: torch.Tensor, targets: torch.Tensor | None) -> float:
    """Top-1 accuracy of logits ``outputs`` (``(N, C)``, or ``(N, T, C)`` per token) against
    class indices ``targets``; positions labelled ``-100`` (Hugging Face padding) are skipped.

    Example:
        >>> accuracy_metric(torch.tensor([[0.1, 0.9], [2.0, 0.0]]), torch.tensor([1, 1]))
        0.5
    """
    if targets is None:
        raise AutocompressError(
            "the accuracy metric needs labels, but the split has none: pass metric=... "
            "(e.g. cosine_metric, which compares to the teacher)"
        )
    pred, y = outputs.argmax(dim=-1).reshape(-1), targets.reshape(-1)
    keep = y != -100
    return float((pred[keep] == y[keep]).float().mean().item())


def neg_mse_metric(outputs: torch.Tensor, targets: torch.Tensor | None) -> float:
    """Negative mean squared error to ``targets`` (higher is better; regression's default).

    Example:
        >>> neg_mse_metric(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0]))
        -2.0
    """
    if targets is None:
        raise AutocompressError("the neg_mse metric needs targets, but the split has none")
    t = targets.to(outputs.dtype)
    t = t.reshape(outputs.shape) if t.numel() == outputs.numel() else t
    return -float(torch.nn.functional.mse_loss(outputs, t).item())


def cosine_metric(
    outputs: torch.Tensor, targets: Any, teacher_outputs: torch.Tensor | None = None
) -> float:
    """Mean cosine similarity of ``outputs`` to the teacher's outputs along the last axis
    (1.0 for the teacher itself); an ``embedding`` task's default. Labels are not needed.

    Example:
        >>> e = torch.randn(4, 8)
        >>> round(cosine_metric(e, None, e), 4)
        1.0
    """
    ref = teacher_outputs if teacher_outputs is not None else targets
    if not isinstance(ref, torch.Tensor):
        raise AutocompressError("the cosine metric needs the teacher's outputs or target vectors")
    sim = torch.nn.functional.cosine_similarity(outputs.float(), ref.float(), dim=-1)
    return float(sim.mean().item())


def metric_arity(metric: Callable[..., Any]) -> int:
    """2 if ``metric`` takes ``(outputs, targets)``, 3 if it also takes ``teacher_outputs``.

    Raises a one-line :class:`AutocompressError` naming the function otherwise, so a wrong
    metric fails when the Task is built, not after the first fine-tune.

    Example:
        >>> metric_arity(lambda out, y: 1.0), metric_arity(cosine_metric)
        (2, 3)
    """
    name = getattr(metric, "__qualname__", None) or type(metric).__name__
    if not callable(metric):
        raise AutocompressError(f"metric {name!r} is not callable: pass a function {_SIGNATURE}")
    try:
        sig = inspect.signature(metric)
    except (TypeError, ValueError):  # a builtin without a signature: assume the simple form
        return 2
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    required_positional = [p for p in positional if p.default is p.empty]
    if len(positional) < 2 or len(required_positional) > 3 or len(required) > len(positional):
        raise AutocompressError(f"metric {name}{sig} does not fit: expected {_SIGNATURE}")
    return 3 if len(positional) >= 3 else 2


@dataclass(frozen=True)
class TrainSettings:
    """How the teacher is trained (part of the teacher cache key, except ``device``)."""

    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    seed: int = 0
    device: str = "cpu"


def cache_dir() -> Path:
    """Where teachers and generated data sets are cached (``$AUTOCOMPRESS_CACHE`` overrides)."""
    root = os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress"
    return Path(root)


@dataclass
class Task:
    """A compression task.

    Args:
        name: short name, e.g. ``"digits-mlp"``.
        build_model: returns a fresh, untrained model of the task's architecture.
        load_data: returns ``{"train": ..., "val": ..., "test": ...}``; each split is
            ``(inputs, targets)`` tensors or a ``TensorDataset`` (the simple in-memory case), a
            dict of equally long tensors (``input_ids``, ``attention_mask``, ..., ``labels``), a
            torch ``Dataset`` of examples, a ``DataLoader`` (used as given), or any re-iterable
            of batches. A batch is a tensor, a tuple ``(inputs..., targets)`` or a dict whose
            label key (``labels``, ``label``, ...) holds the targets; see ``tasks/_data.py``.
        spec: how to rebuild this task in another process (a registry name or
            ``"module:function"``); stored in artifacts so they can be reloaded.
        metric: ``(outputs, targets) -> float`` or ``(outputs, targets, teacher_outputs) ->
            float``, higher is better; it gets the selected outputs and the targets of the whole
            split (``targets`` is ``None`` for unlabeled data). Default by ``kind``: accuracy,
            negative MSE, cosine to the teacher. The signature is checked here.
        metric_name: the name under which ``evaluate`` reports the metric.
        kind: ``"classification"`` (cross-entropy + distillation of softened logits),
            ``"regression"`` (mean squared error to the targets and to the teacher's outputs)
            or ``"embedding"`` (distillation only, on the selected output: ``embedding_loss``
            ``"mse"`` or ``"cosine"``; no labels needed).
        train: teacher training settings.
        settings: extra settings that change the data or model (part of the cache key).
        teacher_model: an already trained teacher; if given, no training or caching happens.
        output: which model output the loss, the distillation and the metric use: a
            dict/``ModelOutput`` field name or a tuple index; default ``logits``, else
            ``last_hidden_state``, else the first tensor.
        eval_batch_size: batch size of ``predict``/``evaluate`` on in-memory data and Datasets.
        label_key: the dict batch key holding targets (default: the first of ``labels``,
            ``label``, ``targets``, ``target``, ``y`` present).
        collate_fn: collates examples of a torch ``Dataset`` split into a batch.
        embedding_loss: ``"mse"`` (default) or ``"cosine"`` (``1 - cosine`` along the last
            axis) for ``kind="embedding"``.
        shift_labels: causal language modelling: position ``t`` is scored against label
            ``t + 1`` (targets are shifted left and end with the ignored ``-100``), as Hugging
            Face ``...ForCausalLM`` models do inside their own loss.

    Example:
        >>> from autocompress.tasks import get_task
        >>> task = get_task("digits-mlp")
        >>> task.example_input().shape[1]
        64
    """

    name: str
    build_model: Callable[[], nn.Module]
    load_data: Callable[[], dict[str, Any]]
    spec: str = ""
    metric: Metric = accuracy_metric
    metric_name: str = "accuracy"
    kind: str = "classification"
    train: TrainSettings = field(default_factory=TrainSettings)
    settings: dict = field(default_factory=dict)
    teacher_model: nn.Module | None = None
    output: str | int | None = None
    eval_batch_size: int = 1024
    label_key: str | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    embedding_loss: str = "mse"
    shift_labels: bool = False
    _data: dict[str, Any] | None = field(default=None, repr=False)
    _teacher_out: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AutocompressError(f"task kind={self.kind!r} is unknown: use one of {list(KINDS)}")
        if self.metric is accuracy_metric and self.metric_name == "accuracy":
            if self.kind == "regression":
                self.metric, self.metric_name = neg_mse_metric, "neg_mse"
            elif self.kind == "embedding":
                self.metric, self.metric_name = cosine_metric, "cosine"
        self._arity = metric_arity(self.metric)
        if self.output is not None and (
            isinstance(self.output, bool) or not isinstance(self.output, str | int)
        ):
            raise AutocompressError(
                f"output={self.output!r} must be an output field name (e.g. 'logits') or an index"
            )
        if isinstance(self.eval_batch_size, bool) or not (
            isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1
        ):
            raise AutocompressError(
                f"eval_batch_size={self.eval_batch_size!r} must be an integer >= 1"
            )
        if self.embedding_loss not in ("mse", "cosine"):
            raise AutocompressError(
                f"embedding_loss={self.embedding_loss!r} is unknown: use 'mse' or 'cosine'"
            )
        if not self.spec:
            self.spec = self.name

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without cached teacher outputs (they are recomputed where needed)."""
        state = dict(self.__dict__)
        state["_teacher_out"] = {}
        return state

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        train: Any,
        val: Any,
        test: Any,
        metric: Metric | None = None,
        *,
        name: str = "custom",
        metric_name: str | None = None,
        kind: str = "classification",
        **options: Any,
    ) -> Task:
        """A task around a user's own trained model and data, with no subclassing.

        Args:
            model: the trained model (the teacher); it is never modified.
            train, val, test: ``(inputs, targets)`` tensors or ``TensorDataset``s, dicts of
                tensors, Datasets, DataLoaders or re-iterables of batches (see ``Task``).
            metric: ``(outputs, targets[, teacher_outputs]) -> float``, higher is better
                (default by ``kind``: accuracy, negative MSE, cosine to the teacher).
            kind: ``"classification"``, ``"regression"`` or ``"embedding"`` (decides the
                fine-tune losses).
            options: other ``Task`` fields: ``output``, ``eval_batch_size``, ``label_key``,
                ``collate_fn``, ``embedding_loss``.

        Artifacts of such a task are reloaded with ``load(path, model=architecture)``.

        Example:
            >>> import torch
            >>> x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
            >>> t = Task.from_module(nn.Linear(4, 2), (x, y), (x, y), (x, y))
            >>> sorted(t.evaluate(t.teacher(), "val"))
            ['accuracy']
        """
        data = {"train": train, "val": val, "test": test}
        teacher = copy.deepcopy(model).eval()
        return cls(
            name=name,
            build_model=lambda: copy.deepcopy(teacher),  # one stored copy of the model
            load_data=lambda: data,
            metric=metric or accuracy_metric,
            metric_name=metric_name or ("accuracy" if metric is None else "score"),
            kind=kind,
            teacher_model=teacher,
            **options,
        )

    @classmethod
    def from_hf(cls, model: nn.Module, train: Any, val: Any, test: Any, **kwargs: Any) -> Task:
        """A task from a raw Hugging Face ``transformers`` model and tokenized data, no wrapper.

        See :func:`autocompress.tasks._hf.task_from_hf` for the arguments and
        ``docs/huggingface.md`` for the recipe.
        """
        from autocompress.tasks._hf import task_from_hf

        return task_from_hf(model, train, val, test, **kwargs)

    # --- data ------------------------------------------------------------------------------
    def data(self, split: str) -> Any:
        """The ``split`` data source (``train``, ``val`` or ``test``); in-memory tensors come
        back as a ``TensorDataset`` (or a ``DictDataset`` for a dict of tensors)."""
        if split not in SPLITS:
            raise AutocompressError(f"split={split!r} is unknown: use one of {list(SPLITS)}")
        if self._data is None:
            data = self.load_data()
            missing = [s for s in SPLITS if s not in data]
            if missing:
                raise AutocompressError(f"task {self.name!r} data lacks splits {missing}")
            self._data = {s: as_source(s, data[s]) for s in SPLITS}
        return self._data[split]

    def batches(
        self,
        split: str,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[Inputs, Any]]:
        """``(inputs, targets)`` of every batch of ``split`` (``targets`` may be ``None``).

        Example:
            >>> from autocompress.tasks import get_task
            >>> x, y = next(get_task("digits-mlp").batches("val", 5))
            >>> tuple(x.shape), tuple(y.shape)
            ((5, 64), (5,))
        """
        bs = batch_size or self.eval_batch_size
        for batch in iter_batches(
            self.data(split), bs, shuffle=shuffle, generator=generator, collate_fn=self.collate_fn
        ):
            yield self.split(batch)

    def split(self, batch: Any) -> tuple[Inputs, Any]:
        """``(inputs, targets)`` of one batch as this task reads it (``label_key``,
        ``shift_labels``)."""
        inputs, y = split_batch(batch, self.label_key)
        if self.shift_labels and isinstance(y, torch.Tensor) and y.dim() >= 2:
            y = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], dim=1)
        return inputs, y

    def example_input(self, batch: int = 2) -> Inputs:
        """The first ``batch`` validation inputs in their natural form (a tensor, a tuple or a
        dict of tensors), used for tracing and ONNX export."""
        full = full_batch(self.data("val"))
        if full is not None:
            return take(split_batch(full, self.label_key)[0], batch)
        for inputs, _ in self.batches("val", batch):
            return take(inputs, batch)
        raise AutocompressError(f"task {self.name!r}: the val split yielded no batch")

    # --- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def outputs(
        self, model: nn.Module, split: str, batch_size: int | None = None
    ) -> tuple[torch.Tensor, Any]:
        """``(outputs, targets)`` of ``model`` over all of ``split``, streamed batch by batch
        (eval mode, no grad): the selected output (``self.output``) concatenated on the CPU,
        and the targets concatenated (``None`` for unlabeled data)."""
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
        outs, ys = [], []
        try:
            for inputs, y in self.batches(split, batch_size):
                out = pick_output(call_model(model, to_device(inputs, device)), self.output)
                outs.append(out.detach().cpu())
                ys.append(y)
        finally:
            if was_training and hasattr(model, "train"):
                model.train(True)
        targets = None if any(y is None for y in ys) else cat(ys, "targets")
        return cat(outs, "model outputs"), targets

    def predict(self, model: nn.Module, split: str, batch_size: int | None = None) -> torch.Tensor:
        """Selected outputs of ``model`` on every example of ``split`` (eval mode, no grad)."""
        return self.outputs(model, split, batch_size)[0]

    def teacher_outputs(self, split: str) -> torch.Tensor:
        """The teacher's selected outputs on ``split``, computed once per process."""
        if split not in self._teacher_out:
            if self.teacher_model is None and self._arity == 3:
                raise AutocompressError(
                    f"task {self.name!r}: the metric compares to the teacher's outputs, so the "
                    "task needs a trained teacher: pass teacher_model=..."
                )
            self._teacher_out[split] = self.predict(self.teacher(), split)
        return self._teacher_out[split]

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """``{metric_name: value}`` of ``model`` on ``split``."""
        out, y = self.outputs(model, split)
        args = (out, y) if self._arity == 2 else (out, y, self.teacher_outputs(split))
        value = self.metric(*args)
        try:
            return {self.metric_name: float(value)}
        except (TypeError, ValueError):
            name = getattr(self.metric, "__qualname__", repr(self.metric))
            raise AutocompressError(
                f"metric {name} returned {type(value).__name__}, not a number: return a float"
            ) from None

    # --- teacher ---------------------------------------------------------------------------
    def cache_key(self) -> str:
        """Hash of everything that determines the trained teacher."""
        desc = {
            "name": self.name,
            "spec": self.spec,
            "train": {k: v for k, v in asdict(self.train).items() if k != "device"},
            "settings": self.settings,
            "arch": repr(self.build_model() if self.teacher_model is None else self.teacher_model),
            "torch": torch.__version__.split("+")[0],
        }
        blob = json.dumps(desc, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def teacher(self) -> nn.Module:
        """The trained teacher, trained once and cached as safetensors (never pickle)."""
        if self.teacher_model is not None:
            return self.teacher_model
        from safetensors.torch import load_file

        from autocompress.tasks._train import save_state, train_teacher

        path = cache_dir() / "teachers" / f"{self.name}-{self.cache_key()}.safetensors"
        model = self.build_model()
        if path.exists():
            try:
                model.load_state_dict(load_file(str(path)))
                self.teacher_model = model.eval()
                return self.teacher_model
            except Exception:  # corrupt cache entry: retrain and overwrite it
                pass
        model = train_teacher(self, model)
        save_state(model, path)
        self.teacher_model = model.eval()
        return self.teacher_model

    def copy_teacher(self) -> nn.Module:
        """A deep copy of the teacher, safe to modify."""
        return copy.deepcopy(self.teacher())
