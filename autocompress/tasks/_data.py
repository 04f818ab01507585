"""Data sources of a Task: in-memory tensors, torch ``Dataset``s, ``DataLoader``s, batch iterables.

A split is one of:

- **in memory**: a ``TensorDataset``, an ``(inputs..., targets)`` tuple of tensors, or a dict of
  equally long tensors (``input_ids``, ``attention_mask``, ..., ``labels``; kept as a
  :class:`DictDataset`). The engine indexes it directly: seeded shuffles, teacher outputs
  computed once and reused across epochs.
- a **``DataLoader``**: used as given (its batch size, shuffling and collator), for training and
  evaluation alike.
- a **torch ``Dataset``** of examples: batched by a ``DataLoader`` the task builds (the
  fine-tune's batch size and a seeded shuffle for training, the evaluation batch size in order
  for scoring; ``Task.collate_fn`` collates).
- **any other re-iterable of batches** (a list of batches, an object whose ``__iter__`` starts
  over): iterated as it is. One-shot iterators and generators are refused: every epoch and every
  evaluation iterates the split again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from autocompress.errors import AutocompressError


class DictDataset(Dataset):
    """An in-memory split held as a dict of equally long tensors (Hugging Face style).

    Example:
        >>> ds = DictDataset({"input_ids": torch.zeros(3, 5).long(), "labels": torch.arange(3)})
        >>> len(ds), sorted(ds[1])
        (3, ['input_ids', 'labels'])
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        lengths = {k: len(v) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        if not lengths or len(lengths) != len(tensors) or len(set(lengths.values())) != 1:
            shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                      for k, v in tensors.items()}  # fmt: skip
            raise AutocompressError(
                f"a dict split must map names to equally long tensors, got {shapes}: "
                "tokenize with padding and return_tensors='pt' (or use Task.from_hf)"
            )
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def as_source(split: str, data: Any) -> Any:
    """``data`` as a split the task can iterate again and again (see the module docstring)."""
    if isinstance(data, TensorDataset | DictDataset | DataLoader | Dataset):
        return data
    if isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len({len(t) for t in data}) != 1:
            raise AutocompressError(
                f"split {split!r}: the tensors of an (inputs, targets) tuple differ in length "
                f"{[len(t) for t in data]}: pass equally long tensors"
            )
        return TensorDataset(*data)
    if isinstance(data, Mapping):
        return DictDataset(data)
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, Iterator):
        raise AutocompressError(
            f"split {split!r} is a one-shot iterator ({type(data).__name__}): pass something "
            "that can be iterated every epoch (a list of batches, a Dataset or a DataLoader)"
        )
    if isinstance(data, Iterable) and not isinstance(data, str | bytes):
        return data
    raise AutocompressError(
        f"split {split!r} of type {type(data).__name__} is not a data source: pass "
        "(inputs, targets) tensors, a dict of tensors, a Dataset, a DataLoader or a list of batches"
    )


def full_batch(source: Any) -> Any | None:
    """The whole split as one batch if it is held in memory, else ``None``."""
    if isinstance(source, TensorDataset):
        t = source.tensors
        return t[0] if len(t) == 1 else tuple(t)
    if isinstance(source, DictDataset):
        return source.tensors
    return None


def num_examples(source: Any) -> int | None:
    """Examples in ``source`` when known without iterating (a sized Dataset), else ``None``."""
    ds = source.dataset if isinstance(source, DataLoader) else source
    if isinstance(ds, IterableDataset):
        return None
    try:
        return len(ds)
    except TypeError:
        return None


def iter_batches(
    source: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Iterator[Any]:
    """Batches of ``source``: in-memory data sliced (or shuffled with ``generator``), a
    ``DataLoader`` as given, a ``Dataset`` through a ``DataLoader`` built here, any other
    iterable as it is.

    Example:
        >>> ds = TensorDataset(torch.arange(5.0), torch.arange(5))
        >>> [len(b[0]) for b in iter_batches(ds, 2)]
        [2, 2, 1]
    """
    from autocompress.tasks._batch import select

    full = full_batch(source)
    if full is not None:
        n = len(source)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size] if order is not None else slice(i, i + batch_size)
            yield select(full, idx)
        return
    if isinstance(source, DataLoader) or not isinstance(source, Dataset):
        yield from source
        return
    shuffle = shuffle and not isinstance(source, IterableDataset)
    yield from DataLoader(
        source,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        collate_fn=collate_fn,
    )


def cat(parts: Sequence[Any], what: str) -> Any:
    """Concatenate per-batch tensors along the batch axis (lists of other values are joined)."""
    if not parts:
        raise AutocompressError(f"the split yielded no batches: no {what} to score")
    if not all(isinstance(p, torch.Tensor) for p in parts):
        return [v for p in parts for v in (p if isinstance(p, Sequence) else [p])]
    tails = {tuple(p.shape[1:]) for p in parts}
    if len(tails) > 1:
        raise AutocompressError(
            f"{what} of different batches have different shapes {sorted(tails)[:3]}: pad every "
            "batch to one length, or select a pooled output with output=..."
        )
    return torch.cat(list(parts))
