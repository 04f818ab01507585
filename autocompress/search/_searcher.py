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
from autocompress.spaces import CompressionSpace, LayerPlan, Plan

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


class _ProjectingTrial:
    """Answers ``space.suggest``'s questions from a Plan, snapping values onto the space."""

    def __init__(self, plan: Plan, strict: bool) -> None:
        self.plan, self.strict, self.params = plan, strict, {}
        self.problems: list[str] = []

    def _value(self, name: str) -> Any:
        if name == "width":
            return self.plan.width
        key, _, knob = name.rpartition(".")
        return getattr(self.plan.layers.get(key, LayerPlan()), knob)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None) -> float:
        want = float(self._value(name))
        v = min(max(want, low), high)
        if step:
            v = round(low + round((v - low) / step) * step, 6)
            v = min(max(v, low), high)
        if not math.isclose(v, want, abs_tol=1e-6):
            self.problems.append(f"{name}={want} is outside the space ({low}..{high} step {step})")
        self.params[name] = v
        return v

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int:
        return int(round(self.suggest_float(name, low, high, step)))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        want = self._value(name)
        if want in choices:
            v = want
        elif all(isinstance(c, int | float) for c in choices):
            v = min(choices, key=lambda c: abs(c - want))
        else:
            v = choices[0]
        if v != want:
            self.problems.append(f"{name}={want!r} is not among {list(choices)}")
        self.params[name] = v
        return v


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
    """

    def __init__(self, *args: Any, log_metrics: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen_plans: dict[str, str] = {}
        self._plan_of: dict[str, str] = {}
        self._running: dict[str, str] = {}  # plan -> the trial evaluating it now
        self._log_metrics = tuple(log_metrics)
        self._exhausted = False

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
        key = config["plan_json"]
        self._plan_of[trial_id] = key
        self._running_plans().setdefault(key, trial_id)
        if key in self._seen_plans:
            config["duplicate_of"] = self._seen_plans[key]
        return config

    def _first_with(self, plan_json: str) -> str | None:
        """The trial that evaluated (or is evaluating) ``plan_json`` in this run, if any."""
        return self._seen_plans.get(plan_json) or self._running_plans().get(plan_json)

    def _running_plans(self) -> dict[str, str]:
        if not hasattr(self, "_running"):  # a searcher pickled before this attribute existed
            self._running = {}
        return self._running

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # one report per trial: everything happens in on_trial_complete

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        failed = error or not result or result.get("status") != "COMPLETE"
        if ot_trial is not None and not failed:
            for key in sorted(k for k in result if k.startswith(CONSTRAINT_PREFIX)):
                value = float(result[key])
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ot_trial.set_constraint("c" + key[len(CONSTRAINT_PREFIX) :], value)
                except Exception as e:  # e.g. the trial was already told before a restore
                    log.debug("set_constraint on %s failed: %s", trial_id, e)
        plan_key = self._plan_of.get(trial_id)
        if plan_key is not None and self._running_plans().get(plan_key) == trial_id:
            del self._running[plan_key]
        if plan_key is not None and result and result.get("status") in ("COMPLETE", "FAILED"):
            self._seen_plans.setdefault(plan_key, result.get("duplicate_of") or trial_id)
        if failed:
            super().on_trial_complete(trial_id, None, error=True)
        else:
            super().on_trial_complete(trial_id, self._told(result), error=False)

    def _told(self, result: dict) -> dict:
        """``result`` with the log-scaled metrics replaced by ``log10`` of their value."""
        logs = getattr(self, "_log_metrics", ())  # absent in a searcher pickled before 0.2
        out = dict(result)
        for name in logs:
            v = out.get(name)
            if isinstance(v, int | float) and math.isfinite(v) and v > 0:
                out[name] = math.log10(v)
        return out
