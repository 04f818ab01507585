"""Built-in tasks: sklearn digits (bundled) and MNIST-1D (generated offline)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from autocompress.tasks._base import Task, TrainSettings, cache_dir
from autocompress.tasks._models import DigitsCNN, DigitsMLP, Mnist1dCNN, Mnist1dTransformer


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, TensorDataset]:
    """Seeded stratified 60/20/20 train/val/test split."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_tr, y_tr, test_size=0.25, random_state=seed, stratify=y_tr
    )

    def ds(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b).long())

    return {"train": ds(x_tr, y_tr), "val": ds(x_va, y_va), "test": ds(x_te, y_te)}


def _digits(image: bool, seed: int = 0) -> dict[str, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    x = (x - 0.5) / 0.5
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, d.target, seed)


def _mnist1d(seed: int = 0) -> dict[str, TensorDataset]:
    """MNIST-1D made offline with ``mnist1d.data.make_dataset`` (never its download helpers).

    Generation takes a few seconds, so the arrays are cached as a plain ``.npz`` (no pickle).
    """
    path = cache_dir() / "data" / f"mnist1d-seed{seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args(as_dict=False)
        args.seed = seed
        d = make_dataset(args)
        x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
        y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(path)
    return _split(x, y, seed)


def digits_mlp() -> Task:
    """64-300-100-10 MLP on sklearn's bundled 8x8 digits."""
    return Task(
        "digits-mlp",
        DigitsMLP,
        lambda: _digits(image=False),
        train=TrainSettings(epochs=60, lr=2e-3),
    )


def digits_cnn() -> Task:
    """Small 2-conv CNN on sklearn's bundled 8x8 digits."""
    return Task(
        "digits-cnn", DigitsCNN, lambda: _digits(image=True), train=TrainSettings(epochs=40)
    )


def mnist1d_cnn() -> Task:
    """Three-layer Conv1d CNN on MNIST-1D (5,000 signals of length 40, generated offline)."""
    return Task("mnist1d-cnn", Mnist1dCNN, _mnist1d, train=TrainSettings(epochs=60, lr=3e-3))


def mnist1d_transformer() -> Task:
    """Small transformer encoder (attention, LayerNorm, Embedding) on MNIST-1D."""
    return Task(
        "mnist1d-transformer",
        Mnist1dTransformer,
        _mnist1d,
        train=TrainSettings(epochs=80, lr=3e-3, patience=15),
    )
