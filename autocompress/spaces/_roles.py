"""Layer roles and depth: group the layers of a space by what they do and where they sit.

A transformer with 40+ blocks has hundreds of weight tensors, and a sampler that gets one knob per
tensor spends its whole budget learning noise. Layers that play the same role at a similar depth
tolerate compression alike (Q/K/V projections, attention outputs, FFN up/down projections,
embeddings, the classifier), so one knob per *role x depth bucket* is a space a TPE can search in
a few dozen trials.

Roles are read from module names and types as Hugging Face BERT / DistilBERT / GPT-2 / T5 /
Llama / ViT and torch's ``TransformerEncoder`` name them:

==============  ==========================================================================
``embed``       token (word) embeddings and patch projections (``word_embeddings``, ``wte``,
                ``embed_tokens``, ``shared``, ``patch_embeddings.projection``)
``embed_pos``   position / token-type / relative-position tables
``attn_qkv``    ``query/key/value``, ``q/k/v(_proj|_lin)``, GPT-2 ``c_attn``, ``in_proj_weight``
``attn_out``    ``attention.output.dense``, ``o``, ``o_proj``, ``out_lin``, ``out_proj``,
                ``attn.c_proj``
``ffn_in``      ``intermediate.dense``, ``wi``, ``gate_proj``, ``up_proj``, ``c_fc``, ``lin1``,
                ``fc1``, ``linear1``
``ffn_out``     FFN ``output.dense``, ``wo``, ``down_proj``, ``mlp.c_proj``, ``lin2``, ``fc2``,
                ``linear2``
``head``        ``classifier``, ``pre_classifier``, ``pooler``, ``lm_head``, ``head``, ``score``
==============  ==========================================================================

The attention/FFN names are trusted only when the model has attention projections at all (an MLP's
``fc1``/``fc2`` are not a transformer's FFN); every other layer falls back to its module type
(``linear``, ``conv2d``, ``lstm``...). Depth is the layer's block (the name up to its first numeric
component: ``encoder.layer.3``, ``transformer.h.0``, ``decoder.block.1``), ranked in model order
and cut into ``buckets`` equal parts (``early``/``middle``/``late`` for 3); a model without
numbered blocks is ranked layer by layer. Embeddings and heads sit outside the blocks and get no
depth.

Example:
    >>> from autocompress.spaces import CompressionSpace
    >>> from autocompress.tasks._models import DigitsMLP
    >>> space = CompressionSpace.from_model(DigitsMLP())
    >>> role_groups(space)
    {'linear@early': ('fc1',), 'linear@middle': ('fc2',), 'linear@late': ('fc3',)}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from autocompress.errors import PlanError

if TYPE_CHECKING:
    from autocompress.spaces._discover import LayerInfo
    from autocompress.spaces._space import CompressionSpace

__all__ = ["ROLES", "group_by_role", "layer_roles", "role_groups"]

ROLES = ("embed", "embed_pos", "attn_qkv", "attn_out", "ffn_in", "ffn_out", "head")
"""The roles recognized by name; any other layer's role is its module type, lower-cased."""

_QKV = {
    "query", "key", "value", "q", "k", "v", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin",
    "v_lin", "c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj_weight",
    "in_proj", "kv_proj", "wq", "wk", "wv", "q_weight", "k_weight", "v_weight", "q_proj_weight",
    "k_proj_weight", "v_proj_weight",
}  # fmt: skip
_ATTN_OUT = {"o", "o_proj", "out_lin", "out_proj", "c_proj", "dense", "wo", "output"}
_FFN_IN = {
    "wi", "wi_0", "wi_1", "gate_proj", "up_proj", "gate_up_proj", "c_fc", "lin1", "fc1",
    "linear1", "w1", "w3", "fc_in", "dense_h_to_4h", "ff1", "intermediate",
}  # fmt: skip
_FFN_OUT = {"wo", "down_proj", "c_proj", "lin2", "fc2", "linear2", "w2", "fc_out",
            "dense_4h_to_h", "ff2"}  # fmt: skip
_ATTN_PARENTS = re.compile(r"^(self_?attn|self_?attention|attn|attention|encdecattention|"
                           r"crossattention|cross_attn|selfattention|self|mha)$")  # fmt: skip
_HEAD = {"classifier", "pre_classifier", "pooler", "lm_head", "head", "score", "qa_outputs",
         "cls", "output_layer"}  # fmt: skip
_EMBED = {"word_embeddings", "wte", "embed_tokens", "shared", "embed", "embeddings",
          "patch_embeddings", "patch_embed", "tok_embeddings", "token_embedding"}  # fmt: skip
_POS = re.compile(r"(position|pos_|^pos$|wpe|token_type|relative_attention_bias|segment)")
_BUCKET_NAMES = {1: ("all",), 2: ("early", "late"), 3: ("early", "middle", "late")}


def _parts(layer: LayerInfo) -> list[str]:
    return layer.name.lower().split(".")


def _named_role(layer: LayerInfo) -> str | None:
    """Role from the name alone, or None (transformer roles are checked separately)."""
    parts = _parts(layer)
    last = parts[-1].removesuffix("_weight") if layer.kind == "MultiheadAttention" else parts[-1]
    if layer.kind == "Embedding" or any(p in _EMBED for p in parts[:-1] + [last]):
        if layer.kind == "Embedding" and any(_POS.search(p) for p in parts):
            return "embed_pos"
        if layer.kind == "Embedding" or "projection" in parts or last in _EMBED:
            return "embed"
    if any(p in _HEAD for p in parts):
        return "head"
    return None


