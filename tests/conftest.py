from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_mlp():
    from autocompress.tasks import get_task

    task = get_task("digits-mlp")
    task.teacher()
    return task
