"""Task data as it comes: in-memory tensors, dicts, Datasets, DataLoaders, lists of batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autocompress import AutocompressError, Task
from autocompress.tasks import DictDataset, cosine_metric


class TwoInputs(nn.Module):
    """A model taking keyword inputs and returning a dict, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(x * mask)
        return {"hidden": h.tanh(), "logits": h}


def _xy(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class _Rows(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "mask": torch.ones(6), "labels": self.y[i]}


def _as_dict(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": x, "mask": torch.ones_like(x), "labels": y}


@pytest.mark.parametrize("form", ["dict", "dataset", "dataloader", "list-of-batches"])
def test_every_source_form_scores_the_same(form: str) -> None:
    x, y = _xy()
    model = TwoInputs().eval()
    batches = [_as_dict(x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7)]
    source = {
        "dict": _as_dict(x, y),
        "dataset": _Rows(x, y),
        "dataloader": DataLoader(_Rows(x, y), batch_size=5),
        "list-of-batches": batches,
    }[form]
    task = Task.from_module(model, source, source, source, eval_batch_size=9)
    ref = (model(x, torch.ones_like(x))["logits"].argmax(1) == y).float().mean().item()
    assert task.evaluate(model, "val") == {"accuracy": pytest.approx(ref)}
    out, targets = task.outputs(model, "val")
    assert out.shape == (40, 3) and torch.equal(targets, y)
    ex = task.example_input(3)
    assert sorted(ex) == ["mask", "x"] and ex["x"].shape == (3, 6)


def test_in_memory_tensor_form_is_unchanged() -> None:
    x, y = _xy()
    task = Task.from_module(nn.Linear(6, 3), (x, y), (x, y), (x, y))
    assert isinstance(task.data("train"), TensorDataset)
    assert torch.equal(task.example_input(4), x[:4])
    d = Task.from_module(TwoInputs(), _as_dict(x, y), _as_dict(x, y), _as_dict(x, y))
    assert isinstance(d.data("val"), DictDataset)
    three = Task.from_module(nn.Bilinear(6, 6, 3), (x, x, y), (x, x, y), (x, x, y))
    ex = three.example_input(2)
    assert isinstance(ex, tuple) and len(ex) == 2  # (x1, x2) inputs; y is the target


def test_eval_batch_size_does_not_change_results() -> None:
    x, y = _xy(50)
    model = nn.Linear(6, 3)
    a = Task.from_module(model, (x, y), (x, y), (x, y), eval_batch_size=7)
    b = Task.from_module(model, (x, y), (x, y), (x, y), eval_batch_size=1024)
    assert torch.allclose(a.predict(model, "val"), b.predict(model, "val"))
    with pytest.raises(AutocompressError, match="eval_batch_size=0"):
        Task.from_module(model, (x, y), (x, y), (x, y), eval_batch_size=0)


def test_output_setting_selects_the_field() -> None:
    x, y = _xy()
    model = TwoInputs()
    data = _as_dict(x, y)
    task = Task.from_module(model, data, data, data, output="hidden")
    assert task.predict(model, "val").abs().max() <= 1.0  # tanh: the 'hidden' field
    bad = Task.from_module(model, data, data, data, output="pooler")
    with pytest.raises(AutocompressError, match="has no tensor 'pooler'"):
        bad.evaluate(model, "val")


def test_one_shot_iterators_are_refused() -> None:
    x, y = _xy()
    gen = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 40, 4))
    task = Task.from_module(nn.Linear(6, 3), gen, (x, y), (x, y))
    with pytest.raises(AutocompressError, match="one-shot iterator"):
        task.data("train")


def test_wrong_metric_signature_fails_when_the_task_is_built() -> None:
    x, y = _xy()

    def needs_four(a, b, c, d) -> float:
        return 0.0

    with pytest.raises(AutocompressError, match=r"metric .*needs_four.* does not fit") as e:
        Task.from_module(nn.Linear(6, 3), (x, y), (x, y), (x, y), metric=needs_four)
    assert "\n" not in str(e.value) and "(outputs, targets)" in str(e.value)
    with pytest.raises(AutocompressError, match="does not fit"):
        Task.from_module(nn.Linear(6, 3), (x, y), (x, y), (x, y), metric=lambda out: 1.0)


def test_metric_returning_a_non_number_is_a_one_line_error() -> None:
    x, y = _xy()
    task = Task.from_module(nn.Linear(6, 3), (x, y), (x, y), (x, y), metric=lambda o, t: {"a": 1})
    with pytest.raises(AutocompressError, match="returned dict, not a number"):
        task.evaluate(task.teacher(), "val")


def test_unlabeled_embedding_task_compares_to_the_teacher() -> None:
    x, _ = _xy()
    teacher = nn.Linear(6, 4)
    task = Task.from_module(teacher, x, x, x, kind="embedding")  # no labels at all
    assert task.metric is cosine_metric and task.metric_name == "cosine"
    assert task.evaluate(teacher, "val")["cosine"] == pytest.approx(1.0)
    other = nn.Linear(6, 4)
    assert task.evaluate(other, "val")["cosine"] < 0.9
    seen = {}

    def three(outputs, targets, teacher_outputs) -> float:
        seen["args"] = (outputs.shape, targets, teacher_outputs.shape)
        return 0.5

    t3 = Task.from_module(teacher, x, x, x, kind="embedding", metric=three, metric_name="m")
    assert t3.evaluate(other, "test") == {"m": 0.5}
    assert seen["args"] == ((40, 4), None, (40, 4))


def test_accuracy_without_labels_says_what_to_do() -> None:
    x, _ = _xy()
    task = Task.from_module(nn.Linear(6, 3), x, x, x)
    with pytest.raises(AutocompressError, match="needs labels"):
        task.evaluate(task.teacher(), "val")


def test_unknown_kind_and_embedding_loss_are_refused() -> None:
    x, y = _xy()
    with pytest.raises(AutocompressError, match="kind='ranking'"):
        Task.from_module(nn.Linear(6, 3), (x, y), (x, y), (x, y), kind="ranking")
    with pytest.raises(AutocompressError, match="embedding_loss"):
        Task.from_module(nn.Linear(6, 3), x, x, x, kind="embedding", embedding_loss="l1")


def test_teacher_trains_from_a_dataloader(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.tasks import TrainSettings

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    x, _ = _xy(120)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # learnable labels
    rows = _Rows(x, y)
    data = {
        "train": DataLoader(rows, batch_size=16, shuffle=True),
        "val": DataLoader(rows, batch_size=32),
        "test": rows,
    }
    task = Task("stream", TwoInputs, lambda: data, train=TrainSettings(epochs=30, lr=0.05))
    teacher = task.teacher()
    assert task.evaluate(teacher, "test")["accuracy"] > 0.7
    assert next(tmp_path.glob("teachers/stream-*.safetensors"))


def test_an_embedding_task_needs_a_teacher() -> None:
    x, _ = _xy()
    task = Task("emb", lambda: nn.Linear(6, 4), lambda: {s: x for s in ("train", "val", "test")},
                kind="embedding")  # fmt: skip
    with pytest.raises(AutocompressError, match="teacher"):
        task.teacher()
