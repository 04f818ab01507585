"""Faulty metrics and tasks, imported by the Ray workers of the fault-injection tests.

Each metric finds its control directory from the artifact it is given: an artifact lives at
``<tmp>/run/trials/<trial_id>``, so ``<tmp>/ctl`` is ``parents[2] / "ctl"``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from autocompress import Task
from autocompress.tasks import get_task

WAIT_S = 300.0  # a blocked metric gives up after this (the tests end it long before)


def _knobs(artifact) -> tuple[float, int]:
    plan = json.loads((Path(artifact.path) / "plan.json").read_text())
    fc1 = plan["layers"]["fc1"]
    return fc1["sparsity"], fc1["bits"]


def _ctl(artifact) -> Path:
    ctl = Path(artifact.path).resolve().parents[2] / "ctl"
    ctl.mkdir(exist_ok=True)
    return ctl


def _block_until(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.05)


def mixed(model, artifact, task) -> float:
    """By plan: 2 bits raise, 8 bits at 60% sparsity give inf, 8 bits at 90% hang forever."""
    sparsity, bits = _knobs(artifact)
    if bits == 2:
        raise RuntimeError("injected metric failure")
    if bits == 8 and sparsity < 0.75:
        return math.inf
    if bits == 8:
        (_ctl(artifact) / f"hung-{os.getpid()}").write_text(str(os.getpid()))
        _block_until(_ctl(artifact) / "never")
    return 1.0


def killable(model, artifact, task) -> float:
    """The first trial to claim ``ctl/arm`` writes its worker PID and blocks (to be SIGKILLed)."""
    ctl = _ctl(artifact)
    try:
        os.rename(ctl / "arm", ctl / f"armed-{os.getpid()}")
    except OSError:
        return 1.0  # not armed, or another trial claimed it: behave
    (ctl / "pid").write_text(str(os.getpid()))
    _block_until(ctl / "release")
    return 1.0


def nan_data_task() -> Task:
    """digits-mlp's teacher and splits, with NaN in the training inputs: fine-tunes diverge."""
    base = get_task("digits-mlp")
    x, y = base.data("train").tensors
    x = x.clone()
    x[::7] = float("nan")
    return Task.from_module(
        base.teacher(), (x, y), base.data("val"), base.data("test"), kind="classification"
    )


def needs_plugin(model, artifact, task) -> float:
    """A user metric whose optional dependency is not installed."""
    import autocompress_plugin_that_is_not_installed  # noqa: F401

    return 0.0
