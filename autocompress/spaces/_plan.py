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

PLAN_VERSION = 1
ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16, 32)
SCHEMES: tuple[str, ...] = ("uniform", "codebook")


def _is_num(v: Any) -> bool:
    """A real number (``True``/``False`` are not)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


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
    """

    sparsity: float = 0.0
    bits: int = 32
    scheme: str = "uniform"
    rank_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not (_is_num(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise PlanError(f"sparsity={self.sparsity!r} is outside [0, 1): use e.g. 0.9")
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise PlanError(
                f"bits={self.bits!r} is not allowed: choose one of {list(ALLOWED_BITS)}"
            )
        if self.scheme not in SCHEMES:
            raise PlanError(f"scheme={self.scheme!r} is unknown: choose one of {list(SCHEMES)}")
        if not (_is_num(self.rank_ratio) and 0.0 < self.rank_ratio <= 1.0):
            raise PlanError(
                f"rank_ratio={self.rank_ratio!r} is outside (0, 1]: use 1.0 for no factorization"
            )

    @property
    def is_identity(self) -> bool:
        """True when this layer is left exactly as it is."""
        return self.sparsity == 0.0 and self.bits == 32 and self.rank_ratio == 1.0


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

    def __post_init__(self) -> None:
        for name in ("lr", "temperature", "alpha", "ramp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise PlanError(f"finetune.{name}={v!r} must be a finite number")
        if not (isinstance(self.epochs, int) and 0 <= self.epochs <= 10_000):
            raise PlanError(f"finetune.epochs={self.epochs!r} must be an integer in [0, 10000]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PlanError(f"finetune.lr={self.lr!r} must be a positive number")
        if not self.temperature > 0:
            raise PlanError(f"finetune.temperature={self.temperature!r} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise PlanError(f"finetune.alpha={self.alpha!r} must be in [0, 1]")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise PlanError(f"finetune.patience={self.patience!r} must be an integer >= 1")
        if not 0.0 <= self.ramp <= 1.0:
            raise PlanError(f"finetune.ramp={self.ramp!r} must be in [0, 1]")
        for name, low in (("batch_size", 1), ("accum_steps", 1), ("max_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise PlanError(f"finetune.{name}={v!r} must be an integer >= {low}")
        v = self.max_seconds
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
            raise PlanError(f"finetune.max_seconds={v!r} must be a finite number >= 0 (0: none)")
        if not isinstance(self.amp, bool):
            raise PlanError(f"finetune.amp={self.amp!r} must be true or false")


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

    Example:
        >>> p = Plan.uniform(["fc1", "fc2"], sparsity=0.5, bits=4)
        >>> Plan.from_json(p.to_json()) == p
        True
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    width: float = 1.0
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    heads: float | None = None

    def __post_init__(self) -> None:
        if not (_is_num(self.width) and 0.0 < self.width <= 1.0):
            raise PlanError(f"width={self.width!r} is outside (0, 1]: use 1.0 for no shrink")
        if self.heads is not None and not (_is_num(self.heads) and 0.0 < self.heads <= 1.0):
            raise PlanError(
                f"heads={self.heads!r} is outside (0, 1]: use 1.0 to keep every attention head"
            )
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
    ) -> Plan:
        """The same knobs for every layer in ``layers`` (a baseline policy).

        Example:
            >>> Plan.uniform(["fc"], sparsity=0.9, bits=4).layers["fc"].bits
            4
        """
        lp = LayerPlan(sparsity=sparsity, bits=bits, scheme=scheme, rank_ratio=rank_ratio)
        return cls(
            layers={n: lp for n in layers},
            width=width,
            finetune=finetune or FinetuneSettings(),
            heads=heads,
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
        return out

    def to_json(self, compact: bool = False) -> str:
        """JSON without whitespace; ``compact=True`` also leaves out default values."""
        return json.dumps(self.to_dict(compact), separators=(",", ":"), sort_keys=True)

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
        allowed = {"_type", "_version", "width", "finetune", "layers", "heads"}
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
