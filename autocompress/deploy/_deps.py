"""ONNX Runtime, imported where it is used: if it is missing, the error names it and the fix.

The error is a ``ModuleNotFoundError`` (its ``name`` set), not an ``AutocompressError``: a
missing module is not a property of the model, so it must not be reported as "the model cannot
be exported", and callers that turn ``ImportError`` into a message of their own (the search
driver, before any trial runs) still see it as one.
"""

from __future__ import annotations

from types import ModuleType

PIP = {"onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "onnx": "onnx"}


def missing_module(e: ImportError, what: str) -> ModuleNotFoundError:
    """A one-line ``ModuleNotFoundError`` naming the missing module and the install command.

    Example:
        >>> e = missing_module(ModuleNotFoundError("no", name="onnxruntime"), "to_onnx")
        >>> e.name, str(e).split(": ")[-1]
        ('onnxruntime', 'pip install onnxruntime')
    """
    name = e.name or "onnxruntime"
    top = name.split(".")[0]
    return ModuleNotFoundError(
        f"{what} needs the Python module {name!r}, which is not installed: "
        f"pip install {PIP.get(top, top)}",
        name=name,
    )


def onnxruntime(what: str = "ONNX Runtime inference") -> ModuleType:
    """The ``onnxruntime`` module, or :func:`missing_module` raised if it cannot be imported."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing_module(e, what) from None
    return ort
