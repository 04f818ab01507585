"""Metrics: a name, a direction and a function ``(model, artifact, task) -> float``.

A new metric is one function plus one registry entry::

    @register_metric("macs", "minimize")
    def macs(model, artifact, task):
        ...

A metric function may also accept the keyword arguments ``split`` (``"val"`` or ``"test"``, the
split being evaluated) and ``reference`` (a :class:`Reference` with the teacher's numbers); they
are passed only to functions that declare them.

Besides registered names, :func:`get_metric` resolves *parametrized* names through resolvers
(:func:`register_family`): ``latency_ms_b1_torch`` is the latency metric at batch 1 in eager
PyTorch (see ``_deploy``).
"""

from __future__ import annotations

import importlib
import inspect
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autocompress.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from autocompress.artifacts import Artifact
    from autocompress.tasks import Task

DIRECTIONS = ("maximize", "minimize")
SCALES = ("linear", "log")
_ALIASES = {"max": "maximize", "min": "minimize", "maximize": "maximize", "minimize": "minimize"}


@dataclass(frozen=True)
class Reference:
    """The teacher's numbers that relative metrics compare against.

    Args:
        size_bytes: bytes of the teacher's artifact (the denominator of ``compression_ratio``).
        scores: the teacher's task score (``accuracy``) per split, e.g. ``{"val": 0.97}``.
    """

    size_bytes: int | None = None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One number to optimize or constrain.

    Args:
        name: column name in the results (letters, digits, ``_``).
        direction: ``"maximize"`` or ``"minimize"`` (``"max"``/``"min"`` accepted).
        fn: ``(model, artifact, task) -> float``; may also take the keywords ``split`` and
            ``reference`` (see the module docstring).
        details: optional ``(model, artifact, task) -> {name: float}``, called after ``fn``:
            extra numbers recorded next to the metric (e.g. a latency's spread), never
            optimized. Same keyword rules as ``fn``.
        scale: ``"linear"`` (default) or ``"log"``: the scale the sampler sees the metric on.
            Sizes, latencies and ratios that span decades are ``"log"``: NSGA-II's crowding
            distance then spreads the front evenly over compression ratios (2x, 10x, 100x)
            instead of crowding every small model into the first percent of a linear byte
            axis. Results and tables always hold the metric itself; only the value told to
            Optuna is ``log10`` (non-positive values are told as they are).

    Example:
        >>> m = Metric("nonzero_fc1", "minimize", lambda model, art, task: 3.0)
        >>> m.direction, m(None, None, None)
        ('minimize', 3.0)
    """

    name: str
    direction: str
    fn: Callable[..., float] = field(compare=False)
    details: Callable[..., Mapping[str, float]] | None = field(default=None, compare=False)
    scale: str = "linear"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(
                f"metric {self.name!r}: scale={self.scale!r} is unknown: use one of {list(SCALES)}"
            )
        if not (isinstance(self.name, str) and self.name.replace("_", "a").isalnum()):
            raise ConfigError(
                f"metric name {self.name!r} must use only letters, digits and '_': rename it"
            )
        direction = _ALIASES.get(str(self.direction).lower())
        if direction is None:
            raise ConfigError(
                f"metric {self.name!r}: direction={self.direction!r} is unknown: "
                "use 'maximize' or 'minimize'"
            )
        object.__setattr__(self, "direction", direction)
        if not callable(self.fn):
            raise ConfigError(f"metric {self.name!r}: fn must be callable (model, artifact, task)")
        if self.details is not None and not callable(self.details):
            raise ConfigError(f"metric {self.name!r}: details must be callable or None")
        check_signature(self.name, self.fn)
        if self.details is not None:
            check_signature(self.name, self.details, "details")

    def __call__(
        self,
        model: nn.Module,
        artifact: Artifact,
        task: Task,
        *,
        split: str = "val",
        reference: Reference | None = None,
    ) -> float:
        """Compute the metric, passing ``split``/``reference`` only if ``fn`` declares them."""
        kw = _keywords(self.fn, split, reference)
        return float(self.fn(model, artifact, task, **kw))

    def extra_values(
        self,
        model: nn.Module,
        artifact: Artifact,
        task: Task,
        *,
        split: str = "val",
        reference: Reference | None = None,
    ) -> dict[str, float]:
        """The ``details`` numbers (``{}`` without ``details``), as floats."""
        if self.details is None:
            return {}
        kw = _keywords(self.details, split, reference)
        return {str(k): float(v) for k, v in self.details(model, artifact, task, **kw).items()}

    @property
    def sign(self) -> float:
        """+1 for maximize, -1 for minimize (``sign * value`` is always 'higher is better')."""
        return 1.0 if self.direction == "maximize" else -1.0


SIGNATURE = "(model, artifact, task, *, split='val', reference=None)"
"""What a metric function is called with (``split`` and ``reference`` are optional)."""


def check_signature(name: str, fn: Callable[..., Any], role: str = "fn") -> None:
    """Refuse a metric function that cannot be called as ``fn(model, artifact, task)``.

    Checked when the metric (and so the objective) is built, before any search work.

    Example:
        >>> check_signature("acc", lambda outputs, targets: 0.0)
        Traceback (most recent call last):
        ...
        autocompress.errors.ConfigError: metric 'acc': <lambda>(outputs, targets) cannot be \
called as fn(model, artifact, task): define it as def <lambda>(model, artifact, task, *, \
split='val', reference=None) -> float
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to inspect
    try:
        sig.bind(None, None, None, **dict.fromkeys(_keyword_params(fn) & {"split", "reference"}))
    except TypeError:
        label = getattr(fn, "__name__", type(fn).__name__)
        raise ConfigError(
            f"metric {name!r}: {label}{sig} cannot be called as {role}(model, artifact, task): "
            f"define it as def {label}{SIGNATURE} -> "
            + ("float" if role == "fn" else "{name: float}")
        ) from None


def _keywords(fn: Callable[..., Any], split: str, reference: Reference | None) -> dict[str, Any]:
    params = _keyword_params(fn)
    kw: dict[str, Any] = {}
    if "split" in params:
        kw["split"] = split
    if "reference" in params:
        kw["reference"] = reference
    return kw


def _keyword_params(fn: Callable[..., Any]) -> set[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return {"split", "reference"}
    return set(sig.parameters)


# --- built-in metrics ----------------------------------------------------------------------
def _accuracy(model: nn.Module, artifact: Artifact, task: Task, *, split: str = "val") -> float:
    return task.evaluate(model, split)[task.metric_name]


def _size_bytes(model: nn.Module, artifact: Artifact, task: Task) -> float:
    return float(artifact.size_bytes)


_TEACHER_SIZES: dict[str, int] = {}


def teacher_size_bytes(task: Task) -> int:
    """Bytes of the task's teacher exported as an artifact (cached per process)."""
    key = f"{task.spec}:{task.cache_key()}"
    if key not in _TEACHER_SIZES:
        from autocompress.artifacts import export

        with tempfile.TemporaryDirectory() as tmp:
            art = export(task.teacher(), None, f"{tmp}/teacher", task_spec=task.spec)
            _TEACHER_SIZES[key] = art.size_bytes
    return _TEACHER_SIZES[key]


def _compression_ratio(
    model: nn.Module, artifact: Artifact, task: Task, *, reference: Reference | None = None
) -> float:
    ref = reference.size_bytes if reference and reference.size_bytes else None
    return float(ref or teacher_size_bytes(task)) / float(artifact.size_bytes)


def _params(model: nn.Module, artifact: Artifact, task: Task) -> float:
    return float(sum(int(p.count_nonzero()) for p in model.parameters()))


_REGISTRY: dict[str, Metric] = {
    "accuracy": Metric("accuracy", "maximize", _accuracy),
    "size_bytes": Metric("size_bytes", "minimize", _size_bytes, scale="log"),
    "compression_ratio": Metric("compression_ratio", "maximize", _compression_ratio, scale="log"),
    "params": Metric("params", "minimize", _params, scale="log"),
}


_FAMILIES: list[Callable[[str], Metric | None]] = []
_FAMILY_HINTS: list[str] = []


def register_family(resolver: Callable[[str], Metric | None], hint: str) -> None:
    """Add a resolver of parametrized metric names (tried after the registry).

    ``resolver(name)`` returns a :class:`Metric` for the names it understands, else None;
    ``hint`` is an example name shown in the unknown-metric error.
    """
    _FAMILIES.append(resolver)
    _FAMILY_HINTS.append(hint)


def _resolve_family(name: str) -> Metric | None:
    for resolver in _FAMILIES:
        metric = resolver(name)
        if metric is not None:
            return metric
    return None


def is_metric_name(name: str) -> bool:
    """True for a registered or parametrized metric name (not ``module:function``).

    Example:
        >>> is_metric_name("size_bytes"), is_metric_name("latency_ms_b1"), is_metric_name("x")
        (True, True, False)
    """
    return name in _REGISTRY or _resolve_family(name) is not None


def metric_names() -> list[str]:
    """Names of the registered metrics.

    Example:
        >>> {"accuracy", "size_bytes", "compression_ratio", "params"} <= set(metric_names())
        True
    """
    return sorted(_REGISTRY)


def register_metric(
    metric: Metric | str,
    direction: str | None = None,
    *,
    overwrite: bool = False,
    scale: str = "linear",
) -> Any:
    """Register a metric by name: pass a :class:`Metric`, or use as a decorator.

    Example:
        >>> @register_metric("doc_zero", "minimize", overwrite=True)
        ... def doc_zero(model, artifact, task):
        ...     return 0.0
        >>> get_metric("doc_zero").direction
        'minimize'
    """
    if isinstance(metric, Metric):
        if metric.name in _REGISTRY and not overwrite:
            raise ConfigError(
                f"metric {metric.name!r} is already registered: pass overwrite=True or rename it"
            )
        _REGISTRY[metric.name] = metric
        return metric
    if direction is None:
        raise ConfigError(f"register_metric({metric!r}) needs a direction: 'maximize'/'minimize'")
    name = metric

    def decorator(fn: Callable[..., float]) -> Callable[..., float]:
        register_metric(Metric(name, direction, fn, scale=scale), overwrite=overwrite)
        return fn

    return decorator


def get_metric(spec: str | Metric) -> Metric:
    """A metric by registry name or ``"module:function[:direction]"``.

    The ``module:function`` attribute may be a :class:`Metric`, a zero-argument factory that
    returns one, or the metric function itself; then the direction comes from the suffix
    (``"mypkg.metrics:flops:minimize"``) or from a ``direction`` attribute of the function, and
    the name is the function's name.

    Example:
        >>> get_metric("size_bytes").direction
        'minimize'
        >>> get_metric("autocompress.objectives._metric:_params:minimize").name
        '_params'
    """
    if isinstance(spec, Metric):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"metric {spec!r} must be a name, 'module:function' or a Metric")
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        metric = _resolve_family(spec)
        if metric is not None:
            return metric
        hints = "".join(f", {h!r}" for h in _FAMILY_HINTS)
        raise ConfigError(
            f"unknown metric {spec!r}: use one of {metric_names()}{hints} or 'module:function'"
        )
    return _from_module(spec)


def _from_module(spec: str) -> Metric:
    mod_name, _, rest = spec.partition(":")
    fn_name, _, direction = rest.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(
            f"metric {spec!r}: cannot import module {mod_name!r} ({e}): check PYTHONPATH"
        ) from e
    obj = getattr(mod, fn_name, None)
    if isinstance(obj, Metric):
        return obj
    if not callable(obj):
        raise ConfigError(f"metric {spec!r}: {mod_name} has no callable {fn_name!r}")
    sig = inspect.signature(obj)
    required = [
        p
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not required:  # a factory
        made = obj()
        if not isinstance(made, Metric):
            raise ConfigError(
                f"metric {spec!r}: {fn_name}() returned {type(made).__name__}, expected a Metric"
            )
        return made
    check_signature(fn_name, obj)
    direction = direction or getattr(obj, "direction", "")
    if not direction:
        raise ConfigError(
            f"metric {spec!r}: say its direction, e.g. '{mod_name}:{fn_name}:minimize'"
        )
    return Metric(fn_name, direction, obj)


def is_finite(value: float) -> bool:
    """True for a real, finite number."""
    return isinstance(value, int | float) and math.isfinite(value)
