"""Plan: one concrete compression configuration, keyed by fully qualified layer names.

A Plan is plain data (JSON round-trip, versioned) so it can travel through Ray, be stored next to
an artifact and be reloaded next year.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from autocompress.errors import PlanError
from autocompress.spaces._knobs import (
    ALLOWED_BITS,
    ALLOWED_GROUPS,
    CALIBRATIONS,
    SCHEMES,
    knobs_of,
    layer_conflict,
)

__all__ = [
    "ALLOWED_BITS",
    "ALLOWED_GROUPS",
    "CALIBRATIONS",
    "SCHEMES",
    "FinetuneSettings",
    "LayerPlan",
    "Plan",
]
PLAN_VERSION = 1


@dataclass(frozen=True)
class Bound:
    """The allowed values of one fine-tune setting: its type and inclusive (``ge``, ``le``) or
    exclusive (``gt``) bounds. ``FinetuneSettings`` and ``config.FinetuneConfig`` both read
    :data:`FINETUNE_BOUNDS`, so the plan and the YAML file cannot disagree.

    Example:
        >>> Bound(int, ge=1).text(), Bound(int, ge=1).allows(0)
        ('an integer >= 1', False)
    """

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()

    def allows(self, v: Any) -> bool:
        """True if ``v`` has the right type and lies within the bounds."""
        if self.kind is bool:
            return isinstance(v, bool)
        if self.kind is str:
            return isinstance(v, str) and v in self.choices
        if isinstance(v, bool) or not isinstance(v, int if self.kind is int else int | float):
            return False
        return (
            math.isfinite(v)
            and (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
        )

    def text(self) -> str:
        """What is allowed, for the one-line error."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = "an integer" if self.kind is int else "a finite number"
        parts = [f">= {self.ge:g}" if self.ge is not None else ""]
        parts += [f"> {self.gt:g}" if self.gt is not None else ""]
        parts += [f"<= {self.le:g}" if self.le is not None else ""]
        return " ".join([what, " and ".join(p for p in parts if p)]).strip()

    def field_kwargs(self) -> dict[str, float]:
        """The bounds as pydantic ``Field`` keyword arguments."""
        return {
            k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None
        }


FINETUNE_BOUNDS: dict[str, Bound] = {
    "epochs": Bound(int, ge=0, le=10_000),
    "lr": Bound(float, gt=0),
    "temperature": Bound(float, gt=0),
    "alpha": Bound(float, ge=0, le=1),
    "patience": Bound(int, ge=1),
    "batch_size": Bound(int, ge=1),
    "ramp": Bound(float, ge=0, le=1),
    "accum_steps": Bound(int, ge=1, le=10_000),
    "max_steps": Bound(int, ge=0),
    "max_seconds": Bound(float, ge=0),
    "amp": Bound(bool),
    "distill": Bound(str, choices=("output", "hidden")),
    "hidden_weight": Bound(float, ge=0),
    "dropout": Bound(bool),
    "warmup": Bound(float, ge=0, le=0.5),
}
"""The one source of truth for fine-tune settings' rules (one :class:`Bound` per field)."""


