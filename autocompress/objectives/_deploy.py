"""Deployment metrics: measured latency and speedup, analytic MACs and BitOPs, ONNX file size.

Registered names:

* ``latency_ms`` (minimize) and ``speedup`` (maximize): batch 256, ONNX Runtime, 1 thread.
  ``speedup`` is ``teacher latency / latency``, both timed interleaved in the same process and
  runtime (:func:`~autocompress.deploy.latency_and_speedup`), so machine noise cancels.
* Parametrized names, usable anywhere a metric name is (YAML included):
  ``latency_ms_b<batch>[_t<threads>][_torch]`` and ``speedup_b<batch>[_t<threads>][_torch]``,
  e.g. ``latency_ms_b1``, ``speedup_b256_t2``, ``latency_ms_b1_torch`` (eager PyTorch instead
  of ONNX Runtime). In Python, :func:`latency_metric` / :func:`speedup_metric` also set the
  repeats, warm-up and time cap.
* ``macs`` and ``bitops`` (minimize): per example (batch 1), dense weight products, from
  :func:`~autocompress.deploy.macs` / :func:`~autocompress.deploy.bitops`.
* ``onnx_bytes`` (minimize): bytes of the ONNX Runtime deployment file
  (``to_onnx(model, x, int8="auto")``, or the form the objective scored with
  ``score_runtime="onnxruntime"``; the artifact's ``model.onnx`` when it has one).

One measurement per model and setting is shared by every metric that needs it: results, the
exported ONNX forms and the fp32/int8 choice are cached per model object (a weak reference, so
the cache dies with the model; an in-place change of the weights invalidates it), and the
teacher's ONNX session is cached per process. ``latency_ms_b256`` and ``speedup_b256`` of one
candidate therefore cost one export and one interleaved timing.

Each latency metric also records (as metric ``details``, see :class:`Metric`) the numbers of its
measurement, with the metric's suffix: ``latency_ms``, ``latency_iqr_ms``, ``speedup``,
``speedup_iqr``, ``teacher_latency_ms`` and, for ONNX Runtime, ``onnx_int8`` / ``onnx_lowbit``
(1.0 when that form was the one timed).

A model that cannot be exported to ONNX makes the ONNX Runtime metrics raise (the trial is
recorded FAILED with the reason): falling back to eager PyTorch for some candidates would mix
two runtimes in one front. Use the ``_torch`` names to time such models.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from autocompress.errors import AutocompressError, ConfigError
from autocompress.objectives._metric import Metric, register_family, register_metric

if TYPE_CHECKING:
    from autocompress.artifacts import Artifact
    from autocompress.deploy import OnnxModel
    from autocompress.tasks import Task

RUNTIMES = ("onnxruntime", "torch")
DEFAULT_BATCH = 256
EXAMPLE_ROWS = 64
"""Real validation rows used for export and timing (repeated to make larger batches)."""
_NAME = re.compile(
    r"^(?P<family>latency_ms|speedup)(?:_b(?P<batch>[1-9][0-9]{0,5}))?"
    r"(?:_t(?P<threads>[1-9][0-9]?))?(?P<torch>_torch)?$"
)


@dataclass(frozen=True)
class LatencySettings:
    """How a latency is measured (the cache key of a measurement).

    Args:
        batch: batch size of each timed call.
        runtime: ``"onnxruntime"`` (the deployment form, int8 where it is faster) or
            ``"torch"`` (eager PyTorch under ``inference_mode``).
        threads: intra-op threads of the runtime (both the model and the teacher).
        repeats: timed rounds (each times the model and the teacher once, interleaved).
        warmup: untimed rounds first.
        max_seconds: stop timing after this long once 5 rounds are done.

    Example:
        >>> LatencySettings(batch=1, runtime="torch").suffix
        '_b1_torch'
        >>> LatencySettings().suffix
        ''
    """

    batch: int = DEFAULT_BATCH
    runtime: str = "onnxruntime"
    threads: int = 1
    repeats: int = 25
    warmup: int = 3
    max_seconds: float | None = 5.0

    def __post_init__(self) -> None:
        for name in ("batch", "threads", "repeats"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"latency {name}={v!r} must be an integer >= 1")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ConfigError(f"latency warmup={self.warmup!r} must be an integer >= 0")
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"latency runtime={self.runtime!r} is unknown: use one of {list(RUNTIMES)}"
            )
        m = self.max_seconds
        if m is not None and not (isinstance(m, int | float) and math.isfinite(m) and m > 0):
            raise ConfigError(f"latency max_seconds={m!r} must be a positive number or None")

    @property
    def suffix(self) -> str:
        """The name suffix of these settings (``""`` for the defaults of ``latency_ms``)."""
        s = "" if self.batch == DEFAULT_BATCH else f"_b{self.batch}"
        s += "" if self.threads == 1 else f"_t{self.threads}"
        return s + ("_torch" if self.runtime == "torch" else "")


# --- per-model cache -----------------------------------------------------------------------
@dataclass
class _Deployed:
    """What one model's deployment metrics share: ONNX forms, sessions, choices, timings."""

    stamp: tuple
    forms: dict[str, bytes] | None = None
    approx: bool = False  # forms with int8 activations built too
    error: str | None = None
    sessions: dict[tuple[str, int], Any] = field(default_factory=dict)
    choice: dict[tuple[int, int], str] = field(default_factory=dict)
    results: dict[LatencySettings, dict[str, float]] = field(default_factory=dict)
    pinned: str | None = None  # the form an objective scored (score_runtime): timed and sized


