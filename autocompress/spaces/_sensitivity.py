"""Per-unit sensitivity: how much each searchable unit costs in task score and saves in bytes.

A search over many layers needs to know, before its first trial, which layers tolerate low bits.
:func:`sensitivity` compresses ONE unit of the space at a time (a layer, a tied group, or a
role x depth group of :func:`~autocompress.spaces._roles.group_by_role`) with each candidate
setting (the space's bit-widths; sparsity levels and group-wise scales when the space has them;
token embeddings split into hot and cold rows when it searches ``hot_rows``),
through the engine itself (``compress.apply`` without a task: post-training, no fine-tune), and
measures on a small calibration subset of the train split (never test):

* ``drop``: the task metric of the teacher minus that of the compressed model (higher is worse);
* ``distortion``: mean squared error of the selected outputs to the teacher's, divided by the
  variance of the teacher's outputs (a smooth score, additive to first order over layers, as the
  Hessian-trace methods HAWQ and the mixed-precision work after it assume);
* ``bytes``: the real encoded bytes of the unit's weight tensors (the artifact encoder's
  ``to_codes`` + ``encode_best``), against ``base_bytes`` for the fp32 teacher.

:func:`greedy_plan` then solves the multiple-choice knapsack greedily on each unit's lower convex
hull of (bytes saved, distortion): the cheapest distortion per byte saved first, until a byte
budget is met. :func:`sensitivity_plans` returns such plans for several budgets plus the
hand-style plans (Linear 8-bit + embedding 4-bit, ...), all projected onto the space, for the
search to evaluate first.

Example:
    >>> from autocompress.spaces import CompressionSpace, Knobs
    >>> from autocompress.tasks import get_task
    >>> task = get_task("digits-mlp")
    >>> space = CompressionSpace.from_model(task.teacher(), Knobs(bits=(4, 8), sparsity=None))
    >>> sens = sensitivity(task, space, examples=64)
    >>> [u.key for u in sens.units], len(sens.units[0].settings)
    (['fc1', 'fc2', 'fc3'], 2)
    >>> plans = greedy_plans(sens, space, n=2)
    >>> len(plans) == 2 and sens.estimate(plans[0]) >= sens.estimate(plans[1])
    True
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress.errors import PlanError
from autocompress.spaces._knobs import KNOBS
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan
from autocompress.spaces._roles import layer_roles

if TYPE_CHECKING:
    from autocompress.spaces._discover import LayerInfo
    from autocompress.spaces._space import CompressionSpace
    from autocompress.tasks._base import Task

__all__ = [
    "Measured",
    "Sensitivity",
    "UnitSensitivity",
    "greedy_plan",
    "greedy_plans",
    "hand_plans",
    "sensitivity",
    "sensitivity_plans",
]

log = logging.getLogger(__name__)
VERSION = 2
"""2: settings may split a table into hot and cold rows (``hot_rows``); their bytes count
both tables and the row mask."""
DEFAULT_BITS = (8, 6, 4, 3)
"""Bit-widths measured by default (those of them the space offers; all of its own otherwise)."""
FINETUNED_SLACK = 4.0
"""How far past the tolerated drop the greedy warm start goes when plans are fine-tuned."""
EMBED_BITS = (2,)
"""Widths measured in addition for token embeddings (role ``embed``) when the space offers
them: the biggest tensor of a small language model, with no GPTQ to lean on, so its lowest
widths are where bytes are (MiniLM's word embedding at 2 bits, group 32, clipped: 2.8 MB of
the 9.4 MB an 8x plan has, at a val cosine drop of 0.03)."""
SPARSITY_LEVELS = (0.5, 0.75, 0.9)
"""Sparsity levels tried per unit when the space searches sparsity (at the top bit-width)."""
HAND = ((8, 8), (8, 4), (6, 8), (6, 4), (4, 4, 128, 128), (4, 3, 128, 64), (4, 2, 64, 32))
"""(bits of every other layer, bits of the token embeddings[, their groups]) of the hand-style
plans: all 8-bit, Linear 8-bit + embedding 4-bit, Linear 6-bit + embedding 8-bit, Linear 6-bit
+ embedding 4-bit; and the small ones a fine-tune (or GPTQ) is for: Linear 4-bit with group-128
scales + embedding 4-bit group 128, 3-bit group 64 or 2-bit group 32 (about 7x, 8x and 9x on
MiniLM)."""
HAND_TIERED = ((4, 2, 64, 64, 0.1, 4), (4, 2, 128, 64, 0.1, 4), (8, 2, 0, 64, 0.1, 4))
"""Hand-style plans added when the space offers ``hot_rows``: as :data:`HAND`, then the token
embeddings' ``hot_rows`` and ``hot_bits``: Linear 4-bit group 64, 4-bit group 128 or 8-bit,
each with the word embedding at 2 bits group 64 except its 10% most used rows at 4 bits (on
MiniLM that embedding alone scores test cosine 0.9958 post-training, against 0.9929 for the
whole table at 3 bits group 64, ~1.1 MB larger)."""
HOT_ROWS = 0.1
"""The hot fraction measured for token embeddings when the space's ``hot_rows`` range holds
it (else the top of the range): the ``minilm`` task's 2000 training sentences look up 3171 of
the 30522 rows of its word embedding, so a tenth of the table holds nearly all of them."""
TIER_BITS = (2, 3)
"""Widths of the cold rows measured with a hot tier (those of them the space offers)."""


@dataclass(frozen=True)
class Measured:
    """One setting of one unit, applied alone.

    Args:
        knobs: the unit's layer knobs (``LayerPlan`` fields).
        bytes: encoded bytes of the unit's weight tensors with this setting.
        drop: teacher metric minus this model's metric on the calibration subset.
        distortion: normalized mean squared error of the selected outputs to the teacher's.
    """

    knobs: dict[str, Any]
    bytes: int
    drop: float
    distortion: float

    @property
    def layer_plan(self) -> LayerPlan:
        return LayerPlan(**self.knobs)


@dataclass(frozen=True)
class UnitSensitivity:
    """The measured settings of one searchable unit (``key`` names it as the space does)."""

    key: str
    layers: tuple[str, ...]
    role: str
    params: int
    base_bytes: int
    settings: tuple[Measured, ...]
    keep: dict[str, Any] | None = None
    """The unit's knobs when the space leaves it uncompressed (``None``: it must compress)."""

    def options(self) -> list[Measured]:
        """Every setting the greedy may choose: the measured ones and, when the space allows
        it, leaving the unit as it is (0 drop, 0 distortion, its teacher bytes)."""
        keep = [] if self.keep is None else [Measured(self.keep, self.base_bytes, 0.0, 0.0)]
        return keep + list(self.settings)

    def at(self, lp: LayerPlan) -> Measured | None:
        """The measured (or kept) setting equal to ``lp``, if any."""
        return next((m for m in self.options() if m.layer_plan == lp), None)


