from __future__ import annotations

import pytest
import torch

from autocompress import AutocompressError, Task
from autocompress.tasks import get_task, task_names


def test_registry_lists_builtins() -> None:
    assert {"digits-mlp", "digits-cnn", "mnist1d-cnn", "mnist1d-transformer"} <= set(task_names())


def test_splits_are_seeded_and_disjoint() -> None:
    a, b = get_task("digits-mlp"), get_task("digits-mlp")
    for split in ("train", "val", "test"):
        assert torch.equal(a.data(split).tensors[0], b.data(split).tensors[0])
    n = sum(len(a.data(s)) for s in ("train", "val", "test"))
    assert n == 1797


def test_teacher_is_cached_and_accurate(digits_mlp: Task) -> None:
    acc = digits_mlp.evaluate(digits_mlp.teacher(), "test")["accuracy"]
    assert acc > 0.93
    again = get_task("digits-mlp").teacher()  # loads the cached safetensors
    assert torch.equal(again.fc1.weight, digits_mlp.teacher().fc1.weight)


def test_mnist1d_is_generated_offline() -> None:
    task = get_task("mnist1d-cnn")
    assert task.example_input().shape == (2, 40)
    assert len(task.data("train")) + len(task.data("val")) + len(task.data("test")) == 5000


def test_unknown_and_module_function_tasks() -> None:
    with pytest.raises(AutocompressError, match="unknown task"):
        get_task("digits-mpl")
    with pytest.raises(AutocompressError, match="cannot import"):
        get_task("no_such_module_xyz:make")
    t = get_task("autocompress.tasks._builtin:digits_mlp")
    assert t.spec == "autocompress.tasks._builtin:digits_mlp"
