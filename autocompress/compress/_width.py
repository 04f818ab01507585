"""Structured width shrink: remove hidden channels for real, keeping the strongest ones.

Transformers (attention blocks with q/k/v/o projections, as in Hugging Face models) lose whole
attention heads and feed-forward channels and keep their hidden size (``_heads``). Other models go
through torch-pruning's dependency graph, so every coupled tensor (a conv's output channels, the
BatchNorm after it, the next layer's input channels, flatten index maps, residual adds) is cut
together; its graph build runs under a deadline, so an unusual graph fails fast instead of
hanging. Surviving channels keep their trained weights (the student inherits them from the
teacher). Channel counts depend only on the architecture, the fractions and ``ignored``, never on
weight values, so an artifact loader can rebuild the shapes from an untrained copy.
"""

from __future__ import annotations

import copy
import ctypes
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autocompress.compress._heads import find_structure, shrink_structure
from autocompress.errors import PlanError
from autocompress.tasks._batch import call_model

# Layers whose output channels are "hidden channels" (roots of torch-pruning groups).
_ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
# Layers that end a path when looking for the model's output layers.
_STOP_TYPES: tuple[type[nn.Module], ...] = (*_ROOT_TYPES, nn.MultiheadAttention)


#: Seconds torch-pruning may spend building its dependency graph before PlanError.
GRAPH_TIMEOUT = 60.0


def shrink_width(
    model: nn.Module,
    width: float,
    example_input: Any,
    ignored: Sequence[str] = (),
    *,
    heads: float | None = None,
    timeout: float = GRAPH_TIMEOUT,
) -> nn.Module:
    """A copy of ``model`` whose hidden channels are cut to ``width`` of their count.

    **Transformers** (a module with q/k/v/o projections, found by the names Hugging Face and most
    code use: ``q_proj``/``query``/``q_lin``/``q``, GPT-2's packed ``c_attn``): each attention
    keeps ``max(1, floor(heads * H))`` whole heads (grouped-query attention: that fraction of the
    query heads of every key/value group) and each feed-forward pair ``max(1, floor(width * C))``
    intermediate channels, chosen by L2 norm. The hidden size (embeddings, norms, residual
    stream) is kept, and the heads/sizes HF code reads (``num_heads``, ``all_head_size``,
    ``num_key_value_groups``, ``config.num_attention_heads``, ``config.intermediate_size``, ...)
    are updated, so attention masks, padding and HF's own forward keep working.

    **Other models**: every group of coupled hidden channels keeps ``max(1, floor(width * C))``
    channels, chosen by group L2 magnitude (torch-pruning ``MagnitudeImportance(p=2)``), with their
    weights. The input size and the output layers (a Linear/Conv/Embedding/MultiheadAttention
    whose output reaches a model output without passing through another such layer) keep their
    size; every ``nn.MultiheadAttention`` and the residual width it reads are kept (torch-pruning
    would cut its ``embed_dim`` across head boundaries).

    Args:
        model: the model to shrink; never modified.
        width: fraction of hidden (feed-forward) channels to keep, in (0, 1]; 1.0 keeps them.
        example_input: an input batch used to trace the graph and check the output shapes: a
            tensor, a tuple of positional inputs or a dict of keyword inputs (``input_ids``,
            ``attention_mask``, ...), as ``autocompress.tasks._batch.call_model`` passes them.
        ignored: fully qualified module names whose output channels must not shrink (an
            attention module or a feed-forward layer named here keeps all its heads/channels).
        heads: fraction of attention heads to keep, in (0, 1]; ``None`` uses ``width``.
        timeout: seconds torch-pruning may take to build its dependency graph.

    Raises:
        PlanError: a fraction outside (0, 1], an unknown ``ignored`` name, an attention module
            whose head layout is not understood (named), a graph torch-pruning cannot cut or
            cannot trace within ``timeout``, or output shapes that would change.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 3))
        >>> small = shrink_width(net, 0.5, torch.randn(2, 8))
        >>> small[0].out_features, small[2].out_features
        (10, 3)
    """
    heads = width if heads is None else heads
    for what, v in (("width", width), ("heads", heads)):
        if isinstance(v, bool) or not (isinstance(v, int | float) and 0.0 < v <= 1.0):
            raise PlanError(f"{what}={v!r} is outside (0, 1]: use 1.0 for no shrink")
    names = {n for n, _ in model.named_modules() if n}
    for name in ignored:
        if name not in names:
            sample = [n for n, m in model.named_modules() if isinstance(m, _STOP_TYPES)][:5]
            raise PlanError(
                f"ignored layer {name!r} is not a module of the model: use a fully qualified "
                f"name such as {sample}"
            )
    new = copy.deepcopy(model)
    if width == 1.0 and heads == 1.0:
        return new

    training = {n: m.training for n, m in new.named_modules()}
    requires_grad = {n: p.requires_grad for n, p in new.named_parameters()}
    new.eval()  # batch statistics and dropout play no part in the graph
    structure = find_structure(new, set(ignored))
    if structure.unknown and heads < 1.0:
        name, kind = structure.unknown[0]
        raise PlanError(
            f"attention {name!r} ({kind}) has no known q/k/v/o layout, so its heads cannot be "
            "cut: use heads=1.0 (feed-forward layers only) or width=1.0"
        )
    try:
        with torch.no_grad():
            ref = _shapes(call_model(new, example_input))
        if structure.is_transformer:
            shrink_structure(new, structure, heads=heads, ffn=width)
        elif width < 1.0:
            for p in new.parameters():
                p.requires_grad_(True)  # torch-pruning traces the autograd graph
            keep = set(ignored) | set(output_layers(new, example_input, rnn_inputs=True))
            modules = dict(new.named_modules())
            ignored_layers = [modules[n] for n in sorted(keep)]
            ignored_layers += [m for m in new.modules() if isinstance(m, nn.MultiheadAttention)]
            with torch.enable_grad():  # callers (e.g. artifact loaders) may run under no_grad
                _prune(new, width, example_input, ignored_layers, timeout)
        with torch.no_grad():
            out = _shapes(call_model(new, example_input))
    except PlanError:
        raise
    except Exception as e:  # torch-pruning failed on an unusual graph
        raise PlanError(
            f"width={width} could not be applied ({type(e).__name__}: {e}): list the layer "
            "that breaks in `ignored` or use width=1.0"
        ) from e
    if out != ref:
        raise PlanError(
            f"width shrink changed the output shapes {ref} -> {out}: list the output layer "
            "in `ignored`"
        )
    for n, m in new.named_modules():
        m.train(training[n])
    for n, p in new.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    return new