@dataclass
class Sensitivity:
    """Result of :func:`sensitivity`: every unit's settings, and how it was measured."""

    units: list[UnitSensitivity]
    metric_name: str
    teacher_score: float
    split: str
    examples: int
    other_bytes: int
    """Encoded bytes of every tensor outside the free units (biases, norms, excluded layers)."""
    seconds: float
    evaluations: int
    key: str = ""
    cached: bool = field(default=False, compare=False)

    @property
    def teacher_bytes(self) -> int:
        """Encoded bytes of the whole fp32 teacher's tensors (weights file payload)."""
        return self.other_bytes + sum(u.base_bytes for u in self.units)

    def unit(self, key: str) -> UnitSensitivity:
        return next(u for u in self.units if u.key == key)

    def ranking(self, bits: int | None = None) -> list[str]:
        """Unit keys, most sensitive first: by distortion at ``bits`` (default: the lowest
        bit-width measured for every unit), then by drop."""
        common = set.intersection(
            *({m.knobs.get("bits") for m in u.settings if not m.knobs.get("sparsity")}
              for u in self.units)
        )  # fmt: skip
        b = bits if bits is not None else min(common, default=None)

        def score(u: UnitSensitivity) -> tuple[float, float]:
            ms = [m for m in u.settings if m.knobs.get("bits") == b and not m.knobs.get("sparsity")]
            return (max((m.distortion for m in ms), default=0.0),
                    max((m.drop for m in ms), default=0.0))  # fmt: skip

        return [u.key for u in sorted(self.units, key=score, reverse=True)]

    def estimate(self, plan: Plan) -> int | None:
        """Projected weights bytes of ``plan`` from the measured units (``None`` if a unit's
        setting in ``plan`` was not measured)."""
        total = self.other_bytes
        for u in self.units:
            lp = plan.layers.get(u.key, LayerPlan())
            m = u.at(lp)
            if m is None:
                return None
            total += m.bytes
        return total

    def table(self) -> list[dict[str, Any]]:
        """One row per unit and setting (for printing)."""
        return [
            {"unit": u.key, "role": u.role, "layers": len(u.layers), "params": u.params,
             "knobs": _short(m.knobs), "bytes": m.bytes, "base_bytes": u.base_bytes,
             "drop": round(m.drop, 6), "distortion": float(f"{m.distortion:.4g}")}
            for u in self.units for m in u.settings
        ]  # fmt: skip

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("cached")
        return json.dumps({"_type": "autocompress-sensitivity", "_version": VERSION, **d})

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        d = json.loads(text)
        if d.pop("_type", None) != "autocompress-sensitivity" or d.pop("_version", 0) != VERSION:
            raise PlanError("not a sensitivity file of this version: delete it to measure again")
        units = []
        for u in d.pop("units"):
            u["layers"] = tuple(u["layers"])
            u["settings"] = tuple(Measured(**m) for m in u["settings"])
            units.append(UnitSensitivity(**u))
        return cls(units=units, **d)