def _transformer_role(layer: LayerInfo) -> str | None:
    parts = _parts(layer)
    last = parts[-1]
    in_attn = any(_ATTN_PARENTS.match(p) for p in parts[:-1])
    if last in _QKV:
        return "attn_qkv"
    if in_attn and (last in _ATTN_OUT or "output" in parts):
        return "attn_out"
    if last in _FFN_IN or (len(parts) > 1 and parts[-2] in _FFN_IN):
        return "ffn_in"
    if last in _FFN_OUT or (len(parts) > 1 and parts[-2] == "output" and last == "dense"):
        return "ffn_out"
    return None


def _block(name: str) -> str | None:
    """The block a layer belongs to: its name up to the first all-digit component."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _bucket_name(i: int, buckets: int) -> str:
    names = _BUCKET_NAMES.get(buckets)
    return names[i] if names else f"d{i}"


def layer_roles(layers: Sequence[LayerInfo], buckets: int = 3) -> dict[str, tuple[str, str]]:
    """``{layer name: (role, depth bucket)}`` for every layer (bucket ``""``: no depth).

    See the module docstring for the roles. ``buckets`` (>= 1) equal parts of the model's block
    order make the depth buckets.

    Example:
        >>> from autocompress.spaces._discover import LayerInfo
        >>> ls = [LayerInfo(f"enc.layer.{i}.attn.q_proj", "Linear", 4, (2, 2)) for i in range(3)]
        >>> [r for r, _ in layer_roles(ls, 3).values()], [d for _, d in layer_roles(ls).values()]
        (['attn_qkv', 'attn_qkv', 'attn_qkv'], ['early', 'middle', 'late'])
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise PlanError(f"depth buckets={buckets!r} must be an integer >= 1 (e.g. 3)")
    named = {layer.name: _named_role(layer) for layer in layers}
    tf = {layer.name: _transformer_role(layer) for layer in layers}
    transformer = any(r == "attn_qkv" for r in tf.values())
    roles = {}
    for layer in layers:
        role = named[layer.name]
        if role is None and transformer:
            role = tf[layer.name]
        roles[layer.name] = role or layer.kind.lower()
    outside = ("embed", "embed_pos", "head")  # no depth: before or after the blocks
    blocks = {
        layer.name: None if roles[layer.name] in outside else _block(layer.name) for layer in layers
    }
    order = list(dict.fromkeys(b for b in blocks.values() if b is not None))
    positional = not order  # no numbered blocks: rank the layers themselves
    if positional:
        order = [layer.name for layer in layers]
    rank = {b: i for i, b in enumerate(order)}
    out: dict[str, tuple[str, str]] = {}
    for layer in layers:
        role = roles[layer.name]
        key = layer.name if positional else blocks[layer.name]
        if key is None or (role in outside and not positional):
            out[layer.name] = (role, "")
            continue
        out[layer.name] = (role, _bucket_name(_bucket(rank[key], len(order), buckets), buckets))
    return out


def _bucket(rank: int, n: int, buckets: int) -> int:
    """Equal parts of ``n`` ranked blocks; fewer blocks than buckets spread to both ends."""
    if n >= buckets:
        return rank * buckets // n
    return round(rank * (buckets - 1) / (n - 1)) if n > 1 else 0


def role_groups(space: CompressionSpace, buckets: int = 3) -> dict[str, tuple[str, ...]]:
    """The free units of ``space`` grouped by role and depth: ``{label: layer names}``.

    Labels read ``"<role>@<bucket>"`` (``"attn_qkv@early"``), or just the role for layers outside
    the numbered blocks (``"embed"``, ``"head"``). A unit the space already ties together (its
    ``groups``) stays whole and goes where its first layer goes; excluded and pinned layers are
    left out. Groups are listed in model order.
    """
    roles = layer_roles(space.layers, buckets)
    out: dict[str, list[str]] = {}
    for key, members in space.free_groups().items():
        role, bucket = roles[key]
        label = f"{role}@{bucket}" if bucket else role
        out.setdefault(label, []).extend(members)
    order = {n: i for i, n in enumerate(space.layer_names)}
    ranked = sorted(out.items(), key=lambda kv: min(order[n] for n in kv[1]))
    return {label: tuple(sorted(names, key=order.__getitem__)) for label, names in ranked}


def group_by_role(space: CompressionSpace, buckets: int = 3) -> CompressionSpace:
    """A copy of ``space`` whose free layers share knobs by role and depth (:func:`role_groups`).

    The sampler then asks one set of knobs per group (about 14 on a 6-block BERT with 3 depth
    buckets, instead of one per layer); layers, knobs, pins and exclusions are unchanged.

    Example:
        >>> from autocompress.spaces import CompressionSpace
        >>> from autocompress.tasks._models import DigitsMLP
        >>> grouped = group_by_role(CompressionSpace.from_model(DigitsMLP()), buckets=2)
        >>> grouped.groups
        (('fc1', 'fc2'), ('fc3',))
    """
    groups = tuple(role_groups(space, buckets).values())
    return dataclasses.replace(space, groups=groups)
