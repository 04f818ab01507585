"""Why an ONNX export failed, in one line: the cause, the exporters' own words, and the fix.

Both exporters bury the cause: the TorchScript one under "Only tuples, lists and Variables are
supported", ``torch.export`` under a three-step banner whose real reason is a chained exception.
The chain is walked to its root and classified (see :data:`CAUSES`); the most specific cause
found in any attempt heads the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OP = re.compile(r"(aten(?:::|\.)[A-Za-z0-9_]+)")
_CALL = re.compile(r'File "([^"]+)", line (\d+), in \w+\s*\n\s*(.+)')


@dataclass(frozen=True)
class Cause:
    """A classified export failure: ``rank`` orders specificity, ``what`` and ``fix`` are text."""

    rank: int
    what: str
    fix: str


def chain(e: BaseException) -> list[BaseException]:
    """``e`` and its ``__cause__`` / ``__context__`` chain, outermost first."""
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _short(text: str, n: int = 160) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def classify(e: BaseException, in_torch: bool = False) -> Cause:
    """The :class:`Cause` of one failed attempt.

    Example:
        >>> classify(RuntimeError("Exporting the operator 'aten::linalg_qr' to ONNX opset "
        ...                       "version 18 is not supported")).what
        "operator 'aten::linalg_qr' has no ONNX conversion (opset 18)"
    """
    from autocompress.deploy._export import Mismatch  # (imports this module)
    from autocompress.deploy._signature import OutputTypeError

    links = chain(e)
    names = " ".join(type(x).__name__ for x in links)
    text = "\n".join(str(x) for x in links)
    root = links[-1]
    if isinstance(e, OutputTypeError):
        return Cause(6, f"its output type is not exportable ({e})", "pick a tensor with output=...")
    if "Cache" in text and re.search(r"\w*Cache\b", text):
        kind = re.search(r"\b(\w*Cache)\b", text)
        return Cause(
            5,
            f"the model builds a key/value cache ({kind.group(1) if kind else 'Cache'})",
            "call it with use_cache=False or set model.config.use_cache = False",
        )
    if in_torch:
        return Cause(
            4,
            f"the model fails in torch on example_input ({type(root).__name__}: "
            f"{_short(str(root))})",
            "pass inputs its forward accepts (task.example_input())",
        )
    if "GuardOnDataDependent" in names or "data-dependent" in text or "data dependent" in text:
        call = _CALL.search(text)
        at = ""
        if call:
            at = f" at {call.group(1).rsplit('/', 1)[-1]}:{call.group(2)} `{call.group(3).strip()}`"
        return Cause(
            4,
            f"data-dependent Python control flow{at}",
            "replace the Python branch on tensor values with tensor ops (torch.where, torch.cond)",
        )
    unsupported = (
        "UnsupportedOperatorError" in names
        or "DispatchError" in names
        or "No ONNX function found" in text
        or re.search(r"to ONNX opset version \d+ is not supported", text)
    )
    if unsupported:
        op = _OP.search(text)
        return Cause(
            4,
            f"operator {op.group(1)!r} has no ONNX conversion (opset 18)"
            if op
            else "an operator has no ONNX conversion (opset 18)",
            "replace that operator in the model, or time it in eager PyTorch ('_torch' metrics)",
        )
    if "Only tuples, lists and Variables are supported" in text:
        kind = re.search(r"unsupported type: (\w+)", text)
        return Cause(
            3,
            f"the model passes a non-tensor value ({kind.group(1) if kind else 'object'})",
            "return tensors (pick one with output=...)",
        )
    if isinstance(e, Mismatch):
        what = _short(str(e), 200)
        if not what.startswith("the model fails"):
            what = f"the traced graph does not reproduce the model: {what}"
        return Cause(
            2,
            what,
            "remove Python control flow on input shapes or values from its forward",
        )
    return Cause(
        1,
        f"{type(root).__name__}: {_short(str(root))}",
        "make its forward traceable by torch.export (no data-dependent Python control flow)",
    )


def export_error(errors: list[tuple[str, BaseException]], in_torch: bool = False) -> str:
    """One line: the most specific cause over all attempts, each attempt's reason, the fix.

    Example:
        >>> import doctest

        >>> export_error([("dynamo", RuntimeError("boom"))])
        'the model cannot be exported to ONNX: RuntimeError: boom (dynamo): make its forward ...'
    """
    causes = [(name, classify(e, in_torch)) for name, e in errors]
    best = max((c for _, c in causes), key=lambda c: c.rank)
    who = list(dict.fromkeys(n for n, c in causes if c.what == best.what))
    others = list(
        dict.fromkeys(f"{n}: {_short(c.what, 120)}" for n, c in causes if c.what != best.what)
    )
    detail = ", ".join(who) + "".join(f"; {o}" for o in others)
    return " ".join(
        f"the model cannot be exported to ONNX: {best.what} ({detail}): {best.fix}".split()
    )
