"""Task registry and the ``module:function`` loader."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from autocompress.errors import AutocompressError
from autocompress.tasks._base import Task
from autocompress.tasks._builtin import digits_cnn, digits_mlp, mnist1d_cnn, mnist1d_transformer


def minilm() -> Task:
    """Pretrained all-MiniLM-L6-v2 sentence embeddings (``tasks/_minilm.py``; the ``[hf]``
    extra), imported only when asked for."""
    try:
        from autocompress.tasks._minilm import minilm as build
    except ImportError as e:
        raise AutocompressError(
            f"the minilm task needs transformers ({e.name or e} is missing): "
            'pip install -e ".[hf]" (or pip install "autocompress[hf]")'
        ) from None
    return build()


_REGISTRY: dict[str, Callable[[], Task]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "mnist1d-cnn": mnist1d_cnn,
    "mnist1d-transformer": mnist1d_transformer,
    "minilm": minilm,
}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make ``factory`` available as ``get_task(name)``."""
    _REGISTRY[name] = factory


def task_names() -> list[str]:
    """Names of the registered tasks."""
    return sorted(_REGISTRY)


def get_task(spec: str) -> Task:
    """A task by registry name (``"digits-mlp"``) or by ``"module:function"``.

    Example:
        >>> get_task("digits-mlp").name
        'digits-mlp'
    """
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    if ":" not in spec:
        raise AutocompressError(
            f"unknown task {spec!r}: use one of {task_names()} or 'module:function'"
        )
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name.isidentifier():
        raise AutocompressError(
            f"task {spec!r} is not 'module:function' (e.g. 'mypkg.tasks:make_task'), "
            f"nor one of {task_names()}"
        )
    try:
        mod = importlib.import_module(mod_name)
    except (ImportError, ValueError) as e:
        raise AutocompressError(
            f"task {spec!r}: cannot import module {mod_name!r} ({e}); check PYTHONPATH"
        ) from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise AutocompressError(f"task {spec!r}: {mod_name} has no callable {fn_name!r}")
    task = fn()
    if not isinstance(task, Task):
        raise AutocompressError(
            f"task {spec!r}: {fn_name}() returned {type(task).__name__}, expected autocompress.Task"
        )
    task.spec = spec
    return task
