"""What an ONNX graph takes and returns, for models as they come.

A model is fed a tensor (``model(x)``), a tuple (``model(*xs)``) or a dict of tensors
(``model(**batch)``, Hugging Face style) and answers with a tensor, a tuple, a dict or a
``ModelOutput``. ONNX wants positional tensors in and tensors out, so export goes through
:class:`Positional`: a small module taking the input tensors positionally (ONNX input names = the
dict keys, ``input`` / ``input0``... otherwise), rebuilding the model's input form, calling the
model with its key/value cache off and returning the selected output tensor(s)
(:func:`~autocompress.tasks._batch.pick_output`).

Every input's first axis is the dynamic batch. *Token inputs* (2-D integer or bool tensors, and
the Hugging Face keys in :data:`TOKEN_KEYS`) also get a dynamic sequence axis (axis 1).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.tasks._batch import Inputs, pick_output

INPUT = "input"
OUTPUT = "output"
#: Dict keys whose 2-D tensors are token-aligned (dynamic sequence axis), whatever their dtype.
TOKEN_KEYS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "decoder_input_ids",
        "decoder_attention_mask",
    }
)
FORMS = ("tensor", "tuple", "dict")


def _names(n: int, stem: str) -> list[str]:
    return [stem] if n == 1 else [f"{stem}{i}" for i in range(n)]


@dataclass(frozen=True)
class Signature:
    """The input form of a model: how positional graph inputs map back to its call.

    Args:
        form: ``"tensor"``, ``"tuple"`` or ``"dict"``.
        names: ONNX input names, one per tensor (the dict keys for a dict).
        token: per input, whether axis 1 is a token (sequence) axis.
        batched: per input, whether axis 0 is the batch (its length is the first input's).
        consts: non-tensor entries of a dict input (``return_dict=True`` ...), passed as they are.
    """

    form: str
    names: tuple[str, ...]
    token: tuple[bool, ...]
    batched: tuple[bool, ...]
    consts: dict[str, Any] = field(default_factory=dict)

    def rebuild(self, xs: Sequence[torch.Tensor]) -> Inputs:
        """The model's input form from positional tensors."""
        if self.form == "tensor":
            return xs[0]
        if self.form == "tuple":
            return tuple(xs)
        return {**dict(zip(self.names, xs, strict=True)), **self.consts}


def is_token(name: str, t: torch.Tensor) -> bool:
    """Whether axis 1 of input ``name`` is a sequence axis (2-D ids, masks, type ids)."""
    if t.dim() != 2:
        return False
    return name in TOKEN_KEYS or not (t.is_floating_point() or t.is_complex())


def signature(example: Any) -> tuple[Signature, tuple[torch.Tensor, ...]]:
    """The :class:`Signature` of ``example`` and its tensors in graph-input order.

    Example:
        >>> ids = torch.zeros(2, 5, dtype=torch.long)
        >>> sig, xs = signature({"input_ids": ids, "attention_mask": ids, "return_dict": True})
        >>> sig.form, sig.names, sig.token, sig.consts
        ('dict', ('input_ids', 'attention_mask'), (True, True), {'return_dict': True})
    """
    if isinstance(example, torch.Tensor):
        form, names, xs, consts = "tensor", [INPUT], [example], {}
    elif isinstance(example, tuple):
        form, names, xs, consts = "tuple", _names(len(example), INPUT), list(example), {}
    elif isinstance(example, Mapping):
        form, consts = "dict", {k: v for k, v in example.items() if not torch.is_tensor(v)}
        names = [str(k) for k, v in example.items() if torch.is_tensor(v)]
        xs = [v for v in example.values() if torch.is_tensor(v)]
    else:
        form, xs, names, consts = "?", [], [], {}
    if not xs or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in xs):
        raise AutocompressError(
            "example_input must be a batched tensor, a tuple of them or a dict of them "
            f"(got {type(example).__name__}): pass task.example_input()"
        )
    token = tuple(is_token(n, a) for n, a in zip(names, xs, strict=True))
    batched = tuple(len(a) == len(xs[0]) for a in xs)
    return Signature(form, tuple(names), token, batched, consts), tuple(xs)


