"""Teacher outputs over the memory budget live in a memory-mapped file (compress/_soft.py)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autocompress import Task
from autocompress.compress import apply
from autocompress.compress._finetune import soft_targets
from autocompress.compress._soft import (
    BUDGET_ENV,
    DIR_ENV,
    memory_budget,
    on_disk,
    parse_bytes,
    teacher_outputs,
)
from autocompress.errors import AutocompressError
from autocompress.spaces import FinetuneSettings, Plan

LAYERS = ["fc1", "fc2", "fc3"]


def test_outputs_on_disk_equal_in_memory_and_leave_no_file(digits_mlp: Task, tmp_path) -> None:
    teacher = digits_mlp.teacher()
    mem = teacher_outputs(teacher, digits_mlp)
    disk = teacher_outputs(teacher, digits_mlp, budget=1024, directory=str(tmp_path))
    assert not on_disk(mem) and on_disk(disk)
    assert torch.equal(mem, digits_mlp.predict(teacher, "train"))
    assert torch.equal(mem, disk) and disk.dtype == mem.dtype and disk.shape == mem.shape
    idx = torch.randperm(len(disk), generator=torch.Generator().manual_seed(0))[:17]
    assert torch.equal(disk[idx], mem[idx])  # rows by index, as the fine-tune reads them
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped: nothing left behind


def test_budget_at_the_size_keeps_outputs_in_memory(digits_mlp: Task) -> None:
    teacher = digits_mlp.teacher()
    size = teacher_outputs(teacher, digits_mlp).nbytes
    assert not on_disk(teacher_outputs(teacher, digits_mlp, budget=size))
    assert on_disk(teacher_outputs(teacher, digits_mlp, budget=size - 1))


@pytest.mark.parametrize("codebook", [False, True], ids=["uniform", "codebook"])
def test_finetune_is_bit_identical_from_disk(
    digits_mlp: Task, monkeypatch: pytest.MonkeyPatch, tmp_path, codebook: bool
) -> None:
    """The whole engine (both fine-tunes of a codebook plan) reads the same rows from the
    file as from memory: the compressed models are bit-identical."""
    teacher = digits_mlp.teacher()
    ft = FinetuneSettings(epochs=2, batch_size=64)
    scheme = "codebook" if codebook else "uniform"
    plan = Plan.uniform(LAYERS, sparsity=0.5, bits=4, scheme=scheme, finetune=ft)
    a = apply(teacher, plan, digits_mlp, seed=3)
    monkeypatch.setenv(BUDGET_ENV, "1")
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    assert on_disk(soft_targets(teacher, digits_mlp))  # what apply and the search worker use
    b = apply(teacher, plan, digits_mlp, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert list(tmp_path.iterdir()) == []


def test_search_worker_cache_keeps_outputs_on_disk(
    digits_mlp: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocompress.search._trial import WorkerCache

    monkeypatch.setenv(BUDGET_ENV, "0")
    soft, _ = WorkerCache(digits_mlp).train_outputs()
    assert on_disk(soft) and torch.equal(soft, digits_mlp.predict(digits_mlp.teacher(), "train"))


def test_sequence_outputs_keep_their_shape(tmp_path) -> None:
    """(N, T, C) outputs (a token classifier's logits) map with every axis, batch by batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Linear(8, 5))
    x = torch.randint(0, 30, (70, 6))
    y = torch.randint(0, 5, (70, 6))
    data = (x, y)
    task = Task.from_module(model, data, data, data, eval_batch_size=16)
    disk = teacher_outputs(model, task, budget=0, directory=str(tmp_path))
    assert disk.shape == (70, 6, 5) and on_disk(disk)
    assert torch.equal(disk, task.predict(model, "train"))


def test_streamed_train_split_has_no_stored_outputs(digits_mlp: Task) -> None:
    x, y = digits_mlp.data("train").tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    task = Task.from_module(digits_mlp.teacher(), loader, (x, y), (x, y))
    assert teacher_outputs(task.teacher(), task, budget=0) is None


def test_budget_settings_and_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert parse_bytes("2K") == 2048 and parse_bytes("1.5 GiB") == 3 << 29
    monkeypatch.setenv(BUDGET_ENV, "64M")
    assert memory_budget() == 64 << 20 and memory_budget(10) == 10
    monkeypatch.delenv(BUDGET_ENV)
    assert 0 < memory_budget() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(AutocompressError, match=f"{BUDGET_ENV}='lots' is not a byte count"):
        memory_budget()
    with pytest.raises(AutocompressError, match="budget=-1 must be a byte count"):
        memory_budget(-1)


def test_unusable_directory_is_one_clear_error(digits_mlp: Task, tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(AutocompressError, match=f"teacher outputs in {missing}.*{DIR_ENV}"):
        teacher_outputs(digits_mlp.teacher(), digits_mlp, budget=0, directory=str(missing))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine",
)
def test_cuda_teacher_outputs_land_on_the_host_file(digits_mlp: Task, tmp_path) -> None:
    teacher = copy.deepcopy(digits_mlp.teacher()).cuda()  # the fixture's stays on the CPU
    mem = teacher_outputs(teacher, digits_mlp)
    disk = teacher_outputs(teacher, digits_mlp, budget=0, directory=str(tmp_path))
    assert disk.device.type == "cpu" and on_disk(disk) and torch.equal(mem, disk)
