"""Number formats and plan summaries shared by the report's tables, tiles and hover labels.

One format per kind of quantity, chosen from the metric's name, so a size is always
``19,352`` bytes, a ratio ``36.9x``, an accuracy ``97.22%`` and an accuracy drop ``0.28 pt``
wherever it appears (never ``1.935e+04``).
"""

from __future__ import annotations

import json
import math
from typing import Any

NAN_TEXT = "–"


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_num(v: Any) -> str:
    """A plain number, 4 significant digits, thousands separators, never an exponent above 1.

    Example:
        >>> fmt_num(14040.0), fmt_num(3.14159), fmt_num(0.012345), fmt_num(float("nan"))
        ('14,040', '3.142', '0.01235', '–')
    """
    f = _finite(v)
    if f is None:
        return NAN_TEXT
    a = abs(f)
    if a >= 1000:
        return f"{f:,.0f}"
    if a >= 1:
        return f"{f:.{3 - int(math.floor(math.log10(a)))}f}"
    return f"{f:.4g}"


def fmt_bytes(v: Any) -> str:
    """A byte count as an exact integer with thousands separators.

    Example:
        >>> fmt_bytes(188120.0)
        '188,120'
    """
    f = _finite(v)
    return NAN_TEXT if f is None else f"{f:,.0f}"


def fmt_bytes_short(v: float) -> str:
    """A byte count for axis ticks: ``512 B``, ``5 kB``, ``1.5 MB`` (decimal units).

    Example:
        >>> fmt_bytes_short(512), fmt_bytes_short(5000), fmt_bytes_short(1_500_000)
        ('512 B', '5 kB', '1.5 MB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g} B"


def fmt_ratio(v: Any) -> str:
    """A ratio (compression, speedup) with 3 significant digits and an ``x``.

    Example:
        >>> fmt_ratio(9.72095), fmt_ratio(36.915), fmt_ratio(104.7)
        ('9.72x', '36.9x', '105x')
    """
    f = _finite(v)
    if f is None:
        return NAN_TEXT
    return f"{f:.2f}x" if f < 10 else f"{f:.1f}x" if f < 100 else f"{f:,.0f}x"


def is_fraction_metric(name: str) -> bool:
    """Whether ``name`` is a score in [0, 1] best shown in percent (accuracy-like).

    Example:
        >>> is_fraction_metric("accuracy"), is_fraction_metric("test_top1_acc")
        (True, True)
        >>> is_fraction_metric("size_bytes"), is_fraction_metric("accuracy_drop")
        (False, False)
    """
    base = name.removeprefix("test_").removeprefix("val_")
    return ("acc" in base or base in ("f1", "auc", "precision", "recall")) and not base.endswith(
        "_drop"
    )


def fmt_metric(name: str, v: Any) -> str:
    """``v`` formatted by what the metric ``name`` measures.

    Example:
        >>> fmt_metric("accuracy", 0.97222), fmt_metric("accuracy_drop", 0.0027778)
        ('97.22%', '0.28 pt')
        >>> fmt_metric("size_bytes", 14040.0), fmt_metric("compression_ratio", 13.3135)
        ('14,040', '13.3x')
        >>> fmt_metric("latency_ms", 0.41234), fmt_metric("speedup", 1.5)
        ('0.4123 ms', '1.50x')
        >>> fmt_metric("duration_s", 0.90451)
        '0.9045'
    """
    base = name.removeprefix("test_").removeprefix("val_")
    f = _finite(v)
    if f is None:
        return NAN_TEXT
    if base.endswith("_drop") and is_fraction_metric(base.removesuffix("_drop")):
        return f"{100 * f:.2f} pt"
    if is_fraction_metric(base) and -0.001 <= f <= 1.001:
        return f"{100 * f:.2f}%"
    if base.endswith("_bytes") or base in ("params", "macs", "bitops"):
        return fmt_bytes(f)
    if base.endswith("ratio") or base.startswith("speedup"):
        return fmt_ratio(f)
    if base.startswith("latency_ms"):
        return f"{fmt_num(f)} ms"
    return fmt_num(f)


def metric_label(name: str) -> str:
    """A column or axis title for a metric: ``size_bytes`` -> ``size (bytes)``.

    Example:
        >>> metric_label("size_bytes"), metric_label("accuracy_drop"), metric_label("speedup")
        ('size (bytes)', 'accuracy drop (pt)', 'speedup')
    """
    base = name.removeprefix("test_")
    prefix = "test " if name.startswith("test_") else ""
    if base.endswith("_drop") and is_fraction_metric(base.removesuffix("_drop")):
        return f"{prefix}{base.removesuffix('_drop')} drop (pt)"
    if base.endswith("_bytes"):
        return f"{prefix}{base.removesuffix('_bytes').replace('_', ' ')} (bytes)"
    if base.startswith("latency_ms"):
        return f"{prefix}latency{base.removeprefix('latency_ms').replace('_', ' ')} (ms)"
    return prefix + base.replace("_", " ")


def layer_token(knobs: dict[str, Any]) -> str:
    """One layer's knobs in a few characters: bits (``cb`` = codebook), sparsity, rank.

    Example:
        >>> layer_token({"bits": 4, "sparsity": 0.9, "scheme": "codebook", "rank_ratio": 0.5})
        '4b cb 90% r0.5'
        >>> layer_token({"bits": 32, "sparsity": 0.0})
        'fp32'
    """
    bits = int(knobs.get("bits", 32))
    parts = [f"fp{bits}" if bits >= 16 else f"{bits}b"]
    if knobs.get("scheme", "uniform") == "codebook":
        parts.append("cb")
    sp = float(knobs.get("sparsity", 0.0))
    if sp > 0:
        parts.append(f"{sp:.0%}")
    rank = float(knobs.get("rank_ratio", 1.0))
    if rank < 1:
        parts.append(f"r{rank:.2g}")
    return " ".join(parts)


def plan_layers(plan_json: Any) -> tuple[dict[str, dict[str, Any]], float]:
    """The per-layer knobs and the width of a plan's JSON (``({}, 1.0)`` when there is none)."""
    if not isinstance(plan_json, str) or not plan_json.strip():
        return {}, 1.0
    try:
        d = json.loads(plan_json)
    except ValueError:
        return {}, 1.0
    return dict(d.get("layers", {})), float(d.get("width", 1.0))


