"""The knob registry: every compression knob declared once, as a :class:`KnobSpec`.

A knob's spec says what it is (name, layer or model scope, identity value), how it is checked
(its allowed values and the one-line error), how it is searched (the :class:`Knobs` field
holding its range or choices, the grid step, how it is sampled from an Optuna trial), which
layers offer it (and why not) and which engine phase applies it. ``LayerPlan``/``Plan``
validation, :class:`Knobs` validation, ``CompressionSpace.suggest``/``describe``, the baseline
projection of the search and the YAML ranges of ``config.KnobsConfig`` all read this registry,
in the spirit of torchao's config -> handler registry.

This module imports no torch: ``config.py`` reads it to check a YAML file in well under a
second.

Adding a knob touches: one :func:`register` call here, its field on ``LayerPlan`` (or ``Plan``),
its range field on :class:`Knobs` (and ``KnobsConfig``) and the engine function that applies it.

Example:
    >>> KNOBS["rank_ratio"].scope, KNOBS["rank_ratio"].phase, KNOBS["rank_ratio"].default
    ('layer', 'structure', 1.0)
    >>> KNOBS["sparsity"].problem(1.0)
    'sparsity=1.0 is outside [0, 1): use e.g. 0.9'
    >>> [s.name for s in knobs_of("model")]
    ['width', 'heads', 'calibration']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from autocompress.errors import PlanError

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16, 32)
SCHEMES: tuple[str, ...] = ("uniform", "codebook")
ALLOWED_GROUPS: tuple[int, ...] = (0, 16, 32, 64, 128, 256)
"""Group sizes of uniform scales: 0 is one scale per output channel, else that many
consecutive weights along the input dimension share one scale (powers of two, as ONNX's
``MatMulNBits``/``GatherBlockQuantized`` blocks)."""
CALIBRATIONS: tuple[str, ...] = ("none", "gptq")
"""How uniform weights are rounded: ``none`` rounds to nearest; ``gptq`` compensates each
layer's rounding error from calibration inputs (Frantar et al., 2022; ``compress._gptq``)."""
STEP_MAX = 0.5
"""Largest grid step of a searched range (a coarser grid holds at most three points)."""
PHASES = ("structure", "prune", "quantize")
"""The engine's fixed phase order (``compress._apply``): width/heads and low rank, then
pruning, then quantization."""


