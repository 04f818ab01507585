"""load: rebuild a model from a verified artifact directory."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from autocompress.artifacts._format import decode_state
from autocompress.artifacts._io import ONNX, PLAN, WEIGHTS, read_verified
from autocompress.compress._meta import set_quant_records
from autocompress.errors import ArtifactError, PlanError
from autocompress.spaces._plan import Plan

if TYPE_CHECKING:
    from autocompress.deploy import OnnxModel

RUNTIMES = ("torch", "onnxruntime")
ONNX_ATOL = 1e-4
"""``runtime="onnxruntime"`` vs ``runtime="torch"``, fp32 form: max absolute output difference
(tested on digits-mlp and mnist1d-cnn; ONNX export itself is verified at ``rtol=1e-3``)."""
INT8_REL = 0.06
"""Same, int8 form: max absolute difference / largest absolute torch output (activations are
quantized to 8 bits at run time), with top-1 agreement >= 97% (tested)."""


def _is_structural(plan: Plan) -> bool:
    return (
        plan.width != 1.0
        or plan.head_fraction != 1.0
        or any(lp.rank_ratio != 1.0 or lp.hot_rows > 0 for lp in plan.layers.values())
    )


def _rebuild(
    task_spec: str | None,
    plan: Plan,
    shapes: dict[str, tuple[int, ...]],
    model: nn.Module | None,
    example_input: torch.Tensor | None,
) -> nn.Module:
    """The architecture the artifact's tensors belong to (base model + structural plan steps)."""
    task = None
    if model is not None:
        base = _copy_architecture(model, shapes, plan)
    elif task_spec is None:
        raise ArtifactError("artifact has no task_spec: pass model=<its uncompressed architecture>")
    else:
        from autocompress.tasks import get_task, task_names

        if task_spec not in task_names():  # user code (make_task may train a teacher): not run
            raise ArtifactError(
                f"artifact's task {task_spec!r} is user code, which load() does not run: "
                "pass model=<its uncompressed architecture> (e.g. make_task().build_model())"
            )
        task = get_task(task_spec)
        base = task.build_model()
    own = {n: tuple(t.shape) for n, t in base.state_dict().items()}
    if own == shapes or not _is_structural(plan):
        return base  # already the compressed architecture, or nothing structural to apply
    from autocompress.compress import restructure

    if plan.width == 1.0 and plan.head_fraction == 1.0:
        # only the width shrink traces the model; low-rank and hot/cold splits need no input
        return restructure(base, plan, None)  # type: ignore[arg-type]
    if example_input is None:
        if task is None and task_spec is None:
            raise ArtifactError("artifact has no task_spec: pass example_input= to load()")
        if task is None:
            from autocompress.tasks import get_task, task_names

            if task_spec not in task_names():
                raise ArtifactError(
                    f"artifact's task {task_spec!r} is user code, which load() does not run: "
                    "pass example_input= (a batch of inputs) with model="
                )
            task = get_task(task_spec)
        example_input = task.example_input()
    return restructure(base, plan, example_input)


def _copy_architecture(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], plan: Plan
) -> nn.Module:
    """A deep copy of ``model`` whose state-dict tensors are left uninitialized when the
    artifact's tensors will overwrite all of them (no structural step reads them first).

    ``load`` then loads every state-dict key with ``strict=True``, so copying a 100M-parameter
    model's weights only to replace them would cost more than decoding the artifact.
    Non-persistent buffers (not in the state dict) are copied as they are.
    """
    own = model.state_dict(keep_vars=True)
    if {n: tuple(t.shape) for n, t in own.items()} != shapes and _is_structural(plan):
        return copy.deepcopy(model)  # restructure() reads the base weights
    memo: dict[int, object] = {}
    for t in own.values():
        if id(t) not in memo:
            blank = torch.empty_like(t, memory_format=torch.contiguous_format)
            memo[id(t)] = (
                nn.Parameter(blank, t.requires_grad) if isinstance(t, nn.Parameter) else blank
            )
    return copy.deepcopy(model, memo)


