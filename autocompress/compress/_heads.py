"""Width for transformers: whole attention heads and feed-forward channels, residual kept.

torch-pruning cuts an attention's q/k/v outputs with the same indices as the residual stream,
which moves dims across head boundaries, and on Hugging Face models it either refuses (GPT-2's
packed ``c_attn``, T5's per-head position bias) or takes minutes to trace (Llama). This module
reads the structure instead: it finds attention blocks and feed-forward pairs by the names
``transformers`` (and most hand-written transformers) give them, removes the weakest *whole*
heads from q/k/v/o, the weakest intermediate channels from each feed-forward pair, and updates the
bookkeeping Hugging Face code reads (``num_heads``, ``all_head_size``, ``num_key_value_groups``,
``split_size``, ``config.num_attention_heads`` ...). The hidden size (embeddings, norms, residual
adds) is never touched, so ``attention_mask`` and everything outside the blocks still fit.

Grouped-query attention (Llama, Mistral, Qwen: fewer key/value heads than query heads) keeps every
key/value head and drops the same number of query heads from each group, so ``repeat_kv`` still
pairs them. T5-style stacks, whose first layer computes a per-head position bias that the other
layers reuse, keep the same head indices in every layer of the stack.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from autocompress.errors import PlanError

#: Attributes that hold a module's (query) head count, in Hugging Face and common code.
HEAD_ATTRS: tuple[str, ...] = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_INNER_ATTRS = ("all_head_size", "inner_dim", "split_size")
# (q, k, v, o) child names of one attention module; o may live in a sibling (BERT: output.dense).
_QKVO: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_lin", "k_lin", "v_lin", "out_lin"),
    ("q", "k", "v", "o"),
    ("query", "key", "value", "../output.dense"),
    ("query", "key", "value", "dense"),
)
# (up layers, down layer) of a feed-forward pair, relative to their common parent.
_FFN: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("wi_0", "wi_1"), "wo"),
    (("wi",), "wo"),
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
    (("lin1",), "lin2"),
    (("c_fc",), "c_proj"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
    (("ffn",), "ffn_output"),
    (("intermediate.dense",), "output.dense"),
)
_FFN_CONFIG_KEYS = ("intermediate_size", "d_ff", "hidden_dim", "n_inner", "ffn_dim")


@dataclass
class Attention:
    """One attention block: its projections and head layout."""

    name: str
    module: nn.Module
    q: nn.Module
    kv: list[nn.Module]  # [k, v], or [c_attn] when k and v (and maybe q) are packed
    o: nn.Module
    head_dim: int
    heads: int
    kv_heads: int
    packed: int = 0  # sections of a packed projection (GPT-2 c_attn: 3 = q|k|v, 2 = k|v)
    bias_table: nn.Embedding | None = None  # T5 relative_attention_bias (buckets, heads)
    share: str = ""  # sites with the same non-empty key keep the same head indices


@dataclass
class FeedForward:
    """One feed-forward pair: ``down(act(up_1(x)) * up_2(x) ...)``."""

    name: str
    ups: list[nn.Module]
    down: nn.Module
    channels: int


@dataclass
class Structure:
    """The attention blocks and feed-forward pairs of a model."""

    attention: list[Attention] = field(default_factory=list)
    ffn: list[FeedForward] = field(default_factory=list)
    #: attention-like modules whose q/k/v/o layout is not understood: ``(name, class name)``
    unknown: list[tuple[str, str]] = field(default_factory=list)
    #: attention modules left whole because ``ignored`` names them
    ignored: list[str] = field(default_factory=list)
    #: feed-forward pairs left whole because ``ignored`` names one of their layers
    ignored_ffn: list[str] = field(default_factory=list)

    @property
    def is_transformer(self) -> bool:
        """Whether the model has attention blocks (understood, ignored or not)."""
        return bool(self.attention or self.unknown or self.ignored)


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face ``Conv1D``: a Linear with a transposed ``(in, out)`` weight."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _is_proj(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and _is_conv1d(m))


def _dims(m: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a Linear or Conv1D."""
    if _is_conv1d(m):
        return int(m.nx), int(m.nf)
    return m.in_features, m.out_features


def _rows(m: nn.Module) -> torch.Tensor:
    """Weight as ``(out, in)``."""
    return m.weight.detach().T if _is_conv1d(m) else m.weight.detach()


