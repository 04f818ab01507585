"""The Optuna side of the search: samplers, the define-by-run space, baselines, constraints.

Ray's stock ``OptunaSearch`` never records constraints and leaves a trial RUNNING when its
objective is missing; :class:`ConstrainedOptunaSearch` (module level, so it pickles for resume)
fixes both and remembers the plans it has seen, so a plan proposed twice is not recomputed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from autocompress.errors import ConfigError
from autocompress.search._common import CONSTRAINT_PREFIX, SAMPLERS
from autocompress.spaces import CompressionSpace, Plan
from autocompress.spaces._space import ProjectingTrial as _ProjectingTrial

log = logging.getLogger(__name__)
RESAMPLES = 10
"""How often a repeated plan is sent back to the sampler before the trial runs it anyway."""


def make_sampler(name: str, seed: int, trials: int) -> Any:
    """The Optuna sampler called ``name`` (one of :data:`SAMPLERS`), seeded.

    ``"tpe"`` (the default of :func:`~autocompress.search.run`) is Optuna's multi-objective
    TPE, multivariate, with constant liar for parallel trials; it reads the constraints set on
    each trial. NSGA-II's population is ``trials // 5`` clamped to [4, 50], so a short run
    still evolves. At 100 trials on digits-mlp TPE found fronts with more hypervolume than
    NSGA-II, random sampling and a uniform grid (docs/benchmarks.md, *Search quality*).
    """
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, min(50, trials // 5))
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler={name!r} is unknown: use one of {list(SAMPLERS)}")


@dataclass(frozen=True)
class SpaceFn:
    """Define-by-run space: samples a Plan and returns it as the constant ``plan_json``."""

    space: CompressionSpace

    def __call__(self, trial: Any) -> dict[str, str]:
        return {"plan_json": self.space.suggest(trial).to_json()}


def baseline_params(
    space: CompressionSpace, plans: Sequence[Plan], *, strict: bool
) -> list[dict[str, Any]]:
    """Optuna parameter dicts that make ``space.suggest`` return each plan (deduplicated).

    With ``strict``, a plan the space cannot express raises :class:`ConfigError`; otherwise it is
    projected onto the space (nearest bit-width, sparsity clipped to the range and grid).
    """
    out: list[dict[str, Any]] = []
    for i, plan in enumerate(plans):
        if not isinstance(plan, Plan):
            raise ConfigError(f"baselines[{i}] is a {type(plan).__name__}, expected a Plan")
        t = _ProjectingTrial(plan, strict)
        got = space.suggest(t)
        if strict:
            problems = list(t.problems)
            if not problems and got.to_dict() != plan.replace(finetune=got.finetune).to_dict():
                problems.append("its layers differ from the space's (excluded/pinned/grouped)")
            if problems:
                raise ConfigError(
                    f"baselines[{i}] does not lie in the search space: {problems[0]}; "
                    "build it with space.uniform(...) or widen the knobs"
                )
        if t.params not in out:
            out.append(t.params)
    return out


CLASSIC = ((0.8, 6), (0.9, 4), (0.0, 8))
"""(sparsity, bits) of the hand-made uniform plans always tried first: 80%/6-bit, 90%/4-bit and
dense 8-bit (projected onto the space)."""


def warm_start_size(trials: int) -> int:
    """How many uniform plans open a search of ``trials`` trials: a tenth of the budget (TPE's
    random start-up, half of NSGA-II's first population), at least the three classic plans, at
    most 16."""
    return max(len(CLASSIC), min(16, trials // 10))


def default_baselines(space: CompressionSpace, n: int = len(CLASSIC), seed: int = 0) -> list[Plan]:
    """Uniform plans (the same knobs on every layer) to evaluate first, seeding the sampler.

    The three classic plans of :data:`CLASSIC` come first; the other ``n - 3`` are spread over
    the space's uniform sub-space (global width, sparsity, bit-width) by a scrambled Halton
    sequence, so the first generation already holds small (narrow, sparse, low-bit) and
    large models and the search refines per layer from there. Values are projected onto the
    space by :func:`baseline_params`.

    Example:
        >>> from autocompress.spaces import CompressionSpace, Knobs
        >>> from autocompress.tasks import get_task
        >>> model = get_task("digits-mlp").build_model()
        >>> space = CompressionSpace.from_model(model, Knobs(bits=(2, 4, 8), width=(0.2, 1.0)))
        >>> plans = default_baselines(space, n=6)
        >>> len(plans), sorted({p.width for p in plans})[0] < 1.0
        (6, True)
    """
    k = space.knobs
    plans = [space.uniform(sparsity=sp, bits=b) for sp, b in CLASSIC[:n]]
    extra = n - len(plans)
    if extra <= 0:
        return plans
    from scipy.stats import qmc

    lo_s, hi_s = k.sparsity if k.sparsity is not None else (0.0, 0.0)
    lo_w, hi_w = k.width if k.width is not None else (1.0, 1.0)
    bits = sorted(b for b in k.bits if b <= 8) or sorted(k.bits)
    points = qmc.Halton(d=3, scramble=True, seed=seed).random(extra)
    for u_w, u_s, u_b in points.tolist():
        b = bits[min(len(bits) - 1, int(u_b * len(bits)))]
        plans.append(
            space.uniform(
                sparsity=round(lo_s + u_s * (hi_s - lo_s), 4),
                bits=b,
                width=round(lo_w + u_w * (hi_w - lo_w), 4),
            )
        )
    return plans


UNITS = {
    "accuracy": "task score",
    "size_bytes": "bytes",
    "onnx_bytes": "bytes",
    "compression_ratio": "x teacher bytes",
    "params": "nonzero parameters",
    "macs": "multiply-accumulates",
    "bitops": "bit operations",
    "speedup": "x teacher speed",
    "score": "weighted sum",
}


def metric_unit(name: str, log: bool) -> str:
    """The unit of ``name`` as Optuna sees it (``log10(...)`` when told on a log scale).

    Example:
        >>> metric_unit("size_bytes", True), metric_unit("latency_ms_b1", False)
        ('log10(bytes)', 'ms')
    """
    unit = UNITS.get(name) or ("ms" if name.startswith("latency_ms") else "value")
    return f"log10({unit})" if log else unit


def _enqueued(ot_trial: Any) -> bool:
    """True if Optuna took this trial's parameters from ``enqueue_trial`` (not the sampler)."""
    attrs = ot_trial.storage.get_trial_system_attrs(ot_trial._trial_id)
    return "fixed_params" in attrs


class ConstrainedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that records constraints, marks failed trials FAIL and caches plans.

    * ``on_trial_complete`` calls ``trial.set_constraint("c<i>", value)`` from the reported
      ``cv_<i>`` keys before ``tell`` (Optuna 5's replacement for ``constraints_func``).
    * A trial that reports ``status == "FAILED"`` (or raised) is told FAIL, never a NaN value.
    * A plan the sampler proposes again (already evaluated, or running in another trial) does
      not cost a trial: that Optuna trial is closed as FAIL with ``user_attrs["repeat_of"]``
      naming the first trial (whose values are already in the study; FAIL because NSGA-II and
      TPE both ignore FAIL trials, while TPE would count a PRUNED one as a bad sample) and the
      sampler is asked again, up to :data:`RESAMPLES` times (once, after a suggest that found
      nothing new: the space is nearly exhausted). Only then does the trial run the
      repeat, with ``duplicate_of`` in its config so it reuses the first trial's record instead
      of recomputing. Plans enqueued on purpose (baselines, adoption on resume) are never
      resampled.
    * Metrics named in ``log_metrics`` are told to Optuna as ``log10`` of their (positive)
      value, so NSGA-II's crowding distance works on compression ratios, not raw bytes.
    * For optuna-dashboard and ``SearchResult.study()``: the study carries the metric names
      (``study.set_metric_names``) and their units (study user attr ``units``, e.g.
      ``"log10(bytes)"`` for ``size_bytes``); every trial that ran carries ``trial_id`` (the
      Tune trial id of ``trials.csv``) as a user attr, and every completed one its constraint
      values in the system attr ``constraints`` (a list, the form Optuna's samplers and the
      dashboard read), by name in the user attr ``constraints``, and the metrics themselves
      (not ``log10``) in the user attr ``metrics``.
    """

    def __init__(
        self,
        *args: Any,
        log_metrics: Sequence[str] = (),
        constraint_names: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        self._log_metrics = tuple(log_metrics)  # before super(): its _setup_study reads them
        self._constraint_names = tuple(constraint_names)
        super().__init__(*args, **kwargs)
        self._seen_plans: dict[str, str] = {}  # Plan.canonical(plan JSON) -> first trial
        self._plan_of: dict[str, str] = {}
        self._canonical_keys = True
        self._running: dict[str, str] = {}  # plan -> the trial evaluating it now
        self._exhausted = False

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        names = self._metric if isinstance(self._metric, list) else [self._metric]
        study = self._ot_study
        if study.metric_names is None and all(isinstance(n, str) for n in names):
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(names))
            logs = set(getattr(self, "_log_metrics", ()))
            study.set_user_attr("units", {n: metric_unit(n, n in logs) for n in names})

    def suggest(self, trial_id: str) -> dict | None:
        # after a suggest whose resamples all repeated (a nearly exhausted space), try once
        tries = 1 if getattr(self, "_exhausted", False) else RESAMPLES
        for attempt in range(tries + 1):
            config = super().suggest(trial_id)
            if not (isinstance(config, dict) and "plan_json" in config):
                return config
            first = self._first_with(config["plan_json"])
            ot_trial = self._ot_trials[trial_id]
            self._exhausted = first is not None and attempt == tries
            if first is None or attempt == tries or _enqueued(ot_trial):
                break
            ot_trial.set_user_attr("repeat_of", first)
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            del self._ot_trials[trial_id]
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("trial_id", trial_id)
        key = Plan.canonical(config["plan_json"])
        self._plan_of[trial_id] = key
        self._running_plans().setdefault(key, trial_id)
        if key in self._seen_plans:
            config["duplicate_of"] = self._seen_plans[key]
        return config

    def _first_with(self, plan_json: str) -> str | None:
        """The trial that evaluated (or is evaluating) ``plan_json`` in this run, if any
        (plans compared by :meth:`Plan.canonical`, so a run resumed by a newer version, whose
        full plan JSON names more knobs, still knows the plans it ran)."""
        key, running = Plan.canonical(plan_json), self._running_plans()
        return self._seen_plans.get(key) or running.get(key)

    def _running_plans(self) -> dict[str, str]:
        if not hasattr(self, "_running"):  # a searcher pickled before this attribute existed
            self._running = {}
        if not getattr(self, "_canonical_keys", False):  # pickled with raw plan JSON keys
            self._seen_plans = {Plan.canonical(k): v for k, v in self._seen_plans.items()}
            self._running = {Plan.canonical(k): v for k, v in self._running.items()}
            self._plan_of = {t: Plan.canonical(k) for t, k in self._plan_of.items()}
            self._canonical_keys = True
        return self._running

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # one report per trial: everything happens in on_trial_complete

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        failed = error or not result or result.get("status") != "COMPLETE"
        if ot_trial is not None and not failed:
            try:
                self._describe(ot_trial, result)
            except Exception as e:  # e.g. the trial was already told before a restore
                log.debug("recording constraints of %s failed: %s", trial_id, e)
        running = self._running_plans()  # (re-keys a searcher pickled before canonical keys)
        plan_key = self._plan_of.get(trial_id)
        if plan_key is not None and running.get(plan_key) == trial_id:
            del self._running[plan_key]
        if plan_key is not None and result and result.get("status") in ("COMPLETE", "FAILED"):
            self._seen_plans.setdefault(plan_key, result.get("duplicate_of") or trial_id)
        if failed:
            super().on_trial_complete(trial_id, None, error=True)
        else:
            super().on_trial_complete(trial_id, self._told(result), error=False)

    def _describe(self, ot_trial: Any, result: dict) -> None:
        """Constraints (system attr, as Optuna's samplers store them) and readable user attrs."""
        keys = sorted(
            (k for k in result if k.startswith(CONSTRAINT_PREFIX)),
            key=lambda k: int(k[len(CONSTRAINT_PREFIX) :]),
        )
        values = [float(result[k]) for k in keys]
        storage, tid = ot_trial.storage, ot_trial._trial_id
        if values and "constraints" not in storage.get_trial_system_attrs(tid):
            storage.set_trial_system_attr(tid, "constraints", values)
            names = list(getattr(self, "_constraint_names", ()))
            if len(names) != len(values):
                names = [f"c{i}" for i in range(len(values))]
            ot_trial.set_user_attr("constraints", dict(zip(names, values, strict=True)))
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        raw = {n: result[n] for n in metrics if isinstance(result.get(n), int | float)}
        for extra in ("size_bytes", "compression_ratio", "accuracy_drop"):
            if isinstance(result.get(extra), int | float):
                raw.setdefault(extra, result[extra])
        ot_trial.set_user_attr("metrics", raw)
        ot_trial.set_user_attr("feasible", bool(result.get("feasible", not values)))

    def _told(self, result: dict) -> dict:
        """``result`` with the log-scaled metrics replaced by ``log10`` of their value."""
        logs = getattr(self, "_log_metrics", ())  # absent in a searcher pickled before 0.2
        out = dict(result)
        for name in logs:
            v = out.get(name)
            if isinstance(v, int | float) and math.isfinite(v) and v > 0:
                out[name] = math.log10(v)
        return out