def _check_shapes(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = {n: tuple(t.shape) for n, t in net.state_dict().items()}
    hint = "pass the architecture it was exported from (model= or the right task_spec)"
    for name in own:
        if name not in state:
            raise ArtifactError(f"artifact has no tensor {name!r} of the rebuilt model: {hint}")
    for name in state:
        if name not in own:
            raise ArtifactError(f"artifact tensor {name!r} is not in the rebuilt model: {hint}")
    for name, t in state.items():
        if tuple(t.shape) != own[name]:
            raise ArtifactError(
                f"tensor {name!r} has shape {list(t.shape)} in the artifact but "
                f"{list(own[name])} in the rebuilt model: {hint}"
            )


def load(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    example_input: torch.Tensor | None = None,
    runtime: str = "torch",
    threads: int = 1,
    providers: Sequence[str] | None = None,
) -> nn.Module | OnnxModel:
    """Rebuild the exported model: same outputs, quant records re-attached, in eval mode.

    Every file is checked (size, sha256, format version, sane shapes) before it is parsed.

    Args:
        path: the artifact directory.
        model: the uncompressed architecture (copied, never modified); default: the artifact's
            task builds it. The compressed model itself is accepted too.
        example_input: input batch for the width/head shrink (the only structural step that
            traces the model); default: the task's. Not needed for low-rank or hot/cold steps.
        runtime: ``"torch"`` (an ``nn.Module``, bit-exact weights) or ``"onnxruntime"``: the
            artifact's verified ``model.onnx`` in an ONNX Runtime session, as an
            :class:`~autocompress.deploy.OnnxModel` (a callable returning torch tensors). Its
            outputs match the torch model's within ``1e-4`` (fp32 form) or, when int8 layers
            were chosen, within 6% of the largest output with >= 97% top-1 agreement.
        threads: ONNX Runtime intra-op threads (``runtime="onnxruntime"`` only).
        providers: ONNX Runtime execution providers; default CPU.

    Example:
        >>> import tempfile
        >>> from autocompress.artifacts import export
        >>> from autocompress.spaces._plan import Plan
        >>> tmp = tempfile.TemporaryDirectory()
        >>> net = torch.nn.Linear(4, 2)
        >>> art = export(net, Plan(), tmp.name + "/a")
        >>> torch.equal(load(art.path, model=torch.nn.Linear(4, 2)).weight, net.weight)
        True
        >>> x = torch.randn(5, 4)
        >>> art = export(net, Plan(), tmp.name + "/b", onnx_example=x)
        >>> om = load(art.path, runtime="onnxruntime")
        >>> bool((om(x) - net(x)).abs().max() <= 1e-4), om.form
        (True, 'fp32')
        >>> tmp.cleanup()
    """
    if runtime not in RUNTIMES:
        raise ArtifactError(f"runtime={runtime!r} is unknown: use one of {list(RUNTIMES)}")
    p = Path(path)
    manifest, data = read_verified(p)
    if runtime == "onnxruntime":
        return _onnx_model(p, data, threads, providers)
    try:
        plan = Plan.from_json(data[PLAN].decode("utf-8"))
    except (PlanError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"artifact {str(p)!r}: plan.json is invalid ({e}): re-export it"
        ) from None
    state, records, aliases = decode_state(data[WEIGHTS])
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    net = _rebuild(manifest["task_spec"], plan, shapes, model, example_input)
    _check_shapes(net, state)
    own = net.state_dict()
    # the decoded tensors are fresh CPU tensors: hand them over instead of copying (a copy of a
    # 100M-parameter model costs more than decoding it) unless devices or dtypes differ
    assign = all(t.device.type == "cpu" and t.dtype == state[n].dtype for n, t in own.items())
    net.load_state_dict(state, strict=True, assign=assign)
    _tie(net, aliases)
    set_quant_records(net, records)
    return net.eval()


def _tie(net: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias key the very same parameter (or buffer) as its target, as exported."""
    for alias, target in aliases.items():
        mod_name, _, attr = alias.rpartition(".")
        mod = net.get_submodule(mod_name)
        tgt_mod, _, tgt_attr = target.rpartition(".")
        value = getattr(net.get_submodule(tgt_mod), tgt_attr)
        if getattr(mod, attr) is value:
            continue  # the architecture ties them already
        if isinstance(value, nn.Parameter):
            setattr(mod, attr, value)
        else:
            mod.register_buffer(attr, value, persistent=True)


def _onnx_model(
    path: Path, data: dict[str, bytes], threads: int, providers: Sequence[str] | None
) -> OnnxModel:
    from autocompress.deploy import OnnxModel
    from autocompress.deploy._runtime import CPU

    if ONNX not in data:
        raise ArtifactError(
            f"artifact {str(path)!r} has no {ONNX}: re-export it with "
            "export(..., onnx_example=task.example_input()) or load it with runtime='torch'"
        )
    return OnnxModel(bytes(data[ONNX]), threads=threads, providers=providers or CPU)