def _get(root: nn.Module, parent: str, rel: str) -> nn.Module | None:
    """Module at ``parent.rel`` (``../x`` is a sibling of ``parent``), or ``None``."""
    if rel.startswith("../"):
        parent, rel = parent.rpartition(".")[0], rel[3:]
    try:
        return root.get_submodule(f"{parent}.{rel}" if parent else rel)
    except AttributeError:
        return None


def _own_heads(m: nn.Module) -> int | None:
    for a in HEAD_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _head_count(m: nn.Module) -> int | None:
    if _own_heads(m) is not None:
        return _own_heads(m)
    cfg = getattr(m, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


def _head_dim(m: nn.Module, q_out: int) -> int | None:
    for a in _HEAD_DIM_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    h = _head_count(m)
    return q_out // h if h and q_out % h == 0 else None


def _attention(model: nn.Module, name: str, m: nn.Module) -> Attention | None:
    """Parse ``m`` as an attention block, or ``None`` if it has no known q/k/v layout."""
    for packed_n, out_n in (("c_attn", "c_proj"), ("qkv", "proj")):
        packed, o = getattr(m, packed_n, None), getattr(m, out_n, None)
        if not (_is_proj(packed) and _is_proj(o)):
            continue
        q_attn = getattr(m, "q_attn", None)  # GPT-2 cross-attention: q apart, k|v packed
        sections = 2 if _is_proj(q_attn) else 3
        _, packed_out = _dims(packed)
        split = getattr(m, "split_size", packed_out // sections)
        hd = _head_dim(m, split)
        ok = isinstance(split, int) and hd and split % hd == 0
        if not (ok and packed_out == sections * split):
            raise PlanError(
                f"attention {name!r}: packed {packed_n} of {packed_out} features does not split "
                f"into {sections} x heads of {hd}: list it in `ignored` or use heads=1.0"
            )
        q = q_attn if sections == 2 else packed
        h = split // hd
        return Attention(name, m, q, [packed], o, hd, h, h, packed=sections)
    for qn, kn, vn, on in _QKVO:
        q, k, v = (_get(model, name, n) for n in (qn, kn, vn))
        o = _get(model, name, on)
        if not all(_is_proj(x) for x in (q, k, v, o)):
            continue
        (q_in, q_out), (_, k_out), (_, v_out), (o_in, _) = (_dims(x) for x in (q, k, v, o))
        hd = _head_dim(m, q_out)
        if hd is None or q_out % hd or k_out % hd or k_out != v_out or o_in != q_out:
            raise PlanError(
                f"attention {name!r}: q/k/v/o sizes {q_out}/{k_out}/{v_out}/{o_in} do not split "
                f"into heads of {hd}: list it in `ignored` or use heads=1.0"
            )
        h, kv = q_out // hd, k_out // hd
        if h % kv:
            raise PlanError(f"attention {name!r}: {h} query heads do not group over {kv} kv heads")
        table = getattr(m, "relative_attention_bias", None)
        table = table if isinstance(table, nn.Embedding) and table.embedding_dim == h else None
        share = ""
        if hasattr(m, "has_relative_attention_bias"):  # T5: layer 0's bias is reused by the rest
            share = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        return Attention(name, m, q, [k, v], o, hd, h, kv, bias_table=table, share=share)
    return None


def find_structure(model: nn.Module, ignored: set[str] = frozenset()) -> Structure:
    """Attention blocks and feed-forward pairs of ``model``, found by their layer names.

    A module that looks like attention (declares ``num_heads``/``head_dim``-like attributes or
    has q/k/v layers) but whose projections are not understood is listed in ``unknown``, so its
    heads are never cut blindly. ``nn.MultiheadAttention`` is not listed (torch-pruning's path
    keeps it whole). Raises :class:`PlanError` naming an attention whose q/k/v/o sizes do not
    split into heads.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
        ...                  num_attention_heads=4, intermediate_size=64)
        >>> s = find_structure(BertModel(cfg))
        >>> [(a.name, a.heads) for a in s.attention], [(f.name, f.channels) for f in s.ffn]
        ([('encoder.layer.0.attention.self', 4)], [('encoder.layer.0', 64)])
    """
    found = Structure()
    claimed: set[int] = set()
    for name, m in model.named_modules():
        if not name or isinstance(m, nn.MultiheadAttention):
            continue
        if name in ignored:
            if _looks_like_attention(m):
                found.ignored.append(name)
            continue
        site = _attention(model, name, m)
        if site is not None:
            found.attention.append(site)
            claimed.update(id(x) for x in (site.q, *site.kv, site.o))
            continue
        if _looks_like_attention(m):
            found.unknown.append((name, type(m).__name__))
    # a parent holding understood attention blocks is not itself unknown
    found.unknown = [
        (n, k)
        for n, k in found.unknown
        if not any(a.name.startswith(f"{n}.") for a in found.attention)
    ]
    for name, _ in model.named_modules():
        for ups_n, down_n in _FFN:
            ups = [_get(model, name, u) for u in ups_n]
            down = _get(model, name, down_n)
            if not (all(_is_proj(u) for u in ups) and _is_proj(down)):
                continue
            if any(id(x) in claimed for x in (*ups, down)):
                continue
            d_in, d_out = _dims(down)
            dims = {_dims(u) for u in ups}
            if len(dims) != 1 or dims != {(d_out, d_in)}:
                continue  # not a hidden -> channels -> hidden pair
            fqn = [f"{name}.{u}" if name else u for u in (*ups_n, down_n)]
            if any(f in ignored for f in fqn):
                found.ignored_ffn.append(name)
                break
            found.ffn.append(FeedForward(name, ups, down, d_in))
            claimed.update(id(x) for x in (*ups, down))
            break
    return found


def _looks_like_attention(m: nn.Module) -> bool:
    """Declares a head count or head size or has q/k/v children, owns projections, and is not
    (a parent of) ``nn.MultiheadAttention``, which torch-pruning's path keeps whole."""
    if not any(_is_proj(c) for c in m.children()):
        return False
    if any(isinstance(c, nn.MultiheadAttention) for c in m.modules()):
        return False
    qkv = any(all(_is_proj(getattr(m, n, None)) for n in names[:3]) for names in _QKVO)
    head_dim = any(isinstance(getattr(m, a, None), int) for a in _HEAD_DIM_ATTRS)
    return qkv or head_dim or _own_heads(m) is not None


def kept(count: int, fraction: float) -> int:
    """``max(1, floor(fraction * count))``: how many heads/channels a fraction keeps.

    Example:
        >>> kept(12, 0.5), kept(4, 0.1), kept(4, 1.0)
        (6, 1, 4)
    """
    return max(1, math.floor(fraction * count + 1e-9))


def shrink_structure(model: nn.Module, s: Structure, heads: float, ffn: float) -> None:
    """Cut ``model`` (in place) to ``heads`` of its attention heads and ``ffn`` of its
    feed-forward channels, keeping the strongest (L2 norm of q/k/v rows and o columns; of up rows
    and down columns)."""
    old_new: set[tuple[int, int, int, int]] = set()
    if heads < 1.0:
        by_share: dict[str, list[Attention]] = defaultdict(list)
        for a in s.attention:
            by_share[a.share or a.name].append(a)
        for group in by_share.values():
            if len({(a.heads, a.kv_heads, a.head_dim) for a in group}) != 1:
                raise PlanError(f"attention {group[0].name!r}: layers sharing a bias differ")
            score = sum(_head_scores(a) for a in group)
            keep = _pick_heads(group[0], score, heads)
            for a in group:
                old_new.add((a.heads, a.kv_heads, *_cut_heads(a, keep)))
    if ffn < 1.0:
        for f in s.ffn:
            score = sum(_rows(u).pow(2).sum(1) for u in f.ups) + _rows(f.down).pow(2).sum(0)
            idx = torch.sort(torch.topk(score, kept(f.channels, ffn)).indices).values
            for u in f.ups:
                _keep_out(u, idx)
            _keep_in(f.down, idx)
            _set_equal(model.get_submodule(f.name), _FFN_CONFIG_KEYS, f.channels, len(idx))
    _update_config(model, s, old_new, ffn)


def _head_scores(a: Attention) -> torch.Tensor:
    """Squared L2 norm per query head (q rows, o columns, plus its k/v head's rows)."""
    hd = a.head_dim
    q = _rows(a.q)
    if a.packed == 3:
        q, k, v = q.split(a.heads * hd)  # a view of the packed (q|k|v, in) rows
    elif a.packed == 2:
        k, v = _rows(a.kv[0]).split(a.heads * hd)
    else:
        k, v = _rows(a.kv[0]), _rows(a.kv[1])
    per_q = q.pow(2).reshape(a.heads, -1).sum(1) + _rows(a.o).pow(2).reshape(-1, a.heads, hd).sum(
        (0, 2)
    )
    per_kv = k.pow(2).reshape(a.kv_heads, -1).sum(1) + v.pow(2).reshape(a.kv_heads, -1).sum(1)
    return per_q + per_kv.repeat_interleave(a.heads // a.kv_heads)


def _pick_heads(a: Attention, score: torch.Tensor, fraction: float) -> list[int]:
    """Query heads to keep: the strongest overall, or the same number from every kv group."""
    group = a.heads // a.kv_heads
    if group == 1:
        chosen = torch.topk(score, kept(a.heads, fraction)).indices.tolist()
    else:
        per = kept(group, fraction)
        chosen = [
            g * group + int(i)
            for g in range(a.kv_heads)
            for i in torch.topk(score[g * group : (g + 1) * group], per).indices
        ]
    return sorted(chosen)


def _span(heads: list[int], hd: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * hd + j for h in heads for j in range(hd)], dtype=torch.long)


def _cut_heads(a: Attention, keep: list[int]) -> tuple[int, int]:
    """Keep query heads ``keep`` (and their kv heads); returns the new (heads, kv heads)."""
    hd, group = a.head_dim, a.heads // a.kv_heads
    kv_keep = keep if group == 1 else list(range(a.kv_heads))
    q_idx = _span(keep, hd)
    if a.packed == 3:
        e = a.heads * hd
        _keep_out(a.q, torch.cat([_span(keep, hd, i * e) for i in range(3)]))
    elif a.packed == 2:
        e = a.heads * hd
        _keep_out(a.q, q_idx)
        _keep_out(a.kv[0], torch.cat([_span(keep, hd, i * e) for i in range(2)]))
    else:
        _keep_out(a.q, q_idx)
        for m in a.kv:
            _keep_out(m, _span(kv_keep, hd))
    _keep_in(a.o, q_idx)
    if a.bias_table is not None:
        _keep_out(a.bias_table, torch.tensor(keep))
    n, n_kv = len(keep), len(kv_keep)
    m = a.module
    _set_equal(m, HEAD_ATTRS, a.heads, n)
    _set_equal(m, ("num_key_value_heads",), a.kv_heads, n_kv)
    _set_equal(m, ("num_key_value_groups",), group, n // n_kv)
    _set_equal(m, _INNER_ATTRS, a.heads * hd, n * hd)
    return n, n_kv


def _set_equal(m: object, names: tuple[str, ...], old: int, new: int) -> None:
    """Set each attribute of ``m`` in ``names`` that holds ``old`` (an int) to ``new``."""
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v == old:
            setattr(m, n, new)


def _update_config(
    model: nn.Module, s: Structure, old_new: set[tuple[int, int, int, int]], ffn: float
) -> None:
    """Keep ``model.config`` true to the new shapes when every block changed the same way."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return
    if len(old_new) == 1 and not s.ignored and not s.unknown:
        (h, kv, h2, kv2), hd = next(iter(old_new)), s.attention[0].head_dim
        hidden = getattr(cfg, "hidden_size", None)
        if getattr(cfg, "head_dim", None) is None and isinstance(hidden, int):
            cfg.head_dim = hd  # hidden_size // num_attention_heads no longer gives it
        for key in ("num_key_value_heads",):
            if getattr(cfg, key, None) == kv:
                setattr(cfg, key, kv2)
        for key in HEAD_ATTRS:
            if getattr(cfg, key, None) == h:
                setattr(cfg, key, h2)
    sizes = {(f.channels, _dims(f.down)[0]) for f in s.ffn}
    if ffn < 1.0 and len(sizes) == 1 and not s.ignored_ffn:
        old, new = next(iter(sizes))
        for key in _FFN_CONFIG_KEYS:
            if getattr(cfg, key, None) == old:
                setattr(cfg, key, new)


def _replace(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if b is not None:
        m.bias = nn.Parameter(b.clone(), requires_grad=m.bias.requires_grad)


@torch.no_grad()
def _keep_out(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output features ``idx`` of a Linear, Conv1D or (per-column) Embedding."""
    b = getattr(m, "bias", None)
    b = b[idx] if isinstance(b, torch.Tensor) else None
    if isinstance(m, nn.Embedding):
        _replace(m, m.weight[:, idx], None)
        m.embedding_dim = len(idx)
    elif _is_conv1d(m):
        _replace(m, m.weight[:, idx], b)
        m.nf = len(idx)
    else:
        _replace(m, m.weight[idx], b)
        m.out_features = len(idx)


@torch.no_grad()
def _keep_in(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` of a Linear or Conv1D."""
    if _is_conv1d(m):
        _replace(m, m.weight[idx], None)
        m.nx = len(idx)
    else:
        _replace(m, m.weight[:, idx], None)
        m.in_features = len(idx)