_CACHE: weakref.WeakKeyDictionary[Any, _Deployed] = weakref.WeakKeyDictionary()


def _stamp(model: Any) -> tuple:
    """Identity of the weights' current values (storage and in-place version of each)."""
    if not isinstance(model, nn.Module):
        return ()
    return tuple((n, t.data_ptr(), t._version) for n, t in model.state_dict().items())


def _entry(model: Any) -> _Deployed:
    stamp = _stamp(model)
    entry = _CACHE.get(model)
    if entry is None or entry.stamp != stamp:
        entry = _Deployed(stamp)
        _CACHE[model] = entry
    return entry


def _example(task: Task) -> Any:
    """Real validation rows: a tensor, a tuple or a dict of tensors (Hugging Face batches)."""
    return task.example_input(EXAMPLE_ROWS)


def _output(task: Task) -> str | int | None:
    """The model output the task scores (``Task.output``): the one the ONNX graph returns."""
    return getattr(task, "output", None)


def _forms(
    entry: _Deployed, model: nn.Module, task: Task, who: str, approx: bool = False
) -> dict[str, bytes]:
    """The serialized exact ONNX forms of ``model`` (fp32, low-bit) and, with ``approx``, also
    those with int8 activations (``int8``, ``lowbit_int8``), exported once."""
    from autocompress.deploy import deploy_forms

    if entry.forms is not None and approx and not entry.approx:
        entry.forms, entry.sessions, entry.choice = None, {}, {}
    if entry.forms is None and entry.error is None:
        try:
            entry.forms = deploy_forms(model, _example(task), int8=approx, output=_output(task))
            entry.approx = approx
        except AutocompressError as e:
            entry.error = str(e)
    if entry.forms is None:
        raise AutocompressError(
            f"metric {who!r} times the ONNX Runtime form, but {entry.error}; or time eager "
            f"PyTorch instead with a '_torch' metric (e.g. 'latency_ms_torch')"
        )
    return entry.forms


def _session(entry: _Deployed, form: str, threads: int) -> OnnxModel:
    from autocompress.deploy import OnnxModel

    key = (form, threads)
    if key not in entry.sessions:
        assert entry.forms is not None
        entry.sessions[key] = OnnxModel(entry.forms[form], threads=threads)
    return entry.sessions[key]


