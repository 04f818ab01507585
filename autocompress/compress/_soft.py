"""The teacher's outputs on the train split, in memory or memory-mapped from a file.

Distillation reads the teacher's outputs on every training row once per epoch. They are
computed once (per ``apply``, or once per search worker) and kept; for a large model on a large
split they may not fit in memory: an LM's logits are ``rows x tokens x vocabulary`` floats
(10,000 sequences of 128 tokens over a 30,522-word vocabulary are 156 GB). Above a byte budget
the outputs are written batch by batch into a file and memory-mapped back
(``torch.from_file(shared=True)``), so the fine-tune loop gets the same thing it always gets:
a ``torch.Tensor`` it indexes by rows (``soft[idx]`` copies just those rows). Its pages live in
the page cache, which the kernel writes back and evicts under pressure, unlike anonymous memory.

The file is created in a private temporary directory and unlinked as soon as it is mapped
(POSIX keeps the data until the mapping goes), so nothing is left on disk when the process
ends, even by ``SIGKILL``; where unlinking an open file fails (Windows) it is removed at exit.

Budget: ``budget=`` in bytes, else ``$AUTOCOMPRESS_SOFT_BUDGET`` (bytes; suffixes ``K``, ``M``,
``G`` are powers of 1024), else :data:`DEFAULT_FRACTION` of the machine's RAM. The directory:
``directory=``, else ``$AUTOCOMPRESS_SOFT_DIR``, else the system temp directory (put it on a
disk, not a RAM-backed tmpfs, for the memory to be saved).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.tasks._base import Task
from autocompress.tasks._batch import call_model, model_device, pick_output, to_device
from autocompress.tasks._data import cat, full_batch, num_examples

DEFAULT_FRACTION = 0.25
"""Teacher outputs larger than this share of physical RAM go to a memory-mapped file."""
BUDGET_ENV, DIR_ENV = "AUTOCOMPRESS_SOFT_BUDGET", "AUTOCOMPRESS_SOFT_DIR"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """Bytes in ``"123"``, ``"64M"``, ``"1.5G"`` (powers of 1024; a trailing ``B`` is allowed).

    Example:
        >>> parse_bytes("64M"), parse_bytes("1.5G"), parse_bytes("4096")
        (67108864, 1610612736, 4096)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise AutocompressError(
            f"{BUDGET_ENV}={text!r} is not a byte count: give bytes, or a number with K, M or G"
        )
    return int(float(m[1]) * _UNITS[m[2].upper()])


def physical_memory() -> int | None:
    """Bytes of physical RAM, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget(budget: int | None = None) -> int:
    """The byte budget above which teacher outputs go to disk (see the module docstring).

    Example:
        >>> memory_budget(1000)
        1000
    """
    if budget is None and os.environ.get(BUDGET_ENV):
        budget = parse_bytes(os.environ[BUDGET_ENV])
    if budget is None:
        ram = physical_memory()
        return int(DEFAULT_FRACTION * ram) if ram else 1 << 32
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise AutocompressError(f"budget={budget!r} must be a byte count >= 0")
    return budget


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, directory: str | None) -> torch.Tensor:
    """A zero-filled tensor of ``shape`` backed by a fresh file (unlinked once mapped)."""
    where = directory or os.environ.get(DIR_ENV) or None
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="autocompress-soft-", dir=where))
        path = folder / "teacher_outputs.bin"
        with open(path, "wb") as f:
            # reserve the blocks now: a full disk is an error here, not a SIGBUS mid-write
            if hasattr(os, "posix_fallocate") and nbytes:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(max(nbytes, 1))
        flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    except (OSError, RuntimeError) as e:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise AutocompressError(
            f"cannot create a {nbytes / 1e9:.2f} GB file for the teacher outputs in "
            f"{where or tempfile.gettempdir()} ({getattr(e, 'strerror', None) or e}): free disk "
            f"space or set {DIR_ENV} to a directory on a larger disk"
        ) from None
    try:  # the mapping keeps the data; the name goes now, so no process end leaves a file
        path.unlink()
        folder.rmdir()
    except OSError:
        atexit.register(shutil.rmtree, folder, True)
    return flat.view(shape)


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module,
    task: Task,
    *,
    budget: int | None = None,
    directory: str | None = None,
) -> torch.Tensor | None:
    """The teacher's selected outputs on the whole in-memory train split, on the CPU, in
    memory when they fit ``budget`` bytes, else in a memory-mapped file; ``None`` when the
    split is streamed (the fine-tune then runs the teacher per batch).

    Computed batch by batch exactly as ``task.predict(teacher, "train")`` does (eval mode, no
    grad, ``task.eval_batch_size``), so both forms hold the same values; the first batch tells
    the size, so outputs over the budget never exist in memory as a whole.

    Example:
        >>> from autocompress.tasks import get_task
        >>> task = get_task("digits-mlp")
        >>> mem = teacher_outputs(task.teacher(), task)
        >>> disk = teacher_outputs(task.teacher(), task, budget=0)
        >>> torch.equal(mem, disk), on_disk(mem), on_disk(disk)
        (True, False, True)
    """
    source = task.data("train")
    if full_batch(source) is None:
        return None
    limit = memory_budget(budget)
    rows = num_examples(source)
    was_training = teacher.training
    teacher.eval()
    device = model_device(teacher)
    store: torch.Tensor | None = None
    parts: list[torch.Tensor] = []
    at = 0
    try:
        for inputs, _ in task.batches("train"):
            out = pick_output(call_model(teacher, to_device(inputs, device)), task.output)
            out = out.detach().cpu()
            first = store is None and not parts and len(out) > 0  # it tells the row size
            if first and rows * out[0].numel() * out.element_size() > limit:
                store = _mapped((rows, *out.shape[1:]), out.dtype, directory)
            if store is None:
                parts.append(out)
                continue
            if tuple(out.shape[1:]) != tuple(store.shape[1:]) or at + len(out) > len(store):
                raise AutocompressError(
                    f"teacher outputs of shape {tuple(out.shape)} do not fit the train split's "
                    f"{tuple(store.shape)}: pad every batch to one length, or select a pooled "
                    "output with output=..."
                )
            store[at : at + len(out)] = out
            at += len(out)
    finally:
        teacher.train(was_training)
    if store is None:
        return cat(parts, "model outputs")
    if at != len(store):
        raise AutocompressError(
            f"the train split yielded {at} rows, not the {len(store)} it holds: teacher outputs "
            "cannot be indexed by row"
        )
    return store


def on_disk(outputs: torch.Tensor | None) -> bool:
    """Whether ``outputs`` (from :func:`teacher_outputs`) are memory-mapped from a file."""
    if outputs is None:
        return False
    with contextlib.suppress(RuntimeError, AttributeError):
        storage = outputs.untyped_storage()
        return bool(storage.filename)
    return False
