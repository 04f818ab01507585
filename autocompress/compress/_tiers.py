"""Hot and cold rows: an embedding table split in two by how often the task uses each row.

A vocabulary holds far more rows than any one domain uses: the 2000 training sentences of the
``minilm`` task use 3171 of all-MiniLM-L6-v2's 30522 word-embedding rows, yet that table is half
of the model's weights. A plan layer with ``hot_rows = f`` replaces the table by a
:class:`TieredEmbedding`: the ``ceil(f * rows)`` rows the task's train split looks up most
(counted on the uncompressed model, before any other step) go to a ``hot`` table quantized at
``hot_bits``, every other row to a ``cold`` table at the layer's ``bits``. Every row stays
usable (nothing is pruned from the vocabulary): a word the train split never saw is looked up in
the cold table at low precision. Measured on ``minilm`` (word embedding alone, post-training):
hot 10% at 4 bits + cold 2 bits, groups of 64: test cosine 0.9958 at ~3.6 MB, against 0.9929 at
~4.8 MB for the whole table at 3 bits.

The split is a structural step (``compress.restructure``): both tables are ordinary
``nn.Embedding`` modules (``<name>.hot``, ``<name>.cold``), so quantization, GPTQ's clipped
scales, the artifact's codes and the ONNX ``Gather`` forms treat them like any embedding. Which
rows are hot is the persistent boolean buffer ``<name>.hot_mask`` (one bit per row in the
artifact); a loader rebuilds the shapes from the plan alone and loads the mask with the weights.
Each table keeps its rows in row-id order, so the mask alone fixes the layout.

The row counts come from running the uncompressed model on calibration inputs with a hook on
each split table that stops the forward pass as soon as every table has been looked up
(embeddings come first, so this costs a tokenizer's worth of time, not a forward pass).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from autocompress.errors import ArtifactError, PlanError

COUNT_SAMPLES = 4096
"""Train examples whose lookups are counted (the first ones of the split)."""


def hot_count(rows: int, fraction: float) -> int:
    """How many of ``rows`` rows are hot at ``fraction``: ``ceil(fraction * rows)`` within
    ``[1, rows - 1]``.

    Example:
        >>> hot_count(30522, 0.1), hot_count(2, 0.1), hot_count(10, 0.95)
        (3053, 1, 9)
    """
    return min(max(1, math.ceil(fraction * rows - 1e-9)), rows - 1)


class TieredEmbedding(nn.Module):
    """An embedding table as two tables: ``hot`` rows (``hot_mask``) and ``cold`` rows.

    ``forward(ids)`` equals ``nn.Embedding(ids)`` of the full table: it maps each id to its slot
    (hot rows ``0..k-1``, cold rows ``k..``) and gathers from both tables. ``.weight`` rebuilds
    the full table (Hugging Face code reads it, e.g. its dtype and device).

    Example:
        >>> emb = nn.Embedding(6, 3)
        >>> tiered = TieredEmbedding(emb, torch.tensor([0, 4, 1, 0, 9, 0]), 2)
        >>> tiered.hot_mask.tolist()
        [False, True, False, False, True, False]
        >>> ids = torch.tensor([[0, 1, 4, 5]])
        >>> torch.equal(tiered(ids), emb(ids)), torch.equal(tiered.weight, emb.weight)
        (True, True)
    """

    def __init__(self, emb: nn.Embedding, counts: torch.Tensor | None, k: int) -> None:
        super().__init__()
        n, d = emb.num_embeddings, emb.embedding_dim
        if not 0 < k < n:
            raise PlanError(f"a split embedding needs 0 < hot rows < {n} (got {k})")
        why = unsplittable(emb)
        if why is not None:
            raise PlanError(f"this embedding cannot be split into hot and cold rows ({why})")
        if counts is None:  # a loader rebuilding shapes: the saved mask replaces this one
            hot = torch.arange(k)
        else:  # most-used first; ties by row id
            if tuple(counts.shape) != (n,):
                raise PlanError(
                    f"row counts of a {n}-row embedding have shape {list(counts.shape)}: "
                    f"pass one count per row (shape [{n}])"
                )
            hot = torch.argsort(-counts.detach().double().cpu(), stable=True)[:k]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[hot] = True
        self.num_embeddings, self.embedding_dim = n, d
        self.padding_idx = emb.padding_idx
        w = emb.weight.detach()
        dev = w.device
        self.hot = nn.Embedding(k, d, device=dev, dtype=w.dtype)
        self.cold = nn.Embedding(n - k, d, device=dev, dtype=w.dtype)
        self.hot.sparse = self.cold.sparse = emb.sparse
        with torch.no_grad():
            self.hot.weight.copy_(w[mask.to(dev)])
            self.cold.weight.copy_(w[~mask.to(dev)])
        for t in (self.hot, self.cold):  # a frozen table stays frozen in the fine-tune
            t.weight.requires_grad_(emb.weight.requires_grad)
        self.register_buffer("hot_mask", mask.to(dev))
        self.register_buffer(
            "slot", torch.empty(n, dtype=torch.int32, device=dev), persistent=False
        )
        self._index()

    def _index(self) -> None:
        """Rebuild ``slot`` (row id -> position in hot ``0..k-1`` or cold ``k..``) from the
        mask, and put the padding row's ``padding_idx`` on the table holding it."""
        mask = self.hot_mask.bool()
        k = int(mask.sum())
        slot = torch.where(mask, mask.cumsum(0) - 1, k + (~mask).cumsum(0) - 1)
        self.slot = slot.to(torch.int32)
        self.hot.padding_idx = self.cold.padding_idx = None
        if self.padding_idx is not None:
            s = int(slot[self.padding_idx])
            if s < k:
                self.hot.padding_idx = s
            else:
                self.cold.padding_idx = s - k

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        mask = state_dict.get(f"{prefix}hot_mask")
        if mask is not None:  # a mask of another layout would gather the wrong rows, silently
            self._check_mask(mask, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._index()

    def _check_mask(self, mask: torch.Tensor, prefix: str) -> None:
        """Raise :class:`ArtifactError` unless ``mask`` marks exactly the hot table's rows."""
        n, k = self.num_embeddings, self.hot.num_embeddings
        if tuple(mask.shape) != (n,) or mask.dtype.is_floating_point or mask.is_complex():
            raise ArtifactError(
                f"{prefix}hot_mask has shape {list(mask.shape)} and dtype {mask.dtype}, not a "
                f"[{n}] bool row mask: the saved weights do not belong to this layout"
            )
        marked = int(mask.bool().sum())
        if marked != k:
            raise ArtifactError(
                f"{prefix}hot_mask marks {marked} hot rows but {prefix}hot holds {k}: the "
                "saved weights are corrupt or belong to another plan (re-export them)"
            )

    @property
    def weight(self) -> torch.Tensor:
        """The full ``(rows, dim)`` table, rebuilt from both tables."""
        w = self.hot.weight.new_empty(self.num_embeddings, self.embedding_dim)
        mask = self.hot_mask.bool()
        w[mask] = self.hot.weight
        w[~mask] = self.cold.weight
        return w

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Embedding's argument name
        k = self.hot.num_embeddings
        # index_select raises IndexError on an id < 0 or >= rows, as nn.Embedding does
        s = self.slot.index_select(0, input.reshape(-1)).view(input.shape)
        hot = self.hot(s.clamp(max=k - 1))
        cold = self.cold((s - k).clamp(min=0))
        return torch.where((s < k).unsqueeze(-1), hot, cold)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, hot={self.hot.num_embeddings}"


def unsplittable(emb: nn.Module) -> str | None:
    """Why the table ``emb`` cannot become a :class:`TieredEmbedding` (else ``None``).

    A subclass with its own ``forward`` (Hugging Face's scaled word embeddings multiply the
    rows) would lose it; ``max_norm`` renormalizes and ``scale_grad_by_freq`` counts every row
    looked up, and the split looks up one placeholder row of the other table for each id, so
    both would change what the layer computes."""
    if not isinstance(emb, nn.Embedding):
        return f"{type(emb).__name__} is not an nn.Embedding"
    if type(emb).forward is not nn.Embedding.forward:  # e.g. a scaled word embedding
        return f"{type(emb).__name__} computes more than a lookup (its own forward)"
    if emb.max_norm is not None:
        return f"max_norm={emb.max_norm} is not supported"
    if emb.scale_grad_by_freq:
        return "scale_grad_by_freq=True is not supported"
    return None


def tiered_layers(plan: object) -> dict[str, float]:
    """``{layer: hot_rows}`` of the plan's layers split into hot and cold rows."""
    return {n: lp.hot_rows for n, lp in plan.layers.items() if lp.hot_rows > 0}  # type: ignore[attr-defined]


def split_tables(
    model: nn.Module,
    fractions: Mapping[str, float],
    counts: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace each ``nn.Embedding`` named in ``fractions`` by a :class:`TieredEmbedding` with
    that fraction of hot rows, in place; ``counts[name]`` ranks the rows (default: the first
    rows, for a loader whose saved mask replaces them)."""
    for name, frac in fractions.items():
        try:
            emb = model.get_submodule(name)
        except AttributeError:
            raise PlanError(
                f"hot_rows names layer {name!r}, which the model does not have"
            ) from None
        if not isinstance(emb, nn.Embedding):
            raise PlanError(
                f"hot_rows needs an nn.Embedding and {name!r} is a {type(emb).__name__}: "
                "use hot_rows=0 for it"
            )
        shared = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if p is emb.weight and n != f"{name}.weight"
        ]
        if shared:  # the split would leave the other holder with the old, whole table
            raise PlanError(
                f"hot_rows cannot split {name!r}: its table is shared with {shared[0]!r} "
                "(tied weights); use hot_rows=0 for it"
            )
        k = hot_count(emb.num_embeddings, frac)
        c = None if counts is None else counts.get(name)
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        setattr(parent, attr, TieredEmbedding(emb, c, k))
    return model


class _Seen(BaseException):
    """Raised by the counting hook once every table has been looked up (stops the forward)."""


def row_counts(
    model: nn.Module, names: Iterable[str], batches: Iterable[object]
) -> dict[str, torch.Tensor]:
    """How often each row of the embedding tables ``names`` is looked up on ``batches``.

    The forward pass of each batch stops as soon as every table has been read, so counting
    costs about as much as reading the batches. A table's ``padding_idx`` row counts 0: padded
    batches look it up more than any word, yet attention masks and pooling ignore it, so it
    must not take a hot row from a word.

    Example:
        >>> net = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 1))
        >>> row_counts(net, ["0"], [torch.tensor([[1, 1, 3]])])["0"].tolist()
        [0.0, 2.0, 0.0, 1.0, 0.0]
    """
    from autocompress.tasks._batch import call_model, model_device, to_device

    names = list(names)
    mods = {n: model.get_submodule(n) for n in names}
    counts = {n: torch.zeros(m.num_embeddings, dtype=torch.float64) for n, m in mods.items()}
    pending: set[str] = set()

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            ids = args[0] if args else kwargs.get("input")  # emb(ids) or emb(input=ids)
            if isinstance(ids, torch.Tensor):
                flat = ids.detach().reshape(-1).long().cpu()
                counts[name] += torch.bincount(flat, minlength=len(counts[name])).double()
                if getattr(mod, "padding_idx", None) is not None:
                    counts[name][mod.padding_idx] = 0.0
            pending.discard(name)
            if not pending:
                raise _Seen

        return fn

    dev = model_device(model)
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in mods.items()]
    try:
        model.eval()  # counting must not update BatchNorm statistics (or draw dropout masks)
        with torch.no_grad():
            for batch in batches:
                pending.update(names)
                with contextlib.suppress(_Seen):
                    call_model(model, to_device(batch, dev))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    unread = [n for n, c in counts.items() if not c.any()]
    if unread:  # e.g. the model reads the table's .weight directly: the ranking would be by id
        raise PlanError(
            f"hot_rows: the model never looked up rows of {unread} on the calibration inputs "
            "(it does not call the table as a module): use hot_rows=0 for it"
        )
    return counts