def tile_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows made by repeating the rows of ``t``."""
    reps = -(-n // len(t))
    return t.detach().cpu().repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()


def other_shape(sig: Signature, xs: tuple[torch.Tensor, ...], seq: bool) -> tuple:
    """Inputs at another batch size (one row more, rows rotated) and, when ``seq``, another
    sequence length on the token inputs (one shorter, or longer when they are very short).

    Used to verify that a graph was not traced with a constant batch or sequence length.
    """
    out = []
    for a, tok, batched in zip(xs, sig.token, sig.batched, strict=True):
        if batched:
            a = torch.cat([a[1:], a[:2]]) if len(a) >= 2 else torch.cat([a, a])
        if seq and tok:
            a = a[:, :-1] if a.shape[1] >= 3 else torch.cat([a, a[:, -1:]], dim=1)
        out.append(a.contiguous())
    return tuple(out)


# --- outputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputSpec:
    """What the graph returns: ``form`` (``tensor``, ``tuple`` or ``dict``: the model answered
    with a mapping such as a ``ModelOutput``) and the graph output names."""

    form: str
    names: tuple[str, ...]


def select(out: Any, key: str | int | None) -> tuple[OutputSpec, tuple[torch.Tensor, ...]]:
    """The output tensor(s) the graph returns, from a model output.

    A tensor, or a flat tuple of tensors when no ``key`` is given, is returned whole; from a
    dict or ``ModelOutput`` (or a nested tuple) one tensor is chosen by :func:`pick_output`
    (``logits``, else ``last_hidden_state``, else the first tensor, or the one ``key`` names);
    for a mapping the graph output is named after its field.

    Example:
        >>> spec, ts = select({"loss": None, "logits": torch.ones(2, 3)}, None)
        >>> spec, ts[0].shape
        (OutputSpec(form='dict', names=('logits',)), torch.Size([2, 3]))
    """
    if isinstance(out, torch.Tensor) and key in (None, 0):
        return OutputSpec("tensor", (OUTPUT,)), (out,)
    flat = isinstance(out, tuple | list) and out and all(torch.is_tensor(o) for o in out)
    if flat and key is None and not isinstance(out, Mapping):
        return OutputSpec("tuple", tuple(_names(len(out), OUTPUT))), tuple(out)
    try:
        t = pick_output(out, key)
    except AutocompressError as e:
        raise OutputTypeError(str(e)) from None
    if isinstance(out, Mapping):
        name = key if isinstance(key, str) else next(k for k, v in out.items() if v is t)
        return OutputSpec("dict", (str(name),)), (t,)
    return OutputSpec("tensor", (OUTPUT,)), (t,)


class OutputTypeError(AutocompressError):
    """The model's output holds no tensor the graph could return (or not the one asked for)."""


# --- the export module ---------------------------------------------------------------------
def takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` has an explicit ``use_cache`` parameter (Hugging Face)."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Set ``config.use_cache = False`` on every submodule that has such a config, then restore.

    A key/value cache (``DynamicCache``) is an object the exporters cannot return or trace
    through, and an inference graph of one forward pass does not need it.
    """
    saved: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None) is True:
            saved[id(cfg)] = cfg
    for cfg in saved.values():
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in saved.values():
            cfg.use_cache = True


class Positional(nn.Module):
    """``model`` behind positional tensor inputs and tensor outputs (see the module docstring).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> sig, xs = signature({"input": torch.zeros(4, 3)})
        >>> Positional(net, sig, None)(*xs).shape
        torch.Size([4, 2])
    """

    def __init__(self, model: nn.Module, sig: Signature, output: str | int | None) -> None:
        super().__init__()
        self.model = model
        self.sig = sig
        self.output = output
        self.kwargs = {"use_cache": False} if takes_use_cache(model) else {}
        self.eval()

    def call(self, xs: Sequence[torch.Tensor]) -> Any:
        """The model's raw output on positional inputs ``xs``."""
        inputs = self.sig.rebuild(xs)
        if isinstance(inputs, Mapping):
            return self.model(**inputs, **self.kwargs)
        if isinstance(inputs, tuple):
            return self.model(*inputs, **self.kwargs)
        return self.model(inputs, **self.kwargs)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        _, ts = select(self.call(xs), self.output)
        return ts[0] if len(ts) == 1 else ts