def _short(knobs: dict[str, Any]) -> str:
    """``{"bits": 4, "sparsity": 0.0, ...}`` as ``"4b"`` plus the knobs off their default."""
    parts = [f"{knobs.get('bits')}b"]
    for name, v in knobs.items():
        spec = KNOBS.get(name)
        if name != "bits" and spec is not None and v != spec.default:
            parts.append(f"{name}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- measuring
def _calibration(task: Task, split: str, examples: int, skip: int = 0) -> list[tuple[Any, Any]]:
    """``examples`` examples of ``split`` after its first ``skip`` (the first ``examples`` when
    the split is too short to skip them) as (inputs, targets) batches."""
    from autocompress.tasks._batch import batch_len, select, take

    out, have, seen = [], 0, 0
    bs = max(1, min(examples, task.eval_batch_size))
    for inputs, y in task.batches(split, bs):
        n = batch_len(inputs)
        if seen + n <= skip:
            seen += n
            continue
        lo = max(0, skip - seen)
        seen += n
        if lo:
            inputs = select(inputs, slice(lo, None))
            y = y[lo:] if isinstance(y, torch.Tensor) else y
        k = min(n - lo, examples - have)
        out.append((take(inputs, k), y[:k] if isinstance(y, torch.Tensor) else y))
        have += k
        if have >= examples:
            break
    if not out and skip:
        return _calibration(task, split, examples)
    if not out:
        raise PlanError(f"task {task.name!r}: the {split} split yielded no example")
    return out


@torch.no_grad()
def _outputs(model: nn.Module, task: Task, calib: Sequence[tuple[Any, Any]]) -> torch.Tensor:
    from autocompress.tasks._batch import call_model, pick_output

    model.eval()
    return torch.cat([pick_output(call_model(model, x), task.output).float() for x, _ in calib])


def _targets(calib: Sequence[tuple[Any, Any]]) -> Any:
    ys = [y for _, y in calib]
    if any(not isinstance(y, torch.Tensor) for y in ys):
        return None
    return torch.cat(ys)


def _score(task: Task, out: torch.Tensor, y: Any, ref: torch.Tensor) -> float:
    from autocompress.tasks._base import metric_arity

    args = (out, y) if metric_arity(task.metric) == 2 else (out, y, ref)
    return float(task.metric(*args))


def _distortion(out: torch.Tensor, ref: torch.Tensor) -> float:
    var = float(ref.var()) if ref.numel() > 1 else 0.0
    mse = float(((out - ref) ** 2).mean())
    return mse / var if var > 0 else mse


def _tensor_bytes(name: str, t: torch.Tensor, rec: Any, search: bool) -> int:
    from autocompress.artifacts._encode import encode_best
    from autocompress.artifacts._kinds import to_codes

    coded = to_codes(name, t.detach().cpu(), rec)
    return len(encode_best(coded.codes, coded.bits, coded.aux, search=search).data)


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _unit_lp(space: CompressionSpace, members: Sequence[str], lp: LayerPlan) -> LayerPlan:
    """``lp`` for this unit snapped onto the space (what the sampler can really produce)."""
    projected = space.project(Plan(layers=dict.fromkeys(members, lp)))
    return projected.layers[members[0]]


def candidate_settings(
    space: CompressionSpace,
    members: Sequence[str],
    bits: Iterable[int] | None = None,
    sparsity: Iterable[float] | None = None,
    role: str = "",
) -> tuple[list[LayerPlan], LayerPlan | None]:
    """``(settings to measure, the kept setting or None)`` of one unit, every one in the space.

    Settings: each bit-width of ``bits`` (default: those of :data:`DEFAULT_BITS` the space
    offers, else all of the space's but 32) at the space's
    lowest sparsity (token embeddings, ``role="embed"``, also at :data:`EMBED_BITS`); with
    group-wise scales in the space (the ``group`` knob), the finest and
    coarsest group at 4 bits and below; with sparsity searched, :data:`SPARSITY_LEVELS` (or
    ``sparsity``) at the highest bit-width <= 8. When the space offers ``hot_rows`` to a token
    embedding (``Knobs.hot_rows``; untied ``nn.Embedding`` tables), that unit is also measured
    split in two tiers: cold rows at :data:`TIER_BITS`, the hot fraction :data:`HOT_ROWS` (or the
    top of the range) at each of ``Knobs.hot_bits`` above them, at the finest and coarsest
    group. The kept setting is the identity when the space allows a unit to stay uncompressed.
    """
    k = space.knobs
    if bits is None:  # a few well-spread widths keep the pass cheap; the search tries the rest
        wanted = DEFAULT_BITS + (EMBED_BITS if role == "embed" else ())
        bits = [b for b in k.bits if b in wanted] or [b for b in k.bits if b != 32]
    bits_l = sorted({b for b in bits if b != 32}, reverse=True)
    want: list[dict[str, Any]] = [{"bits": b} for b in bits_l]
    groups = [g for g in getattr(k, "groups", (0,)) or (0,) if g]
    if "group" in KNOBS and groups:
        for b in (b for b in bits_l if b <= 4):
            want += [{"bits": b, "group": g} for g in dict.fromkeys((min(groups), max(groups)))]
    if k.sparsity is not None and k.sparsity[1] > 0:
        top = max((b for b in bits_l if b <= 8), default=32)
        levels = sparsity if sparsity is not None else SPARSITY_LEVELS
        want += [{"bits": top, "sparsity": s} for s in levels]
    if role == "embed":
        want += _tier_settings(space, members, bits_l, groups)
    out: list[LayerPlan] = []
    for w in want:
        lp = _unit_lp(space, members, LayerPlan(**w))
        if lp not in out and not lp.is_identity:
            out.append(lp)
    keep = _unit_lp(space, members, LayerPlan())
    return out, (keep if keep.is_identity else None)


def _tier_settings(
    space: CompressionSpace, members: Sequence[str], bits: Sequence[int], groups: Sequence[int]
) -> list[dict[str, Any]]:
    """The hot/cold settings of a token-embedding unit (see :func:`candidate_settings`); none
    when the space does not search ``hot_rows`` or a member cannot be split."""
    k = space.knobs
    r = getattr(k, "hot_rows", None)
    if r is None or r[1] <= 0 or not offers_tiers(space, members):
        return []
    frac = HOT_ROWS if r[0] <= HOT_ROWS <= r[1] else r[1]
    sizes = list(dict.fromkeys((min(groups), max(groups)))) if groups else [0]
    return [
        {"bits": b, "group": g, "hot_rows": frac, "hot_bits": hb}
        for b in bits
        if b in TIER_BITS
        for hb in sorted(h for h in k.hot_bits if h > b)
        for g in sizes
    ]


def offers_tiers(space: CompressionSpace, members: Sequence[str]) -> bool:
    """Whether ``space`` searches ``hot_rows`` for the unit made of ``members``: a ``hot_rows``
    range reaching above 0, and every member a table the knob is offered for."""
    r = getattr(space.knobs, "hot_rows", None)
    if r is None or r[1] <= 0:
        return False
    return all(KNOBS["hot_rows"].offered(space.layer(m)) is None for m in members)


def _cache_key(space: CompressionSpace, teacher_hash: str, task: Task, desc: Any) -> str:
    blob = json.dumps(
        {"v": VERSION, "teacher": teacher_hash, "task": task.name, "metric": task.metric_name,
         "desc": desc},
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sensitivity(
    task: Task,
    space: CompressionSpace,
    *,
    bits: Iterable[int] | None = None,
    sparsity: Iterable[float] | None = None,
    split: str = "train",
    examples: int = 64,
    run_dir: str | Path | None = None,
    teacher: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
    calibration: str | None = None,
) -> Sensitivity:
    """Measure every free unit of ``space`` alone at each candidate setting (no fine-tune).

    Args:
        task: gives the teacher (``task.teacher()``, unless ``teacher`` is passed), the data
            and the metric.
        space: its free units (``space.free_groups()``) are measured, so a space grouped by
            role (``group_by="role"``) costs one measurement per group and setting.
        bits, sparsity: the candidate settings (see :func:`candidate_settings`).
        split: ``"train"`` (default) or ``"val"``: the calibration subset is its first
            ``examples`` examples. Never ``"test"``: that is what the result is reported on.
        run_dir: if given, the result is cached in ``run_dir/sensitivity/<key>.json``, keyed
            by the teacher's weights, the task, the units and their settings, and reused.
        progress: called with one line per unit measured.
        calibration: how uniform weights are rounded, as ``Plan.calibration``: default
            ``"gptq"`` when the space offers it (``Knobs(calibration=...)``), else ``"none"``.
            With ``"gptq"`` each ``Linear``-like layer of a unit gets GPTQ from the input
            Hessian of the *teacher's* layer on the task's calibration examples (collected once,
            ``compress._gptq.calibration_inputs``), and every other uniform weight (embeddings)
            the clipped scales a GPTQ plan gives it (``compress._quant.clipped_scale``): what a
            ``calibration="gptq"`` trial stores, layer by layer. Scores then come from the
            train examples after GPTQ's calibration examples (held out from what GPTQ fits).

    Cost: one post-training ``compress.apply`` and one forward pass over ``examples`` examples
    per unit and setting; on a 22.7M-parameter MiniLM this is a small multiple of one trial
    (``benchmarks/sensitivity.py`` reports the ratio).
    """
    if split not in ("train", "val"):
        raise PlanError(f"split={split!r}: measure sensitivity on 'train' or 'val', never 'test'")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise PlanError(f"examples={examples!r} must be an integer >= 1 (e.g. 128)")
    if calibration is None:
        calibration = "gptq" if "gptq" in getattr(space.knobs, "calibration", ()) else "none"
    if calibration not in ("none", "gptq"):
        raise PlanError(f"calibration={calibration!r}: measure with 'none' or 'gptq'")
    t0 = time.perf_counter()
    teacher = (teacher if teacher is not None else task.teacher()).eval()
    order = {n: i for i, n in enumerate(space.layer_names)}
    units = dict(sorted(space.free_groups().items(), key=lambda kv: order[kv[1][0]]))
    roles = layer_roles(space.layers)
    plans = {key: candidate_settings(space, members, bits, sparsity, roles[key][0])
             for key, members in units.items()}  # fmt: skip
    desc = {
        "units": {k: list(m) for k, m in units.items()},
        "settings": {k: [asdict(lp) for lp in s] for k, (s, _) in plans.items()},
        "split": split,
        "examples": examples,
    }
    if calibration != "none":  # only then: caches measured before the option keep their key
        desc["calibration"] = calibration
        desc["skip"] = _gptq_samples() if split == "train" else 0
    tiered = [
        m for k, ms in units.items() if any(lp.hot_rows > 0 for lp in plans[k][0]) for m in ms
    ]
    if tiered:  # rows ranked on the first train examples, as compress.apply ranks them
        desc["count_samples"] = _count_samples()
    key = _cache_key(space, _state_hash(teacher), task, desc)
    path = Path(run_dir) / "sensitivity" / f"{key}.json" if run_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = Sensitivity.from_json(path.read_text())
            if cached.key == key:
                cached.cached = True
                return cached
        except (PlanError, ValueError, TypeError, KeyError):
            log.warning("ignoring unreadable sensitivity cache %s", path)
    # GPTQ calibrates on the first train examples: measure on the ones after them
    skip = _gptq_samples() if calibration == "gptq" and split == "train" else 0
    calib = _calibration(task, split, examples, skip)
    y = _targets(calib)
    ref = _outputs(teacher, task, calib)
    teacher_score = _score(task, ref, y, ref)
    state = teacher.state_dict()
    search = sum(t.numel() for t in state.values()) <= _search_numel()
    from autocompress.artifacts._format import tied_groups

    aliases = tied_groups(state)
    unit_tensors = {space.layer(m).tensor for ms in units.values() for m in ms}
    unit_tensors |= {a for a, target in aliases.items() if target in unit_tensors}
    other = sum(
        _tensor_bytes(n, t, None, search)
        for n, t in state.items()
        if n not in unit_tensors and n not in aliases and t.numel()
    )
    hess = None
    if calibration == "gptq":
        hess = _hessians(task, teacher, [space.layer(m) for ms in units.values() for m in ms])
    counts = None
    if tiered:  # once per run: every tiered setting of a table splits it the same way
        from autocompress.compress import row_counts
        from autocompress.compress._gptq import calibration_inputs

        counts = row_counts(teacher, tiered, calibration_inputs(task, _count_samples()))
    work = copy.deepcopy(teacher)  # units are compressed into it in place, then restored
    results, evals = [], 0
    for ukey, members in units.items():
        settings, keep = plans[ukey]
        tensors = list(dict.fromkeys(space.layer(m).tensor for m in members))
        base = sum(_tensor_bytes(n, state[n], None, search) for n in tensors)
        measured = []
        for lp in settings:
            infos = [space.layer(m) for m in members]
            with _swapped(work, teacher, infos, lp, hess, counts) as coded:
                out = _outputs(work, task, calib)
            nbytes = sum(_tensor_bytes(n, t, rec, search) for n, (t, rec) in coded.items())
            score = _score(task, out, y, ref)
            measured.append(
                Measured(asdict(lp), nbytes, teacher_score - score, _distortion(out, ref))
            )
            evals += 1
        params = sum(space.layer(m).params for m in members)
        results.append(
            UnitSensitivity(
                ukey, tuple(members), roles[ukey][0], params, base, tuple(measured),
                None if keep is None else asdict(keep),
            )
        )  # fmt: skip
        if progress is not None:
            worst = max(measured, key=lambda m: m.distortion, default=None)
            progress(
                f"sensitivity {len(results)}/{len(units)} {ukey}: "
                + (f"worst {_short(worst.knobs)} drop {worst.drop:+.4f}" if worst else "kept")
            )
    sens = Sensitivity(
        results, task.metric_name, teacher_score, split, sum(len(_batch_y(c)) for c in calib),
        other, round(time.perf_counter() - t0, 3), evals, key,
    )  # fmt: skip
    if path is not None:
        from autocompress.artifacts._io import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, sens.to_json().encode())
    return sens


def _holder(info: LayerInfo) -> tuple[str, str]:
    """``(module path, attribute)`` of a layer's weight tensor."""
    path, _, attr = info.tensor.rpartition(".")
    return path, attr


@contextlib.contextmanager
def _swapped(
    work: nn.Module,
    teacher: nn.Module,
    infos: Sequence[LayerInfo],
    lp: LayerPlan,
    hess: dict[str, torch.Tensor] | None = None,
    row_counts: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[dict[str, tuple[torch.Tensor, Any]]]:
    """Compress the layers ``infos`` of ``work`` with ``lp`` in place for the ``with`` body,
    then restore them; yields ``{tensor name: (stored value, quant record)}`` of the tensors
    the artifact stores for them.

    The engine itself compresses them (``compress.apply``, post-training) on a container holding
    copies of just their modules, so the rest of a large model is never copied; the baked
    weights (and their fp16-exact biases) are then written into ``work``. With ``hess``
    (tensor name -> input Hessian, see :func:`_hessians`) the uniform weights are rounded as a
    ``calibration="gptq"`` plan rounds them (:func:`_gptq_values`).

    A setting with ``hot_rows`` splits each table into hot and cold rows ranked by
    ``row_counts`` (layer name -> lookups per row, ``compress.row_counts`` on the teacher):
    the full table the two quantized tables make (``TieredEmbedding.weight``, same shape as the
    original) is written into ``work``, and the yielded tensors are the artifact's three,
    ``<table>.hot.weight``, ``<table>.cold.weight`` and the row mask ``<table>.hot_mask``.
    """
    from autocompress.compress import TieredEmbedding, apply, quant_records

    container, child_of = nn.Module(), {}
    for info in infos:
        path, _ = _holder(info)
        if path not in child_of:
            child_of[path] = f"m{len(child_of)}"
            container.add_module(child_of[path], copy.deepcopy(teacher.get_submodule(path)))
    names = {}
    for info in infos:
        path, attr = _holder(info)
        names[info.tensor] = (
            child_of[path]
            if attr == "weight" and path == info.name
            else (f"{child_of[path]}.{attr}")
        )
    plan = Plan(layers={names[i.tensor]: lp for i in infos}, finetune=FinetuneSettings(epochs=0))
    counts = None
    if lp.hot_rows > 0:
        missing = [i.name for i in infos if row_counts is None or i.name not in row_counts]
        if missing:
            raise PlanError(f"hot_rows on {missing} needs their row counts (row_counts=)")
        counts = {names[i.tensor]: row_counts[i.name] for i in infos}  # type: ignore[index]
    # restructure (which splits the tables) runs only with an example input; at width 1 it is
    # never read, and the container has no forward to give it to anyway
    dummy = torch.zeros(1, 1, dtype=torch.long) if counts is not None else None
    baked = apply(container, plan, row_counts=counts, example_input=dummy)
    recs = quant_records(baked)
    tiers = {}  # tensor -> its split table (settings with hot_rows; names are modules then)
    if lp.hot_rows > 0:
        tiers = {i.tensor: baked.get_submodule(names[i.tensor]) for i in infos}
    if any(not isinstance(t, TieredEmbedding) for t in tiers.values()):
        raise PlanError(f"hot_rows={lp.hot_rows}: the engine did not split every table")
    if hess is not None:
        for info in infos:
            path, attr = _holder(info)
            key = f"{child_of[path]}.{attr}"
            if info.tensor in tiers:  # each table on its own clipped scales, as GPTQ plans do
                for part, (values, rec) in _tier_values(teacher, info, lp, tiers[info.tensor]):
                    with torch.no_grad():
                        getattr(tiers[info.tensor], part).weight.copy_(values)
                    recs[f"{names[info.tensor]}.{part}.weight"] = rec
                continue
            got = _gptq_values(teacher.get_submodule(path), attr, info, lp, hess.get(info.tensor))
            if got is not None:
                with torch.no_grad():
                    getattr(baked.get_submodule(child_of[path]), attr).copy_(got[0])
                recs[key] = got[1]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    coded: dict[str, tuple[torch.Tensor, Any]] = {}
    try:
        with torch.no_grad():
            for info in infos:
                path, attr = _holder(info)
                child = baked.get_submodule(child_of[path])
                pairs = [(attr, f"{child_of[path]}.{attr}")]
                if attr == "weight" and isinstance(getattr(child, "bias", None), torch.Tensor):
                    pairs.append(("bias", f"{child_of[path]}.bias"))
                for a, key in pairs:
                    target = getattr(work.get_submodule(path), a)
                    new = getattr(child, a).detach()  # a split table: rebuilt in full
                    if new.shape != target.shape:
                        raise PlanError(f"{info.name}: the setting changes its shape")
                    saved.append((target, target.detach().clone()))
                    target.copy_(new)
                    if a == attr and info.tensor not in tiers:
                        coded[info.tensor] = (new, recs.get(key))
                if info.tensor in tiers:
                    t, c = tiers[info.tensor], names[info.tensor]
                    for part in ("hot", "cold"):
                        rec = recs.get(f"{c}.{part}.weight")
                        coded[f"{info.name}.{part}.weight"] = (getattr(t, part).weight, rec)
                    coded[f"{info.name}.hot_mask"] = (t.hot_mask, None)
        yield coded
    finally:
        with torch.no_grad():
            for target, original in reversed(saved):
                target.copy_(original)


def _tier_values(
    teacher: nn.Module, info: LayerInfo, lp: LayerPlan, tiered: nn.Module
) -> Iterator[tuple[str, tuple[torch.Tensor, Any]]]:
    """``(part, (values, quant record))`` of the hot and the cold table of the teacher's table
    ``info`` split as ``tiered`` splits it: the teacher's rows of each, on the clipped scales
    at that table's width (what a ``calibration="gptq"`` plan stores for embeddings)."""
    from autocompress.compress._prune import _tier_plan

    w = teacher.get_submodule(_holder(info)[0]).weight.detach()
    mask = tiered.hot_mask.bool().to(w.device)  # type: ignore[union-attr]
    for part, rows in (("hot", mask), ("cold", ~mask)):
        sub = nn.Embedding.from_pretrained(w[rows].clone())
        got = _gptq_values(sub, "weight", info, _tier_plan(lp, f"{info.name}.{part}", info.name))
        if got is not None:
            yield part, got


def _gptq_values(
    module: nn.Module, attr: str, info: LayerInfo, lp: LayerPlan, h: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any] | None:
    """``(values, quant record)`` of the teacher's ``module.<attr>`` as a GPTQ plan stores it
    under ``lp``: GPTQ from the input Hessian ``h`` for the layers GPTQ supports, clipped-scale
    rounding for other uniform weights; ``None`` (keep the engine's rounding) for settings GPTQ
    leaves alone (sparse, codebook, 16/32 bits)."""
    from autocompress.compress._gptq import gptq_rows, supported
    from autocompress.compress._meta import QuantRecord
    from autocompress.compress._quant import (
        as_rows,
        clipped_scale,
        from_rows,
        scale_grid,
        uniform_codes,
    )

    if lp.scheme != "uniform" or lp.bits > 8 or lp.sparsity > 0:
        return None
    w = getattr(module, attr).detach().float()
    if h is not None and supported(module, attr):
        values, scale = gptq_rows(as_rows(w, info.axis), h, lp.bits, lp.group)
        values = from_rows(values, w, info.axis)
    else:
        scale = clipped_scale(w, lp.bits, info.axis, lp.group)
        grid = scale_grid(scale, w, info.axis, lp.group)
        values = uniform_codes(w, scale, lp.bits, info.axis, lp.group) * grid
    rec = QuantRecord(lp.bits, "uniform", scale=scale, axis=info.axis, group=lp.group)
    return values, rec


@torch.no_grad()
def _hessians(
    task: Task, teacher: nn.Module, infos: Sequence[LayerInfo]
) -> dict[str, torch.Tensor]:
    """Input Hessians ``X^T X`` (float64) of the teacher's GPTQ-able layers among ``infos``,
    by weight tensor name, from one pass over the task's GPTQ calibration examples."""
    from autocompress.compress._gptq import _input_rows, calibration_inputs, supported
    from autocompress.tasks._batch import call_model

    mods: dict[str, nn.Module] = {}
    for info in infos:
        path, attr = _holder(info)
        mod = teacher.get_submodule(path)
        if supported(mod, attr) and not info.aliases:
            mods[info.tensor] = mod
    if not mods:
        return {}
    out: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def add(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            rows = _input_rows(mod, x.detach().float(), state["mask"])
            xtx = (rows.T @ rows).double()
            out[name] = xtx if name not in out else out[name].add_(xtx)

        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        for inputs in calibration_inputs(task):
            m = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            state["mask"] = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
            call_model(teacher, inputs)
    finally:
        for hd in handles:
            hd.remove()
    return out


def _batch_y(c: tuple[Any, Any]) -> range:
    from autocompress.tasks._batch import batch_len

    return range(batch_len(c[0]))


def _gptq_samples() -> int:
    from autocompress.compress._gptq import CALIBRATION_SAMPLES

    return CALIBRATION_SAMPLES


def _count_samples() -> int:
    from autocompress.compress._tiers import COUNT_SAMPLES

    return COUNT_SAMPLES


def _search_numel() -> int:
    from autocompress.artifacts._encode import SEARCH_NUMEL

    return SEARCH_NUMEL


# --------------------------------------------------------------------------- plans
def _hull(u: UnitSensitivity, max_drop: float | None) -> list[Measured]:
    """The unit's options on the lower convex hull of (bytes saved, distortion), starting at
    the largest option; options whose drop alone exceeds ``max_drop`` are left out (unless
    every option does: then only the safest)."""
    opts = u.options()
    if max_drop is not None:
        ok = [m for m in opts if m.drop <= max_drop]
        opts = ok or [min(opts, key=lambda m: (m.distortion, -m.bytes))]
    pts = _pareto(sorted(opts, key=lambda m: (-m.bytes, m.distortion)))
    hull: list[Measured] = []
    for m in pts:
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], m):
            hull.pop()
        hull.append(m)
    return hull


def _pareto(opts: list[Measured]) -> list[Measured]:
    """From options sorted by bytes descending: those that no smaller-or-equal option beats."""
    out: list[Measured] = []
    for m in opts:
        if out and m.bytes == out[-1].bytes:
            continue  # same bytes, more distortion (sorted): never better
        while out and m.distortion <= out[-1].distortion:
            out.pop()  # a smaller option with no more distortion dominates the larger one
        out.append(m)
    return out


def _slope(a: Measured, b: Measured) -> float:
    saved = a.bytes - b.bytes
    return (b.distortion - a.distortion) / saved if saved > 0 else math.inf


def _path(sens: Sensitivity, max_drop: float | None) -> tuple[dict[str, int], list[tuple]]:
    """Greedy path: start index per unit (0) and the moves, cheapest distortion per byte
    first: ``(slope, unit key, hull index after the move)``."""
    hulls = {u.key: _hull(u, max_drop) for u in sens.units}
    moves = [
        (_slope(h[i - 1], h[i]), order, i, key)
        for order, (key, h) in enumerate(hulls.items())
        for i in range(1, len(h))
    ]
    moves.sort(key=lambda m: (m[0], m[1], m[2]))
    return hulls, moves


def _plan_from(space: CompressionSpace, sens: Sensitivity, choice: dict[str, LayerPlan]) -> Plan:
    layers: dict[str, LayerPlan] = dict(space.pin)
    for u in sens.units:
        for m in u.layers:
            layers[m] = choice[u.key]
    return space.project(Plan(layers=layers, finetune=space.finetune))


def drop_per_distortion(sens: Sensitivity) -> float:
    """Least-squares slope of the measured drops on the distortions (through the origin): turns
    a plan's summed distortion into a predicted metric drop, which, unlike the drop of a small
    calibration subset, is not rounded to whole examples."""
    pts = [(m.distortion, max(m.drop, 0.0)) for u in sens.units for m in u.settings]
    den = sum(x * x for x, _ in pts)
    return sum(x * d for x, d in pts) / den if den > 0 else 0.0


def greedy_plan(
    sens: Sensitivity, space: CompressionSpace, budget: int, *, max_drop: float | None = None
) -> Plan:
    """The plan meeting ``budget`` (projected weights bytes, see :meth:`Sensitivity.estimate`)
    with the least summed distortion the greedy finds: units move down their convex hull of
    (bytes saved, distortion) in the order of distortion per byte saved. A budget below the
    smallest reachable size gives the smallest plan.
    """
    hulls, moves = _path(sens, max_drop)
    at = dict.fromkeys(hulls, 0)
    total = sens.other_bytes + sum(h[0].bytes for h in hulls.values())
    for _, _, i, key in moves:
        if total <= budget:
            break
        h = hulls[key]
        total += h[i].bytes - h[at[key]].bytes
        at[key] = i
    return _plan_from(space, sens, {k: hulls[k][i].layer_plan for k, i in at.items()})


def greedy_plans(
    sens: Sensitivity,
    space: CompressionSpace,
    n: int = 4,
    *,
    max_drop: float | None = None,
    slack: float = 2.0,
) -> list[Plan]:
    """``n`` greedy plans for byte budgets from the all-8-bit size down, largest first.

    The budgets are geometric between the size with every unit at its 8-bit setting (or its
    largest option) and the end of the greedy path; with ``max_drop`` (the objective's
    ``accuracy_drop`` bound) the path ends where the predicted drop passes ``slack * max_drop``
    (the larger of the summed drops of the chosen settings and their summed distortion times
    :func:`drop_per_distortion`), so the plans stay where feasible members can be.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlanError(f"n={n!r} must be an integer >= 1")
    hulls, moves = _path(sens, max_drop)
    at = dict.fromkeys(hulls, 0)
    total = sens.other_bytes + sum(h[0].bytes for h in hulls.values())
    per = drop_per_distortion(sens)
    drop = dist = 0.0
    sizes = [total]
    for _, _, i, key in moves:
        h, j = hulls[key], at[key]
        new_drop = drop + max(h[i].drop, 0) - max(h[j].drop, 0)
        new_dist = dist + h[i].distortion - h[j].distortion
        if max_drop is not None and max(new_drop, per * new_dist) > slack * max_drop:
            break
        total += h[i].bytes - h[j].bytes
        drop, dist, at[key] = new_drop, new_dist, i
        sizes.append(total)
    end = sizes[-1]
    eight = sens.other_bytes + sum(
        min((m.bytes for m in u.options() if m.knobs.get("bits") == 8 and
             not m.knobs.get("sparsity")), default=u.base_bytes)
        for u in sens.units
    )  # fmt: skip
    hi = eight if end < eight <= sizes[0] else sizes[0]
    budgets = [round(hi * (end / hi) ** (i / n)) for i in range(1, n + 1)]
    plans: list[Plan] = []
    for b in budgets:
        p = greedy_plan(sens, space, b, max_drop=max_drop)
        if p not in plans:
            plans.append(p)
    return plans


def hand_plans(
    space: CompressionSpace, combos: Sequence[tuple[float, ...]] | None = None
) -> list[Plan]:
    """The hand-style plans of ``combos`` on this space (default: :data:`HAND`, then
    :data:`HAND_TIERED` when the space offers ``hot_rows`` to a token embedding): token
    embeddings (role ``embed``) at one bit-width and group size (and ``hot_rows``/``hot_bits``
    when a combo has them), every other free layer at another (position tables at the larger
    of the two widths), projected onto the space (nearest widths, groups and hot fractions it
    offers; duplicates dropped).

    Example:
        >>> from autocompress.spaces import CompressionSpace, Knobs
        >>> from autocompress.tasks._models import DigitsMLP
        >>> space = CompressionSpace.from_model(DigitsMLP(), Knobs(bits=(4, 6, 8)))
        >>> [p.layers["fc1"].bits for p in hand_plans(space)]
        [8, 6, 4]
    """
    roles = layer_roles(space.layers)
    units = space.free_groups()
    if combos is None:
        tiers = any(roles[k][0] == "embed" and offers_tiers(space, m) for k, m in units.items())
        combos = HAND + (HAND_TIERED if tiers else ())
    plans: list[Plan] = []
    for combo in combos:
        other, emb = int(combo[0]), int(combo[1])
        other_g, emb_g = (int(g) for g in (*combo[2:4], 0, 0)[:2])
        hot, hot_bits = (*combo[4:6], 0.0, 8)[:2]
        layers: dict[str, LayerPlan] = dict(space.pin)
        for key, members in units.items():
            role = roles[key][0]  # position tables: small, kept at least as precise as the rest
            b = emb if role == "embed" else max(other, emb) if role == "embed_pos" else other
            g = emb_g if role == "embed" else other_g
            lp = LayerPlan(bits=b, group=g if b <= 8 else 0)
            if role == "embed" and hot > 0 and b <= 8 and offers_tiers(space, members):
                lp = LayerPlan(bits=b, group=lp.group, hot_rows=float(hot), hot_bits=int(hot_bits))
            layers.update(dict.fromkeys(members, lp))
        p = space.project(Plan(layers=layers, finetune=space.finetune))
        if p not in plans:
            plans.append(p)
    return plans


def max_drop_of(objective: Any) -> float | None:
    """The ``accuracy_drop <= b`` bound of ``objective`` (or of a float), if it has one."""
    if objective is None or isinstance(objective, int | float):
        return None if objective is None else float(objective)
    bounds = [
        c.bound
        for c in getattr(objective, "constraints", ())
        if getattr(c, "metric", None) == "accuracy_drop" and getattr(c, "op", None) == "<="
    ]
    return min(bounds) if bounds else None


def sensitivity_plans(
    task: Task,
    space: CompressionSpace,
    objective: Any = None,
    n: int = 4,
    *,
    sens: Sensitivity | None = None,
    hand: bool = True,
    **measure: Any,
) -> list[Plan]:
    """Warm-start plans for a search: ``n`` greedy plans from the sensitivity pass (largest
    byte budget first), then the hand-style plans (:func:`hand_plans`), deduplicated, every one
    in ``space`` (``search.run(baselines=...)`` accepts them strictly).

    ``objective`` (an ``Objective`` or a number) gives the tolerated ``accuracy_drop`` that ends
    the greedy path (at twice it; at :data:`FINETUNED_SLACK` times it when the space's plans
    are fine-tuned, ``space.finetune.epochs > 0``: the fine-tune wins part of the drop back, so
    smaller plans are worth opening with); ``measure`` goes to :func:`sensitivity`
    (``run_dir``, ``examples``, ``split``...) unless ``sens`` is given.
    """
    sens = sens if sens is not None else sensitivity(task, space, **measure)
    tuned = getattr(space.finetune, "epochs", 0) > 0
    slack = FINETUNED_SLACK if tuned else 2.0
    plans = greedy_plans(sens, space, n, max_drop=max_drop_of(objective), slack=slack)
    for p in hand_plans(space) if hand else []:
        if p not in plans:
            plans.append(p)
    return plans