def _is_num(v: Any) -> bool:
    """A real, finite number (``True``/``False`` are not)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SampleContext:
    """What a knob's sampler may look at: the searched ranges, the space, the layers of the
    unit being sampled (empty for model-scope knobs) and the values sampled so far."""

    knobs: Any
    space: Any
    layers: Sequence[Any]
    values: Mapping[str, Any]


@dataclass(frozen=True)
class KnobSpec:
    """One knob, declared once.

    Args:
        name: the field name on ``LayerPlan`` (scope ``"layer"``) or ``Plan`` (``"model"``),
            also the Optuna parameter name (``"<layer>.<name>"`` for layer knobs).
        scope: ``"layer"`` (one value per layer) or ``"model"`` (one value per plan).
        default: the identity value (the knob does nothing); what a plan without it loads as.
        phase: the engine phase applying it (one of :data:`PHASES`).
        error: the one-line error for a bad value, formatted with ``value``.
        low, high, low_open, high_open: the allowed interval of a numeric knob.
        choices: the allowed values of a categorical knob (then ``low``/``high`` are unused).
        nullable: ``None`` is allowed too (``Plan.heads``: follow ``width``).
        range_key: the :class:`Knobs` (and YAML ``space.knobs``) field holding the searched
            range ``(lo, hi)`` or the choices; ``step_key`` the field of its grid step.
        sample: ``(trial, param_name, ctx) -> value``; ``None`` samples the range on its grid.
        offered: ``(layer_info) -> reason or None``: why a layer does not offer the knob.
        label: the knob's name in ``CompressionSpace.describe``; ``None`` leaves it out.
        identity: whether ``is_identity`` compares it to ``default`` (``scheme`` does nothing
            without ``bits``).
        read: ``(plan) -> value`` of a model knob when it is not the plain field (``heads``
            follows ``width`` when unset).
    """

    name: str
    scope: Literal["layer", "model"]
    default: Any
    phase: str
    error: str
    low: float = 0.0
    high: float = 1.0
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    range_key: str | None = None
    step_key: str | None = None
    sample: Callable[[Any, str, SampleContext], Any] | None = None
    offered: Callable[[Any], str | None] = field(default=lambda layer: None)
    label: str | None = None
    identity: bool = True
    read: Callable[[Any], Any] | None = None

    def value_in(self, plan: Any, layer: str | None = None) -> Any:
        """This knob's effective value in ``plan`` (of ``layer`` for a layer knob; a layer the
        plan does not list has the default). The baseline projection of the search reads it."""
        if self.scope == "model":
            return self.read(plan) if self.read else getattr(plan, self.name)
        lp = plan.layers.get(layer)
        return self.default if lp is None else getattr(lp, self.name)

    @property
    def interval(self) -> str:
        """The allowed interval as text, e.g. ``"[0, 1)"``."""
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{lo}{self.low:g}, {self.high:g}{hi}"

    def allows(self, value: Any) -> bool:
        """True if ``value`` is a valid setting of this knob."""
        if value is None:
            return self.nullable
        if self.choices is not None:
            return not isinstance(value, bool) and value in self.choices
        if not _is_num(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def problem(self, value: Any) -> str | None:
        """The one-line error for ``value``, or ``None`` if it is valid."""
        return None if self.allows(value) else self.error.format(value=value)

    def check(self, value: Any) -> None:
        """Raise :class:`PlanError` if ``value`` is not valid."""
        msg = self.problem(value)
        if msg is not None:
            raise PlanError(msg)

    def range_problem(self, r: Any) -> str | None:
        """Why ``r`` is not a valid searched range (or choices) of this knob, else ``None``."""
        if r is None:
            return None
        if self.choices is not None:
            if not r or any(not self.allows(v) for v in r):
                return f"each must be one of {list(self.choices)}"
            return None
        if not (len(r) == 2 and all(_is_num(x) and self.allows(x) for x in r)):
            return f"give [low, high] with numbers in {self.interval}"
        if r[0] > r[1]:
            return f"lower bound {r[0]} > upper {r[1]}"
        return None

    def draw(self, trial: Any, name: str, ctx: SampleContext) -> Any:
        """This knob's value for one trial: the default when not offered or not searched."""
        if any(self.offered(layer) is not None for layer in ctx.layers):
            return self.default
        if self.sample is not None:
            return self.sample(trial, name, ctx)
        r = getattr(ctx.knobs, self.range_key) if self.range_key else None
        if r is None:
            return self.default
        v = round(trial.suggest_float(name, *r, step=getattr(ctx.knobs, self.step_key)), 6)
        return min(v, 0.99) if self.high_open else min(v, self.high)


KNOBS: dict[str, KnobSpec] = {}
"""Every knob by name, in sampling order (the order Optuna is asked)."""


def register(spec: KnobSpec) -> KnobSpec:
    """Add ``spec`` to :data:`KNOBS` (its name must be new and its phase known)."""
    if spec.name in KNOBS:
        raise PlanError(f"knob {spec.name!r} is registered twice: give the new knob a new name")
    if spec.phase not in PHASES or spec.scope not in ("layer", "model"):
        raise PlanError(f"knob {spec.name!r}: phase must be one of {PHASES}, scope layer/model")
    KNOBS[spec.name] = spec
    return spec


def knobs_of(scope: str) -> list[KnobSpec]:
    """The registered knobs of ``scope`` (``"layer"`` or ``"model"``), in sampling order."""
    return [s for s in KNOBS.values() if s.scope == scope]