def _chosen(entry: _Deployed, model: Any, task: Task, batch: int, threads: int, who: str) -> str:
    """The form ``to_onnx(int8="auto")`` picks at ``batch``/``threads`` without calibration data
    (an exact form: fp32 or low-bit; timed once), or the form an objective with
    ``score_runtime="onnxruntime"`` scored and checked (then every deployment metric reports
    that one)."""
    from autocompress.deploy import tile_batch
    from autocompress.deploy._fidelity import is_exact
    from autocompress.deploy._onnx import as_numpy, choose_form, small_forms

    forms = _forms(entry, model, task, who)
    if entry.pinned is not None:
        return entry.pinned
    key = (batch, threads)
    if key not in entry.choice:
        if len(forms) == 1:
            entry.choice[key] = next(iter(forms))
        else:
            small = [f for f in small_forms(forms) if is_exact(f)]
            sessions = {f: _session(entry, f, threads) for f in small}
            x = as_numpy(tile_batch(_example(task), batch))
            entry.choice[key] = choose_form(forms, x, threads=threads, sessions=sessions)
    return entry.choice[key]


def deployed_form(model: Any) -> tuple[str, bytes] | None:
    """``(form, serialized ONNX)`` an objective with ``score_runtime="onnxruntime"`` scored for
    ``model`` (the one to ship as ``model.onnx``), or None when none was scored.

    Example:
        >>> deployed_form(nn.Linear(2, 2)) is None
        True
    """
    entry = _CACHE.get(model)
    if entry is None or entry.pinned is None or entry.forms is None:
        return None
    if entry.stamp != _stamp(model):
        return None
    return entry.pinned, entry.forms[entry.pinned]


def measure(model: Any, task: Task, settings: LatencySettings, who: str = "latency_ms") -> dict:
    """The latency measurement of ``model`` vs ``task``'s teacher (cached per model).

    Returns ``latency_ms``, ``latency_iqr_ms``, ``speedup``, ``speedup_iqr``,
    ``teacher_latency_ms`` and, for ONNX Runtime, ``onnx_int8`` and ``onnx_lowbit``.
    """
    from autocompress.deploy import OnnxModel, latency_and_speedup

    entry = _entry(model)
    if settings in entry.results:
        return entry.results[settings]
    b, threads = settings.batch, settings.threads
    timing: dict[str, Any] = {
        "threads": threads,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "max_seconds": settings.max_seconds,
    }
    x, teacher = _example(task), task.teacher()
    timing["output"] = _output(task)
    if settings.runtime == "torch":
        if not isinstance(model, nn.Module):
            raise AutocompressError(f"metric {who!r} runs eager PyTorch: it needs an nn.Module")
        r = latency_and_speedup(model, teacher, x, (b,), runtime="torch", **timing)
    else:
        if isinstance(model, OnnxModel):
            cand = model
        else:
            cand = _session(entry, _chosen(entry, model, task, b, threads, who), threads)
        r = latency_and_speedup(cand, teacher, x, (b,), runtime="onnxruntime", **timing)
    out = {
        "latency_ms": r[f"latency_ms@{b}"],
        "latency_iqr_ms": r[f"latency_iqr_ms@{b}"],
        "speedup": r[f"speedup@{b}"],
        "speedup_iqr": r[f"speedup_iqr@{b}"],
        "teacher_latency_ms": r[f"teacher_latency_ms@{b}"],
    }
    if settings.runtime == "onnxruntime":
        out["onnx_int8"] = r[f"int8@{b}"]
        out["onnx_lowbit"] = r[f"lowbit@{b}"]
    entry.results[settings] = out
    return out


@dataclass(frozen=True)
class _Measured:
    """A metric function reading one value of a (shared, cached) latency measurement."""

    settings: LatencySettings
    key: str
    name: str

    def __call__(self, model: Any, artifact: Artifact | None, task: Task) -> float:
        return measure(model, task, self.settings, self.name)[self.key]


@dataclass(frozen=True)
class _Details:
    """The whole measurement, keys suffixed like the metric's name."""

    settings: LatencySettings
    suffix: str
    name: str

    def __call__(self, model: Any, artifact: Artifact | None, task: Task) -> dict[str, float]:
        r = measure(model, task, self.settings, self.name)
        return {f"{k}{self.suffix}": v for k, v in r.items()}


def _make(family: str, name: str | None, suffix: str | None, settings: LatencySettings) -> Metric:
    suffix = settings.suffix if suffix is None else suffix
    name = name or f"{family}{suffix}"
    direction = "minimize" if family == "latency_ms" else "maximize"
    return Metric(
        name,
        direction,
        _Measured(settings, family, name),
        details=_Details(settings, suffix, name),
        scale="log",
    )


