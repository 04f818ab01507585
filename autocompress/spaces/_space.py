"""CompressionSpace: the searchable knobs of a model, and ``suggest(trial) -> Plan``."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autocompress.errors import PlanError
from autocompress.spaces._discover import LayerInfo, discover
from autocompress.spaces._knobs import KNOBS, Knobs, SampleContext, knobs_of
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan

__all__ = ["CompressionSpace", "Knobs"]


def _attention(model: nn.Module, knobs: Knobs) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Understood and not-understood attention blocks, looked for only when width/heads are
    searched (a layout whose sizes do not split into heads is refused here, before a search)."""
    if knobs.width is None and knobs.heads is None:
        return (), ()
    from autocompress.compress._heads import find_structure

    found = find_structure(model)
    return tuple(a.name for a in found.attention), tuple(n for n, _ in found.unknown)


def _check_names(names: Iterable[str], valid: Sequence[str] | Mapping[str, str], what: str) -> None:
    for n in names:
        if n not in valid:
            close = difflib.get_close_matches(n, valid, n=3)
            hint = f"did you mean {close}?" if close else f"valid layers: {list(valid)[:8]}"
            raise PlanError(f"unknown layer {n!r} in {what}: {hint}")


@dataclass
class CompressionSpace:
    """Searchable compression knobs of one model.

    Build it with :meth:`from_model`. Free layers (not excluded, not pinned) get their own
    knobs, layers tied in a group share one set of knobs, pinned layers take fixed knobs, and
    excluded layers are left uncompressed. A tensor shared by several modules (tied weights) is
    one layer; its other names (``LayerInfo.aliases``) are accepted wherever a layer name is
    and mean the same layer. ``skipped`` lists every parameter tensor that is not compressible
    with the reason, and ``coverage`` is the share of parameters in compressible layers.

    Example:
        >>> from autocompress.tasks._models import DigitsMLP
        >>> space = CompressionSpace.from_model(DigitsMLP(), exclude=["fc3"])
        >>> [layer.name for layer in space.layers]
        ['fc1', 'fc2', 'fc3']
        >>> sorted(space.free_groups())
        ['fc1', 'fc2']
        >>> f"{space.coverage:.3f}"
        '0.992'
    """

    layers: list[LayerInfo]
    knobs: Knobs = field(default_factory=Knobs)
    exclude: tuple[str, ...] = ()
    pin: Mapping[str, LayerPlan] = field(default_factory=dict)
    groups: tuple[tuple[str, ...], ...] = ()
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    skipped: Mapping[str, str] = field(default_factory=dict)
    total_params: int = 0
    attention: tuple[str, ...] = ()
    """Attention blocks whose heads width/heads can cut (``compress._heads.find_structure``)."""
    unknown_attention: tuple[str, ...] = ()
    """Attention-like modules whose layout is not understood: their heads are never cut."""

    def __post_init__(self) -> None:
        self._canon = _canonical_names(self.layers)
        self._by_name = {layer.name: layer for layer in self.layers}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        knobs: Knobs | None = None,
        *,
        exclude: Iterable[str] = (),
        pin: Mapping[str, LayerPlan | Mapping[str, Any]] | None = None,
        groups: Iterable[Iterable[str]] = (),
        finetune: FinetuneSettings | None = None,
        group_by: str | None = None,
        depth_buckets: int = 3,
    ) -> CompressionSpace:
        """Discover the compressible layers of ``model`` and validate every setting now.

        Names in ``exclude``, ``pin`` and ``groups`` may be aliases of a tied layer; they are
        stored under the layer's own name. ``group_by="role"`` then ties the free layers by
        role and depth (``spaces._roles.group_by_role``: Q/K/V, attention output, FFN in/out,
        embeddings, head, in ``depth_buckets`` depth buckets), so a deep model is searched
        with a handful of knobs instead of one set per layer; ``groups`` given here stay whole.
        """
        if group_by not in (None, "role"):
            raise PlanError(f"group_by={group_by!r} is unknown: use 'role' or None")
        found = discover(model)
        layers = found.layers
        if not layers:
            raise PlanError(
                f"{type(model).__name__} has no compressible layers (Linear, Conv, Embedding, "
                "HF Conv1D, RNN or attention weights)"
            )
        canon = _canonical_names(layers)
        exclude_t = tuple(dict.fromkeys(_canon(canon, n, "exclude") for n in exclude))
        pins: dict[str, LayerPlan] = {}
        for n, lp in (pin or {}).items():
            pins[_canon(canon, n, "pin")] = (
                lp if isinstance(lp, LayerPlan) else LayerPlan(**dict(lp))
            )
        groups_t = tuple(
            tuple(dict.fromkeys(_canon(canon, n, "groups") for n in g)) for g in groups
        )
        seen: set[str] = set()
        for g in groups_t:
            for n in g:
                if n in seen or n in exclude_t or n in pins:
                    raise PlanError(
                        f"layer {n!r} is in two groups or also excluded/pinned: use it once"
                    )
                seen.add(n)
        knobs = knobs or Knobs()
        attention, unknown = _attention(model, knobs)
        space = cls(
            layers,
            knobs,
            exclude_t,
            pins,
            groups_t,
            finetune or FinetuneSettings(),
            found.skipped,
            found.total_params,
            attention,
            unknown,
        )
        for n, lp in pins.items():
            space._check_layer_plan(n, lp)
        if group_by == "role":
            from autocompress.spaces._roles import group_by_role

            space = group_by_role(space, depth_buckets)
        return space

    # --- structure -------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def covered_params(self) -> int:
        """Parameters in compressible layers (a tied tensor counted once)."""
        return sum(layer.params for layer in self.layers)

    @property
    def coverage(self) -> float:
        """Share of the model's parameters in compressible layers, in [0, 1] (tied tensors
        counted once; excluded layers still count as covered: they could be compressed)."""
        total = self.total_params or self.covered_params
        return self.covered_params / total if total else 1.0

    def layer(self, name: str) -> LayerInfo:
        """The layer called ``name`` (or one of its aliases)."""
        return self._by_name[_canon(self._canon, name, "plan")]

    def free_groups(self) -> dict[str, tuple[str, ...]]:
        """Searchable units: ``{key: layer names}``; a tied group's key is its first layer."""
        tied = {n for g in self.groups for n in g}
        units = {g[0]: g for g in self.groups}
        for layer in self.layers:
            n = layer.name
            if n not in tied and n not in self.exclude and n not in self.pin:
                units[n] = (n,)
        return units

    def _check_layer_plan(self, name: str, lp: LayerPlan) -> None:
        info = self.layer(name)
        for spec in knobs_of("layer"):  # a knob this layer does not offer must keep its default
            reason = spec.offered(info)
            if reason is not None and getattr(lp, spec.name) != spec.default:
                raise PlanError(f"layer {name!r} {reason}: use {spec.name} {spec.default!r}")

    def validate(self, plan: Plan) -> Plan:
        """Check ``plan`` against this model's layers; return it unchanged if valid.

        Aliases of one tied layer must carry equal knobs (one tensor has one set of knobs).
        """
        given: dict[str, tuple[str, LayerPlan]] = {}
        for n, lp in plan.layers.items():
            self._check_layer_plan(n, lp)
            c = self._canon[n]
            if c in given and given[c][1] != lp:
                raise PlanError(
                    f"layers {given[c][0]!r} and {n!r} are one tied tensor but the plan gives "
                    f"them different knobs: give both the same knobs or name only {c!r}"
                )
            given.setdefault(c, (n, lp))
        return plan

    # --- sampling --------------------------------------------------------------------------
    def suggest(self, trial: Any) -> Plan:
        """Sample a Plan from an Optuna trial (define-by-run), knob by knob as registered in
        ``spaces._knobs.KNOBS``: per free unit its layer knobs (``"<unit>.<knob>"``), then the
        model knobs."""
        layers: dict[str, LayerPlan] = dict(self.pin)
        for key, members in self.free_groups().items():
            infos = [self.layer(m) for m in members]
            values: dict[str, Any] = {}
            for spec in knobs_of("layer"):
                ctx = SampleContext(self.knobs, self, infos, values)
                values[spec.name] = spec.draw(trial, f"{key}.{spec.name}", ctx)
            lp = LayerPlan(**values)
            for m in members:
                layers[m] = lp
        model: dict[str, Any] = {}
        for spec in knobs_of("model"):
            model[spec.name] = spec.draw(
                trial, spec.name, SampleContext(self.knobs, self, (), model)
            )
        return Plan(layers=layers, finetune=self.finetune, **model)

    def project(self, plan: Plan) -> Plan:
        """The plan of this space nearest to ``plan``: each knob the sampler would ask is read
        from ``plan`` and snapped onto the space (nearest bit-width, ranges clipped to their
        grid, grouped layers taking their group's first layer's knobs, pins applied).

        Example:
            >>> from autocompress.tasks._models import DigitsMLP
            >>> space = CompressionSpace.from_model(DigitsMLP(), Knobs(bits=(4, 8)))
            >>> space.project(space.uniform(bits=6)).layers["fc1"].bits in (4, 8)
            True
        """
        return self.suggest(ProjectingTrial(plan))

    def uniform(self, **knobs: Any) -> Plan:
        """A uniform baseline plan over the non-excluded layers (pins still apply)."""
        width, heads = knobs.pop("width", 1.0), knobs.pop("heads", None)
        if heads is None and self.unknown_attention and width < 1.0:
            heads = 1.0  # attention this space cannot cut keeps its heads (see suggest)
        names = [n for n in self.layer_names if n not in self.exclude and n not in self.pin]
        plan = Plan.uniform(names, width=width, heads=heads, finetune=self.finetune, **knobs)
        return plan.replace(layers={**plan.layers, **self.pin})

    def describe(self) -> list[dict[str, Any]]:
        """One row per layer: name, kind, params, shape, role, available knobs, note, aliases."""
        groups = self.free_groups()
        rows = []
        for layer in self.layers:
            role = "free"
            if layer.name in self.exclude:
                role = "excluded"
            elif layer.name in self.pin:
                role = "pinned"
            elif layer.name not in groups:
                role = "tied:" + next(g[0] for g in self.groups if layer.name in g)
            knobs = [s.label for s in knobs_of("layer") if s.label and s.offered(layer) is None]
            note = layer.note
            if layer.aliases:
                tied = "tied: also " + ", ".join(layer.aliases)
                note = f"{tied}; {note}" if note else tied
            rows.append(
                {
                    "layer": layer.name,
                    "kind": layer.kind,
                    "params": layer.params,
                    "shape": "x".join(map(str, layer.shape)),
                    "role": role,
                    "knobs": ",".join(knobs),
                    "note": note,
                    "aliases": ",".join(layer.aliases),
                }
            )
        return rows


def _canonical_names(layers: Sequence[LayerInfo]) -> dict[str, str]:
    """Every accepted layer name (own names and aliases) -> the layer's own name."""
    out = {layer.name: layer.name for layer in layers}
    for layer in layers:
        for a in layer.aliases:
            out.setdefault(a, layer.name)
    return out


def _canon(canon: Mapping[str, str], name: str, what: str) -> str:
    _check_names([name], canon, what)
    return canon[name]


class ProjectingTrial:
    """Answers ``CompressionSpace.suggest``'s questions from a Plan, snapping values onto the
    space; ``params`` collects the Optuna parameters and ``problems`` every value that had to
    move (the search's strict baseline check reads them)."""

    def __init__(self, plan: Plan, strict: bool = False) -> None:
        self.plan, self.strict, self.params = plan, strict, {}
        self.problems: list[str] = []

    def _value(self, name: str) -> Any:
        """The plan's value of the Optuna parameter ``name``, read by knob name (a model knob
        by its own name, a layer knob as ``"<layer>.<knob>"``) from the knob registry."""
        if name in KNOBS:
            return KNOBS[name].value_in(self.plan)
        key, _, knob = name.rpartition(".")
        return KNOBS[knob].value_in(self.plan, key)

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