# --- the knobs --------------------------------------------------------------------------------
def _sample_sparsity(trial: Any, name: str, ctx: SampleContext) -> float:
    r = ctx.knobs.sparsity
    if r is None or r[1] <= 0:
        return 0.0
    return min(round(trial.suggest_float(name, *r, step=ctx.knobs.sparsity_step), 6), 0.99)


def _sample_bits(trial: Any, name: str, ctx: SampleContext) -> int:
    return int(trial.suggest_categorical(name, list(ctx.knobs.bits)))


def _sample_scheme(trial: Any, name: str, ctx: SampleContext) -> str:
    schemes = ctx.knobs.schemes
    if len(schemes) > 1 and ctx.values["bits"] <= 8:
        return str(trial.suggest_categorical(name, list(schemes)))
    return schemes[0]


def _sample_group(trial: Any, name: str, ctx: SampleContext) -> int:
    groups, v = ctx.knobs.groups, ctx.values
    if v["bits"] > 8 or v["scheme"] != "uniform":
        return 0  # group-wise scales only exist for uniform codes
    if len(groups) > 1:
        return int(trial.suggest_categorical(name, list(groups)))
    return int(groups[0])


def _sample_calibration(trial: Any, name: str, ctx: SampleContext) -> str:
    choices = ctx.knobs.calibration
    if len(choices) > 1:
        return str(trial.suggest_categorical(name, list(choices)))
    return str(choices[0])


def _sample_hot_rows(trial: Any, name: str, ctx: SampleContext) -> float:
    r, v = ctx.knobs.hot_rows, ctx.values
    if r is None or r[1] <= 0 or v["bits"] > 8 or v["scheme"] != "uniform":
        return 0.0  # tiers split uniform low-bit tables only
    if v.get("rank_ratio", 1.0) < 1.0 or not any(b > v["bits"] for b in ctx.knobs.hot_bits):
        return 0.0
    return min(round(trial.suggest_float(name, *r, step=ctx.knobs.hot_rows_step), 6), 0.99)


def _sample_hot_bits(trial: Any, name: str, ctx: SampleContext) -> int:
    v = ctx.values
    choices = list(ctx.knobs.hot_bits)
    wider = [b for b in choices if b > v["bits"]]
    if v.get("hot_rows", 0.0) <= 0 or not wider:
        return int(KNOBS["hot_bits"].default)
    # one fixed list per parameter (TPE refuses choices that change between trials); a draw
    # not above the table's bits becomes the narrowest width that is
    b = int(trial.suggest_categorical(name, choices)) if len(choices) > 1 else choices[0]
    return int(b if b > v["bits"] else min(wider))


def layer_conflict(values: Mapping[str, Any]) -> str | None:
    """The one-line error when a layer's knobs contradict each other, else ``None``.

    Example:
        >>> layer_conflict({"group": 32, "bits": 16, "scheme": "uniform"})
        "group=32 needs scheme 'uniform' and bits <= 8 (got 'uniform', 16 bits): use group=0"
        >>> layer_conflict({"bits": 2, "scheme": "uniform", "hot_rows": 0.1, "hot_bits": 2})
        'hot_rows=0.1 needs hot_bits > bits (got hot_bits=2, bits=2): e.g. bits=2, hot_bits=4'
    """
    g, bits, scheme = values.get("group", 0), values.get("bits", 32), values.get("scheme")
    if g and (bits > 8 or scheme != "uniform"):
        return (
            f"group={g} needs scheme 'uniform' and bits <= 8 (got {scheme!r}, {bits} bits): "
            "use group=0"
        )
    hot, hot_bits = values.get("hot_rows", 0.0), values.get("hot_bits", 8)
    if hot:
        if bits > 8 or scheme != "uniform":
            return (
                f"hot_rows={hot} needs scheme 'uniform' and bits <= 8 (got {scheme!r}, "
                f"{bits} bits): use hot_rows=0"
            )
        if hot_bits <= bits:
            return (
                f"hot_rows={hot} needs hot_bits > bits (got hot_bits={hot_bits}, bits={bits}): "
                f"e.g. bits={bits}, hot_bits={min(b for b in ALLOWED_BITS if b > bits + 1)}"
            )
        if values.get("rank_ratio", 1.0) < 1.0:
            return f"hot_rows={hot} cannot be combined with rank_ratio < 1: use one of them"
    return None