def latency_metric(
    batch: int = DEFAULT_BATCH,
    runtime: str = "onnxruntime",
    threads: int = 1,
    *,
    repeats: int = 25,
    warmup: int = 3,
    max_seconds: float | None = 5.0,
    name: str | None = None,
) -> Metric:
    """Measured latency per call (ms, minimize) of the model at ``batch`` in ``runtime``.

    The model and the task's dense teacher are timed interleaved in the same process and
    runtime after ``warmup`` rounds; the value is the median of ``repeats`` rounds. With
    ``runtime="onnxruntime"`` the model runs in its deployment form (exported to ONNX; int8
    where the plan quantized Linear layers to <= 8 bits and that is faster at ``batch``).

    Args:
        batch, runtime, threads, repeats, warmup, max_seconds: see :class:`LatencySettings`.
        name: the metric's name; default ``latency_ms`` plus the settings' suffix
            (``latency_ms_b1_torch``), the same name a YAML file would use.

    Example:
        >>> m = latency_metric(batch=1)
        >>> m.name, m.direction
        ('latency_ms_b1', 'minimize')
        >>> latency_metric(batch=1, runtime="torch", repeats=100, name="lat1").name
        'lat1'
    """
    settings = LatencySettings(batch, runtime, threads, repeats, warmup, max_seconds)
    return _make("latency_ms", name, None, settings)


def speedup_metric(
    batch: int = DEFAULT_BATCH,
    runtime: str = "onnxruntime",
    threads: int = 1,
    *,
    repeats: int = 25,
    warmup: int = 3,
    max_seconds: float | None = 5.0,
    name: str | None = None,
) -> Metric:
    """Measured ``teacher latency / latency`` (maximize), the median of per-round ratios.

    Same measurement (and the same cache entry) as :func:`latency_metric` with equal settings.

    Example:
        >>> speedup_metric().name, speedup_metric(batch=1, threads=2).name
        ('speedup', 'speedup_b1_t2')
    """
    settings = LatencySettings(batch, runtime, threads, repeats, warmup, max_seconds)
    return _make("speedup", name, None, settings)


def _resolve(name: str) -> Metric | None:
    """``latency_ms_b1_torch`` and friends (see the module docstring)."""
    m = _NAME.match(name)
    if m is None:
        return None
    settings = LatencySettings(
        batch=int(m["batch"] or DEFAULT_BATCH),
        runtime="torch" if m["torch"] else "onnxruntime",
        threads=int(m["threads"] or 1),
    )
    return _make(m["family"], name, name[len(m["family"]) :], settings)


# --- analytic cost and file size -----------------------------------------------------------
def _module(model: Any, who: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise AutocompressError(f"metric {who!r} counts a torch model's layers: pass an nn.Module")
    return model


def _macs(model: nn.Module, artifact: Artifact | None, task: Task) -> float:
    from autocompress.deploy import macs

    return float(macs(_module(model, "macs"), task.example_input(1)))


def _bitops(model: nn.Module, artifact: Artifact | None, task: Task) -> float:
    from autocompress.deploy import bitops

    return float(bitops(_module(model, "bitops"), task.example_input(1)))


def _onnx_bytes(model: Any, artifact: Artifact | None, task: Task) -> float:
    from autocompress.artifacts._io import ONNX

    if artifact is not None and ONNX in getattr(artifact, "files", {}):
        return float(artifact.files[ONNX])
    model = _module(model, "onnx_bytes")
    entry = _entry(model)
    form = _chosen(entry, model, task, DEFAULT_BATCH, 1, "onnx_bytes")
    assert entry.forms is not None
    return float(len(entry.forms[form]))


register_metric(latency_metric(), overwrite=True)
register_metric(speedup_metric(), overwrite=True)
register_metric(Metric("macs", "minimize", _macs, scale="log"), overwrite=True)
register_metric(Metric("bitops", "minimize", _bitops, scale="log"), overwrite=True)
register_metric(Metric("onnx_bytes", "minimize", _onnx_bytes, scale="log"), overwrite=True)
register_family(_resolve, "latency_ms_b1_torch")