def _plan_heads(plan_json: Any) -> float | None:
    """The plan's fraction of attention heads kept, when it sets one apart from the width."""
    try:
        heads = json.loads(plan_json).get("heads")
    except (TypeError, ValueError, AttributeError):
        return None
    return None if heads is None else float(heads)


def plan_summary(plan_json: Any, max_layers: int = 4) -> str:
    """A short, readable summary of a plan: width and each layer's knobs, or ranges when long.

    Example:
        >>> p = ('{"layers": {"fc1": {"bits": 6, "sparsity": 0.6}, '
        ...      '"fc2": {"bits": 2, "sparsity": 0.53, "scheme": "codebook"}}, "width": 0.85}')
        >>> plan_summary(p)
        'width 0.85 · fc1 6b 60% · fc2 2b cb 53%'
        >>> plan_summary('{"layers": {"a": {"bits": 4}, "b": {"bits": 4}}, "width": 1.0}')
        'all 2 layers 4b'
        >>> plan_summary('{"layers": {}, "width": 0.5, "heads": 0.75}')
        'width 0.50 · heads 0.75'
    """
    layers, width = plan_layers(plan_json)
    head = [] if width == 1.0 else [f"width {width:.2f}"]
    heads = _plan_heads(plan_json)
    if heads is not None and heads != width:  # unset: attention heads follow the width
        head.append(f"heads {heads:.2f}")
    if not layers:
        return " · ".join(head) or "no compression"
    tokens = {name: layer_token(k) for name, k in layers.items()}
    if len(set(tokens.values())) == 1 and len(tokens) > 1:
        return " · ".join([*head, f"all {len(tokens)} layers {next(iter(tokens.values()))}"])
    if len(tokens) <= max_layers:
        return " · ".join([*head, *(f"{n} {t}" for n, t in tokens.items())])
    bits = [int(k.get("bits", 32)) for k in layers.values()]
    sp = [float(k.get("sparsity", 0.0)) for k in layers.values()]
    parts = [*head, f"{len(layers)} layers", f"{min(bits)}-{max(bits)} bits"]
    parts.append(f"sparsity {min(sp):.0%}-{max(sp):.0%}")
    n_cb = sum(k.get("scheme") == "codebook" for k in layers.values())
    n_lr = sum(float(k.get("rank_ratio", 1.0)) < 1 for k in layers.values())
    if n_cb:
        parts.append(f"{n_cb} codebook")
    if n_lr:
        parts.append(f"{n_lr} low-rank")
    return " · ".join(parts)