@dataclass(frozen=True)
class LayerPlan:
    """Knobs of one layer.

    Args:
        sparsity: fraction of weights set to zero by magnitude pruning, in [0, 1).
        bits: weight bit-width, one of ``ALLOWED_BITS``; 32 means no quantization.
        scheme: ``"uniform"`` (symmetric per-output-channel) or ``"codebook"`` (k-means shared
            weights as in Deep Compression).
        rank_ratio: low-rank factorization rank as a fraction of the largest useful rank, in
            (0, 1]; 1.0 means the layer is not factorized.
        group: with ``scheme="uniform"`` and ``bits <= 8``, how many consecutive weights along
            the input dimension share one scale (one of ``ALLOWED_GROUPS``); 0 (the default,
            and what older plans load as) is one scale per output channel.

    Example:
        >>> LayerPlan(bits=4, group=32).group
        32
    """

    sparsity: float = 0.0
    bits: int = 32
    scheme: str = "uniform"
    rank_ratio: float = 1.0
    group: int = 0
    hot_rows: float = 0.0
    hot_bits: int = 8

    def __post_init__(self) -> None:
        for spec in knobs_of("layer"):  # rules live in the knob registry (spaces._knobs)
            spec.check(getattr(self, spec.name))
        if not self.hot_rows and self.hot_bits != 8:  # does nothing: one plan, one spelling
            object.__setattr__(self, "hot_bits", 8)
        msg = layer_conflict({s.name: getattr(self, s.name) for s in knobs_of("layer")})
        if msg is not None:
            raise PlanError(msg)

    @property
    def is_identity(self) -> bool:
        """True when this layer is left exactly as it is."""
        return all(getattr(self, s.name) == s.default for s in knobs_of("layer") if s.identity)


@dataclass(frozen=True)
class FinetuneSettings:
    """Distillation fine-tune settings carried by a plan.

    Args:
        epochs: maximum fine-tune epochs (0 disables fine-tuning).
        lr: Adam learning rate.
        temperature: distillation temperature.
        alpha: weight of the distillation loss (1 - alpha weights the label loss).
        patience: early-stopping patience in epochs, measured on the validation split.
        batch_size: mini-batch size.
        ramp: fraction of the epochs over which sparsity grows gradually to its target (cubic
            schedule, Zhu & Gupta 2017); 0 prunes at once before fine-tuning.
        accum_steps: mini-batches whose gradients are summed before one optimizer step
            (gradient accumulation: an effective batch of ``batch_size * accum_steps``).
        max_steps: optimizer-step budget of one fine-tune (0: no limit); the fine-tune ends at
            the budget, evaluates and keeps the best weights (a calibration-only trial uses a
            small budget).
        max_seconds: wall-clock budget of one fine-tune in seconds (0: no limit), checked after
            every step without a device sync.
        amp: on CUDA, run forward passes under autocast (bf16 where supported, else fp16 with a
            gradient scaler); ignored on the CPU.
        distill: what the student learns from the teacher. ``"output"``: the task output only
            (:func:`~autocompress.compress._finetune.distill_loss`). ``"hidden"``: also each
            transformer block's hidden states (and the embeddings feeding the first block),
            as TinyBERT/MiniLM distillation does: a normalized MSE per block, masked by the
            batch's ``attention_mask`` (``compress._finetune.hidden_loss``). The teacher then
            runs on every training batch. Needs a model with a stack of repeated blocks
            (an ``nn.ModuleList`` of layers) and a student whose blocks keep the teacher's
            hidden size.
        hidden_weight: weight of the hidden-state term of ``distill="hidden"``.
        dropout: ``False`` fine-tunes the student in eval mode: no dropout (and BatchNorm
            statistics frozen), as when a pretrained model is distilled into its compressed
            self and dropout noise would only hide the quantization error.
        warmup: fraction of the planned optimizer steps with a linear learning-rate warmup;
            any ``warmup > 0`` also makes the learning rate follow a cosine per step over the
            planned steps (``max_steps``, else ``epochs`` times the steps of an epoch) instead
            of the default cosine per epoch, which a ``max_steps`` budget cuts short.

    Plans saved before a field existed still load: a missing key takes its default.
    """

    epochs: int = 30
    lr: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.7
    patience: int = 6
    batch_size: int = 64
    ramp: float = 0.33
    accum_steps: int = 1
    max_steps: int = 0
    max_seconds: float = 0.0
    amp: bool = True
    distill: str = "output"
    hidden_weight: float = 1.0
    dropout: bool = True
    warmup: float = 0.0

    def __post_init__(self) -> None:
        for name, bound in FINETUNE_BOUNDS.items():
            v = getattr(self, name)
            if not bound.allows(v):
                raise PlanError(f"finetune.{name}={v!r} must be {bound.text()}")


