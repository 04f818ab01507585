"""A custom objective end to end: your own model, your own score, your own metric, a size budget.

The model is a small embedding network defined here (8x8 digits -> 32-dimensional embeddings).
Compressing an embedding model is not about class accuracy: a compressed encoder is good when
its embeddings still point where the teacher's do, and when nearest-neighbour search over them
still finds the right items. So this example

* wraps the model with ``Task.from_module(..., kind="regression")`` whose targets are the
  teacher's own embeddings and whose score is their mean cosine similarity (``metric=cosine``;
  it fills the ``accuracy`` column and distillation fine-tunes towards the teacher's outputs);
* adds a custom :class:`~autocompress.Metric` from Python, ``knn_accuracy``: the 1-nearest
  neighbour (cosine) label accuracy of the split's embeddings against the training set's;
* constrains the artifact to ``size_bytes <= 20_000`` (the fp32 teacher is ~210 kB);
* runs :func:`autocompress.search.run` and prints the front.

Run it::

    python experiments/custom_objective.py [--trials 30 --workers 2 --epochs 10 --run-dir DIR]

The same search from YAML uses ``make_task`` and ``knn_accuracy`` by ``module:function`` (run
``autocompress run`` from this directory, or set ``PYTHONPATH=experiments``)::

    task: custom_objective:make_task
    objective:
      metrics: [accuracy, size_bytes, "custom_objective:knn_accuracy"]
      constraints: ["size_bytes <= 20000"]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from autocompress import (
    CompressionSpace,
    FinetuneSettings,
    Knobs,
    Metric,
    Objective,
    Task,
    search,
)

SIZE_BUDGET = 20_000
"""Bytes the compressed artifact may take (weights + plan + manifest, on disk)."""
SPLITS = ("train", "val", "test")
_CACHE: dict[str, Any] = {}


class Encoder(nn.Module):
    """64 -> 256 -> 128 -> 32 MLP: an embedding of 8x8 digit images."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 128)
        self.out = nn.Linear(128, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """sklearn's bundled digits (offline), scaled to [0, 1], split 60/20/20 with a fixed seed:
    ``{split: (images, labels)}``."""
    if "data" not in _CACHE:
        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.int64)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        a, b = int(0.6 * len(x)), int(0.8 * len(x))
        parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
        _CACHE["data"] = {s: (x[i], y[i]) for s, i in parts.items()}
    return _CACHE["data"]


def train_teacher(epochs: int = 60) -> Encoder:
    """Train the encoder with a temporary linear classifier on top (then drop the classifier)."""
    if "teacher" not in _CACHE:
        torch.manual_seed(0)
        x, y = load_data()["train"]
        enc, head = Encoder(), nn.Linear(32, 10)
        opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=2e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                F.cross_entropy(head(enc(x[idx])), y[idx]).backward()
                opt.step()
        _CACHE["teacher"] = enc.eval()
    return _CACHE["teacher"]


def cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine similarity of the embeddings to the teacher's (1.0 for the teacher itself)."""
    return float(F.cosine_similarity(outputs, targets, dim=1).mean())


def make_task() -> Task:
    """The task: inputs -> the teacher's embeddings, scored by :func:`cosine`.

    Example:
        >>> task = make_task()
        >>> task.evaluate(task.teacher(), "val")
        {'cosine': 1.0}
    """
    teacher = train_teacher()
    with torch.no_grad():
        splits = {s: (x, teacher(x)) for s, (x, _) in load_data().items()}
    return Task.from_module(
        teacher,
        splits["train"],
        splits["val"],
        splits["test"],
        metric=cosine,
        name="digits-encoder",
        metric_name="cosine",
        kind="regression",
    )


def knn_accuracy(model: nn.Module, artifact: Any, task: Task, *, split: str = "val") -> float:
    """1-nearest-neighbour label accuracy of ``split``'s embeddings among the training set's.

    A metric function: ``(model, artifact, task) -> float``, plus the optional ``split``
    keyword (``"val"`` during the search, ``"test"`` when the front is re-scored).
    """
    data = load_data()
    gallery = F.normalize(task.predict(model, "train"), dim=1)
    queries = F.normalize(task.predict(model, split), dim=1)
    nearest = (queries @ gallery.T).argmax(dim=1)
    return float((data["train"][1][nearest] == data[split][1]).float().mean())


knn_accuracy.direction = "maximize"  # type: ignore[attr-defined]  # for 'module:function' in YAML
KNN_ACCURACY = Metric("knn_accuracy", "maximize", knn_accuracy)


def make_objective() -> Objective:
    """Maximize cosine (the ``accuracy`` column) and kNN accuracy, minimize bytes, within budget.

    Example:
        >>> make_objective().names
        ['accuracy', 'knn_accuracy', 'size_bytes']
    """
    return Objective(
        ["accuracy", KNN_ACCURACY, "size_bytes"],
        constraints=[f"size_bytes <= {SIZE_BUDGET}"],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10, help="fine-tune epochs per candidate")
    ap.add_argument("--run-dir", default="runs/custom_objective")
    args = ap.parse_args(argv)

    task = make_task()
    space = CompressionSpace.from_model(
        task.build_model(),
        Knobs(sparsity=(0.0, 0.95), bits=(2, 3, 4, 6, 8), width=(0.25, 1.0)),
        finetune=FinetuneSettings(epochs=args.epochs),
    )
    result = search.run(
        task,
        space,
        make_objective(),
        trials=args.trials,
        workers=args.workers,
        run_dir=args.run_dir,
    )
    print(result.summary())
    front = result.pareto
    if front.empty:
        return 1
    bad = front[front["size_bytes"] > SIZE_BUDGET]
    if len(bad):  # the search guarantees it; say so loudly if it ever did not
        print(f"error: front members over the {SIZE_BUDGET}-byte budget: {list(bad.trial_id)}")
        return 1
    best = front.loc[front["test_knn_accuracy"].idxmax()]
    teacher_knn = knn_accuracy(task.teacher(), None, task, split="test")
    print(
        f"best kNN accuracy within {SIZE_BUDGET:,} bytes: trial {best.trial_id}, "
        f"{best.test_knn_accuracy:.3f} on test (teacher {teacher_knn:.3f}), cosine to the "
        f"teacher {best.test_accuracy:.3f}, {int(best.size_bytes):,} bytes "
        f"({result.teacher['size_bytes'] / best.size_bytes:.1f}x smaller)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