def _no_tiers(layer: Any) -> str | None:
    """Why ``layer`` cannot be split into hot and cold rows (``hot_rows``), else ``None``."""
    if layer.tiers:  # not an nn.Embedding, or one computing more than a lookup
        return f"hot rows: {layer.tiers}"
    if layer.aliases:
        return "hot rows: the table is tied to another layer"
    if not layer.shape or layer.shape[0] < 2:
        return "hot rows: fewer than 2 rows"
    return None


def _not_factorizable(layer: Any) -> str | None:
    return None if layer.factorizable else f"cannot be factorized ({layer.note})"


def _sample_heads(trial: Any, name: str, ctx: SampleContext) -> float | None:
    k, space = ctx.knobs, ctx.space
    if k.heads is not None and space.attention and not space.unknown_attention:
        return round(trial.suggest_float(name, *k.heads, step=k.width_step), 6)
    if space.unknown_attention and ctx.values["width"] < 1.0:
        return 1.0  # their heads cannot be cut: shrink the feed-forward layers only
    return None


register(
    KnobSpec(
        "sparsity",
        "layer",
        0.0,
        "prune",
        "sparsity={value!r} is outside [0, 1): use e.g. 0.9",
        high_open=True,
        range_key="sparsity",
        step_key="sparsity_step",
        sample=_sample_sparsity,
        label="sparsity",
    )
)
register(
    KnobSpec(
        "bits",
        "layer",
        32,
        "quantize",
        "bits={value!r} is not allowed: choose one of " + str(list(ALLOWED_BITS)),
        choices=ALLOWED_BITS,
        range_key="bits",
        sample=_sample_bits,
        label="bits",
    )
)
register(
    KnobSpec(
        "scheme",
        "layer",
        "uniform",
        "quantize",
        "scheme={value!r} is unknown: choose one of " + str(list(SCHEMES)),
        choices=SCHEMES,
        range_key="schemes",
        sample=_sample_scheme,
        identity=False,
    )
)
register(
    KnobSpec(
        "rank_ratio",
        "layer",
        1.0,
        "structure",
        "rank_ratio={value!r} is outside (0, 1]: use 1.0 for no factorization",
        low_open=True,
        range_key="rank_ratio",
        step_key="rank_step",
        offered=_not_factorizable,
        label="rank",
    )
)
register(
    KnobSpec(
        "group",
        "layer",
        0,
        "quantize",
        "group={value!r} is not allowed: choose one of " + str(list(ALLOWED_GROUPS)),
        choices=ALLOWED_GROUPS,
        range_key="groups",
        sample=_sample_group,
        label="group",
        identity=False,
    )
)
register(
    KnobSpec(
        "hot_rows",
        "layer",
        0.0,
        "structure",
        "hot_rows={value!r} is outside [0, 1): use e.g. 0.1 (0 keeps one table)",
        high_open=True,
        range_key="hot_rows",
        step_key="hot_rows_step",
        sample=_sample_hot_rows,
        offered=_no_tiers,
        label="hot rows",
    )
)
register(
    KnobSpec(
        "hot_bits",
        "layer",
        8,
        "quantize",
        "hot_bits={value!r} is not allowed: choose one of " + str(list(ALLOWED_BITS[:-1])),
        choices=ALLOWED_BITS[:-1],
        range_key="hot_bits",
        sample=_sample_hot_bits,
        offered=_no_tiers,
        identity=False,
    )
)
register(
    KnobSpec(
        "width",
        "model",
        1.0,
        "structure",
        "width={value!r} is outside (0, 1]: use 1.0 for no shrink",
        low_open=True,
        range_key="width",
        step_key="width_step",
    )
)
register(
    KnobSpec(
        "heads",
        "model",
        None,
        "structure",
        "heads={value!r} is outside (0, 1]: use 1.0 to keep every attention head",
        low_open=True,
        nullable=True,
        range_key="heads",
        step_key="width_step",
        sample=_sample_heads,
        read=lambda plan: plan.head_fraction,
    )
)
register(
    KnobSpec(
        "calibration",
        "model",
        "none",
        "quantize",
        "calibration={value!r} is unknown: choose one of " + str(list(CALIBRATIONS)),
        choices=CALIBRATIONS,
        range_key="calibration",
        sample=_sample_calibration,
    )
)