@dataclass(frozen=True)
class Plan:
    """One concrete compression configuration.

    Args:
        layers: per-layer knobs keyed by fully qualified module name (``model.named_modules()``).
            Layers not listed are left uncompressed.
        width: global student width multiplier in (0, 1]; hidden channels are shrunk structurally
            (in transformers: the feed-forward channels; the hidden size is kept).
        finetune: distillation fine-tune settings.
        heads: fraction of attention heads each transformer attention keeps, in (0, 1]; ``None``
            (the default, and what a plan saved without the key loads as) uses ``width``.
        calibration: how uniform weights are rounded (``CALIBRATIONS``): ``"none"`` (the
            default) rounds to nearest; ``"gptq"`` runs GPTQ (Frantar et al., 2022) on
            calibration inputs from the task's train split (``compress._gptq``).

    Example:
        >>> p = Plan.uniform(["fc1", "fc2"], sparsity=0.5, bits=4)
        >>> Plan.from_json(p.to_json()) == p
        True
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    width: float = 1.0
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    heads: float | None = None
    calibration: str = "none"

    def __post_init__(self) -> None:
        for spec in knobs_of("model"):
            spec.check(getattr(self, spec.name))
        for name, lp in self.layers.items():
            if not isinstance(lp, LayerPlan):
                raise PlanError(f"layer {name!r}: expected a LayerPlan, got {type(lp).__name__}")
        object.__setattr__(self, "layers", dict(sorted(self.layers.items())))

    @classmethod
    def uniform(
        cls,
        layers: Iterable[str],
        *,
        sparsity: float = 0.0,
        bits: int = 32,
        scheme: str = "uniform",
        rank_ratio: float = 1.0,
        width: float = 1.0,
        finetune: FinetuneSettings | None = None,
        heads: float | None = None,
        group: int = 0,
        calibration: str = "none",
    ) -> Plan:
        """The same knobs for every layer in ``layers`` (a baseline policy).

        Example:
            >>> Plan.uniform(["fc"], sparsity=0.9, bits=4).layers["fc"].bits
            4
        """
        lp = LayerPlan(
            sparsity=sparsity, bits=bits, scheme=scheme, rank_ratio=rank_ratio, group=group
        )
        return cls(
            layers={n: lp for n in layers},
            width=width,
            finetune=finetune or FinetuneSettings(),
            heads=heads,
            calibration=calibration,
        )

    def replace(self, **changes: Any) -> Plan:
        """A copy with some top-level fields changed."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return Plan(**d)

    def deployment_json(self) -> str:
        """What an artifact stores: the structure (width, per-layer knobs), compact, without
        the fine-tune settings, which only the search needs (its records keep them) and which
        would cost a small model's artifact about 120 bytes.

        Example:
            >>> Plan.uniform(["fc1"], sparsity=0.9, bits=4).deployment_json()
            '{"_type":"Plan","_version":1,"layers":{"fc1":{"bits":4,"sparsity":0.9}}}'
        """
        return self.replace(finetune=FinetuneSettings()).to_json(compact=True)

    @property
    def is_identity(self) -> bool:
        """True when applying the plan changes nothing structural or numeric."""
        return (
            self.head_fraction == 1.0
            and self.width == 1.0
            and all(lp.is_identity for lp in self.layers.values())
        )

    @property
    def head_fraction(self) -> float:
        """Fraction of attention heads kept: ``heads``, or ``width`` when it is not set."""
        return self.width if self.heads is None else self.heads

    # --- JSON -----------------------------------------------------------------------------
    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """Versioned plain-data form (``_type`` and ``_version`` keys).

        ``compact=True`` leaves out every value equal to its default (``from_dict`` restores
        them), which artifacts use because they count the bytes of their plan.
        """

        def strip(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if not compact or v != defaults[k]}

        lp_default, ft_default = asdict(LayerPlan()), asdict(FinetuneSettings())
        out: dict[str, Any] = {
            "_type": "Plan",
            "_version": PLAN_VERSION,
            "width": self.width,
            "finetune": strip(asdict(self.finetune), ft_default),
            "layers": {n: strip(asdict(lp), lp_default) for n, lp in self.layers.items()},
        }
        if compact:
            out = {k: v for k, v in out.items() if v not in ({}, 1.0) or k == "_version"}
        if self.heads is not None:  # 1.0 is not a default here: it differs from "follow width"
            out["heads"] = self.heads
        if self.calibration != "none":  # older readers never see the key they do not know
            out["calibration"] = self.calibration
        return out

    def to_json(self, compact: bool = False) -> str:
        """JSON without whitespace; ``compact=True`` also leaves out default values."""
        return json.dumps(self.to_dict(compact), separators=(",", ":"), sort_keys=True)

    @classmethod
    def canonical(cls, plan_json: str) -> str:
        """The compact JSON of the plan ``plan_json`` describes, or ``plan_json`` itself when it
        does not parse: one key per plan whichever autocompress version wrote the string (a
        full ``to_json`` gains a key per new knob, at its default).

        Example:
            >>> Plan.canonical('{"layers":{"fc1":{"bits":4,"sparsity":0.0}}}')
            '{"_type":"Plan","_version":1,"layers":{"fc1":{"bits":4}}}'
        """
        try:
            return cls.from_json(plan_json).to_json(compact=True)
        except (PlanError, ValueError, TypeError):
            return plan_json

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Rebuild from :meth:`to_dict`, refusing unknown versions or fields with a clear error."""
        if not isinstance(d, Mapping):
            raise PlanError(f"plan must be a JSON object, got {type(d).__name__}")
        if d.get("_type", "Plan") != "Plan":
            raise PlanError(f"plan _type={d.get('_type')!r} is not 'Plan'")
        version = d.get("_version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(
                f"plan _version={version!r} is not supported by this autocompress "
                f"(supports {PLAN_VERSION}): upgrade autocompress"
            )
        allowed = {"_type", "_version", "width", "finetune", "layers", "heads", "calibration"}
        extra = set(d) - allowed
        if extra:
            raise PlanError(f"plan has unknown keys {sorted(extra)}: allowed are {sorted(allowed)}")
        layers_raw = d.get("layers", {})
        if not isinstance(layers_raw, Mapping):
            raise PlanError("plan 'layers' must be an object mapping layer names to knobs")
        layer_keys = {f.name for f in fields(LayerPlan)}
        layers: dict[str, LayerPlan] = {}
        for name, knobs in layers_raw.items():
            if not isinstance(knobs, Mapping):
                raise PlanError(f"plan layer {name!r} must be an object of knobs")
            bad = set(knobs) - layer_keys
            if bad:
                raise PlanError(
                    f"plan layer {name!r} has unknown knobs {sorted(bad)}: "
                    f"allowed are {sorted(layer_keys)}"
                )
            layers[str(name)] = LayerPlan(**knobs)
        ft_raw = d.get("finetune", {})
        if not isinstance(ft_raw, Mapping):
            raise PlanError("plan 'finetune' must be an object")
        ft_keys = {f.name for f in fields(FinetuneSettings)}
        bad = set(ft_raw) - ft_keys
        if bad:
            raise PlanError(
                f"plan finetune has unknown keys {sorted(bad)}: allowed are {sorted(ft_keys)}"
            )
        return cls(
            layers=layers,
            width=d.get("width", 1.0),
            finetune=FinetuneSettings(**ft_raw),
            heads=d.get("heads"),
            calibration=d.get("calibration", "none"),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse :meth:`to_json` output."""
        try:
            d = json.loads(text)
        except RecursionError:
            raise PlanError("plan JSON is nested too deeply: re-export it") from None
        except json.JSONDecodeError as e:
            raise PlanError(
                f"plan is not valid JSON ({e.msg} at line {e.lineno}): re-export it"
            ) from e
        return cls.from_dict(d)
