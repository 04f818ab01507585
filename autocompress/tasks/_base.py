"""Task: a model to compress, its data, how it is trained and how it is scored.

A Task owns the teacher (trained once and cached on disk by a hash of its settings), the
train/val/test splits and ``evaluate(model, split)``. The search optimizes on ``val`` and reports
the Pareto front on ``test``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from autocompress.errors import AutocompressError

SPLITS = ("train", "val", "test")

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy_metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits ``outputs`` against class indices ``targets``."""
    return float((outputs.argmax(dim=1) == targets).float().mean().item())


@dataclass(frozen=True)
class TrainSettings:
    """How the teacher is trained (part of the teacher cache key)."""

    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    seed: int = 0


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
        load_data: returns ``{"train": TensorDataset, "val": ..., "test": ...}``.
        spec: how to rebuild this task in another process (a registry name or
            ``"module:function"``); stored in artifacts so they can be reloaded.
        metric: ``(outputs, targets) -> float``, higher is better; accuracy by default.
        metric_name: the name under which ``evaluate`` reports the metric.
        kind: ``"classification"`` (cross-entropy + distillation) or ``"regression"``
            (mean squared error to the targets and to the teacher's outputs).
        train: teacher training settings.
        settings: extra settings that change the data or model (part of the cache key).
        teacher_model: an already trained teacher; if given, no training or caching happens.

    Example:
        >>> from autocompress.tasks import get_task
        >>> task = get_task("digits-mlp")
        >>> task.example_input().shape[1]
        64
    """

    name: str
    build_model: Callable[[], nn.Module]
    load_data: Callable[[], dict[str, TensorDataset]]
    spec: str = ""
    metric: Metric = accuracy_metric
    metric_name: str = "accuracy"
    kind: str = "classification"
    train: TrainSettings = field(default_factory=TrainSettings)
    settings: dict = field(default_factory=dict)
    teacher_model: nn.Module | None = None
    _data: dict[str, TensorDataset] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise AutocompressError(
                f"task kind={self.kind!r} is unknown: use 'classification' or 'regression'"
            )
        if not self.spec:
            self.spec = self.name

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        train: TensorDataset | tuple[torch.Tensor, torch.Tensor],
        val: TensorDataset | tuple[torch.Tensor, torch.Tensor],
        test: TensorDataset | tuple[torch.Tensor, torch.Tensor],
        metric: Metric | None = None,
        *,
        name: str = "custom",
        metric_name: str | None = None,
        kind: str = "classification",
    ) -> Task:
        """A task around a user's own trained model and data, with no subclassing.

        Args:
            model: the trained model (the teacher); it is never modified.
            train, val, test: ``(inputs, targets)`` tensors or ``TensorDataset``s.
            metric: ``(outputs, targets) -> float``, higher is better (default: accuracy).
            kind: ``"classification"`` or ``"regression"`` (decides the fine-tune losses).

        Artifacts of such a task are reloaded with ``load(path, model=architecture)``.

        Example:
            >>> import torch
            >>> x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
            >>> t = Task.from_module(nn.Linear(4, 2), (x, y), (x, y), (x, y))
            >>> sorted(t.evaluate(t.teacher(), "val"))
            ['accuracy']
        """

        def ds(d: TensorDataset | tuple[torch.Tensor, torch.Tensor]) -> TensorDataset:
            return d if isinstance(d, TensorDataset) else TensorDataset(*d)

        data = {"train": ds(train), "val": ds(val), "test": ds(test)}
        arch = copy.deepcopy(model)
        teacher = copy.deepcopy(model).eval()
        return cls(
            name=name,
            build_model=lambda: copy.deepcopy(arch),
            load_data=lambda: data,
            metric=metric or accuracy_metric,
            metric_name=metric_name or ("accuracy" if metric is None else "score"),
            kind=kind,
            teacher_model=teacher,
        )

    # --- data ------------------------------------------------------------------------------
    def data(self, split: str) -> TensorDataset:
        """The ``split`` data set (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise AutocompressError(f"split={split!r} is unknown: use one of {list(SPLITS)}")
        if self._data is None:
            data = self.load_data()
            missing = [s for s in SPLITS if s not in data]
            if missing:
                raise AutocompressError(f"task {self.name!r} data lacks splits {missing}")
            self._data = data
        return self._data[split]

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A small batch of real inputs (used for tracing and ONNX export)."""
        return self.data("val").tensors[0][:batch].clone()

    # --- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, batch_size: int = 1024) -> torch.Tensor:
        """Outputs of ``model`` on every example of ``split`` (eval mode, no grad)."""
        was_training = model.training
        model.eval()
        x = self.data(split).tensors[0]
        param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
        outs = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
        model.train(was_training)
        return torch.cat(outs)

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """``{metric_name: value}`` of ``model`` on ``split``."""
        out = self.predict(model, split)
        return {self.metric_name: float(self.metric(out, self.data(split).tensors[1]))}

    # --- teacher ---------------------------------------------------------------------------
    def cache_key(self) -> str:
        """Hash of everything that determines the trained teacher."""
        desc = {
            "name": self.name,
            "spec": self.spec,
            "train": asdict(self.train),
            "settings": self.settings,
            "arch": repr(self.build_model()),
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