@dataclass(frozen=True)
class Knobs:
    """Ranges searched for every free layer (and the global width).

    A range ``(lo, hi)`` with ``lo == hi`` fixes the knob. ``None`` disables a knob. Each
    range is checked by its knob's :class:`KnobSpec` (:data:`KNOBS`).

    Args:
        sparsity: range of per-layer sparsity, within [0, 1).
        sparsity_step: grid step of sparsity.
        bits: allowed per-layer bit-widths (subset of 2..8, 16, 32).
        schemes: quantization schemes to choose from (``uniform``, ``codebook``).
        rank_ratio: range of per-layer rank ratio in (0, 1]; ``None`` disables factorization.
        rank_step: grid step of rank ratio.
        width: range of the global width multiplier in (0, 1]; ``None`` disables it.
        width_step: grid step of width.
        heads: range of the fraction of attention heads every transformer attention keeps,
            in (0, 1], searched separately from ``width`` (which then cuts the feed-forward
            channels only); ``None``: heads follow ``width``. Sampled on ``width_step``'s grid,
            and only for models whose attention blocks are understood (``Plan.heads``).
        groups: group sizes of uniform scales to choose from (:data:`ALLOWED_GROUPS`; 0 is one
            scale per output channel, the default); layers at 16/32 bits or with the codebook
            scheme always get 0.
        calibration: how uniform weights are rounded, chosen per plan (:data:`CALIBRATIONS`;
            ``"gptq"`` needs calibration data from the task's train split).
        hot_rows: range of the fraction of an embedding table's rows kept at ``hot_bits``
            (the rows the task's train split uses most; the rest at ``bits``), within [0, 1);
            ``None`` (the default) disables it. Offered by untied ``nn.Embedding`` tables.
        hot_rows_step: grid step of ``hot_rows``.
        hot_bits: bit-widths to choose from for the hot rows (only those above the table's
            ``bits`` are drawn).

    Example:
        >>> Knobs(width=(0.5, 1.0)).width
        (0.5, 1.0)
    """

    sparsity: tuple[float, float] | None = (0.0, 0.95)
    sparsity_step: float = 0.05
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16, 32)
    schemes: tuple[str, ...] = ("uniform",)
    rank_ratio: tuple[float, float] | None = None
    rank_step: float = 0.05
    width: tuple[float, float] | None = None
    width_step: float = 0.05
    heads: tuple[float, float] | None = None
    groups: tuple[int, ...] = (0,)
    calibration: tuple[str, ...] = ("none",)
    hot_rows: tuple[float, float] | None = None
    hot_rows_step: float = 0.05
    hot_bits: tuple[int, ...] = (4, 8)

    def __post_init__(self) -> None:
        for spec in KNOBS.values():
            if spec.range_key is None:
                continue
            r = getattr(self, spec.range_key)
            msg = spec.range_problem(r)
            if msg is not None or (spec.choices is not None and r is None):
                raise PlanError(f"knob {spec.range_key}={r!r}: {msg or 'give the choices'}")
        for name in sorted({s.step_key for s in KNOBS.values() if s.step_key}):
            v = getattr(self, name)
            if not (_is_num(v) and 0 < v <= STEP_MAX):
                raise PlanError(f"knob {name}={v!r} must be in (0, {STEP_MAX}]")