def output_layers(model: nn.Module, example_input: Any, *, rnn_inputs: bool = False) -> list[str]:
    """Names of the layers whose output reaches a model output with no other layer in between.

    With ``rnn_inputs``, also the layers whose output reaches the input of an RNN (``nn.LSTM``,
    ``nn.GRU``, ``nn.RNN``) that way: torch-pruning does not shrink an RNN's ``input_size``, so
    what feeds it keeps its size too.

    "Layer" means Linear, Conv1d/2d, Embedding or MultiheadAttention; found by walking the autograd
    graph of one forward pass back from the outputs. These layers keep their output size when the
    width shrinks (they define the model's output shape).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 3))
        >>> output_layers(net, torch.randn(2, 8))
        ['2']
    """
    names = {m: n for n, m in model.named_modules()}
    producer: dict[Any, str] = {}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            producer[t.grad_fn] = names[mod]

    rnn_in: list[Any] = []

    def pre_hook(_mod: nn.Module, args: Any) -> None:
        t = args[0] if args else None
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            rnn_in.append(t.grad_fn)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _STOP_TYPES)]
    if rnn_inputs:
        handles += [
            m.register_forward_pre_hook(pre_hook)
            for m in model.modules()
            if isinstance(m, nn.RNNBase)
        ]
    try:
        with torch.enable_grad():
            out = call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None] + rnn_in
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in producer:
            found.add(producer[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return sorted(found)


def _prune(
    model: nn.Module,
    width: float,
    example_input: Any,
    ignored: list[nn.Module],
    timeout: float = GRAPH_TIMEOUT,
) -> None:
    """Cut every prunable group of ``model`` in place to ``floor(width * channels)`` channels."""
    # A per-layer ratio of (C - k - 0.5) / C makes torch-pruning keep int(k + 0.5) == k channels
    # exactly, free of float round-off in ``1 - ratio``.
    ratios: dict[nn.Module, float] = {}
    for m in model.modules():
        if isinstance(m, _ROOT_TYPES):
            c = _out_channels(m)
            k = max(1, math.floor(width * c + 1e-9))
            ratios[m] = max(0.0, (c - k - 0.5) / c)
    with warnings.catch_warnings():
        # torch-pruning warns about unwrapped nn.Parameters (e.g. positional embeddings) and
        # prunes their last non-singleton dim, which is the channel dim in common layouts.
        warnings.simplefilter("ignore")
        with deadline(timeout, "torch-pruning's dependency graph"):
            pruner = tp.pruner.BasePruner(
                model,
                example_input,
                forward_fn=call_model,
                output_transform=lambda out: list(_tensors(out)),
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.0,
                pruning_ratio_dict=ratios,
                ignored_layers=ignored,
                root_module_types=list(_ROOT_TYPES),
            )
            pruner.step()
    del pruner


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    return m.out_channels  # type: ignore[return-value]


class _Timeout(BaseException):
    """Raised inside the working thread when a :func:`deadline` passes (not an Exception, so
    library code that catches ``Exception`` does not swallow it)."""


class deadline:  # noqa: N801 - used as a context manager, like contextlib's
    """Interrupt the block with :class:`PlanError` after ``seconds`` (any thread).

    A watchdog thread raises an exception inside the calling thread
    (``PyThreadState_SetAsyncExc``), which Python delivers at the next bytecode, so a pure-Python
    loop (torch-pruning's graph search) stops; one long C call finishes first.

    Example:
        >>> with deadline(5.0, "a quick step"):
        ...     x = sum(range(10))
        >>> try:
        ...     with deadline(0.05, "a loop"):
        ...         while True:
        ...             pass
        ... except PlanError as e:
        ...     print(str(e)[:26])
        a loop took more than 0.05
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self._lock = threading.Lock()
        self._done = self._fired = False

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self._fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._tid), ctypes.py_object(_Timeout)
                )

    def __enter__(self) -> deadline:
        self._tid = threading.get_ident()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        try:
            self._timer.cancel()
            with self._lock:
                self._done = True
                fired = self._fired
        except _Timeout:  # delivered while leaving the block
            fired = True
        if fired:
            # the exception may still be pending if the block ended right after it was set
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._tid), None)
            raise PlanError(
                f"{self.what} took more than {self.seconds:g} s: the model's graph is too "
                "large or unusual for it; list layers in `ignored` or use width=1.0"
            ) from None
        return False


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, tuple | list):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _tensors(out)]
