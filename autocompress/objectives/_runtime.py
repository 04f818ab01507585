"""Scoring in the deployment runtime: the task metric of the ONNX form a trial would ship.

With ``Objective(..., score_runtime="onnxruntime")`` the ``accuracy`` of a candidate (the
task's metric: accuracy, cosine, ...) is computed by running its ONNX deployment form in ONNX
Runtime over the split, and constraints on ``accuracy``/``accuracy_drop`` are judged on that
number. The form is the fastest (timed at the batch size and threads of the objective's first
ONNX Runtime latency metric, else at batch 256) among those within 1.25x of the smallest file
that holds fidelity, which is what ``to_onnx(int8="auto", calibration=<val inputs>,
check=<the constraints>)`` ships:

* the forms with int8 activations (``int8``: ``MatMulInteger``; ``lowbit_int8``:
  ``MatMulNBits`` ``accuracy_level=4``), when >5% faster than the exact choice, are scored
  fastest first; the first that meets every constraint on ``accuracy``/``accuracy_drop`` is
  chosen (with no such constraint: the first whose outputs on the task's example rows are
  within ``deploy._fidelity.TOLERANCE`` of the exact form's);
* else the exact form ``to_onnx`` ships without calibration (``lowbit``: the artifact's own
  codes, the PyTorch model's weights; or ``fp32``), scored as it is.

So the int8/fp32 choice never breaks a constraint the exact form meets. The record says which
form and why, as numbers next to the metrics:

* ``onnx_form_<form>`` = 1 for the form scored and deployed (``fp32``, ``int8``, ``lowbit``,
  ``lowbit_int8``);
* ``onnx_score_<form>``: the task score of every form that was scored;
* ``onnx_form_fallback`` = 1 when a faster form was scored and rejected (0 otherwise).

Every deployment metric of the trial (``latency_ms*``, ``speedup*``, ``onnx_bytes``) then
measures that same form, and ``objectives._deploy.deployed_form(model)`` returns its bytes (to
write as the artifact's ``model.onnx``). On the test split the form chosen on validation is
reused (read from the artifact's ``metrics.json``), so the test score is never used to pick a
form.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autocompress.objectives._constraint import Constraint
from autocompress.objectives._metric import Reference

if TYPE_CHECKING:
    from autocompress.artifacts import Artifact
    from autocompress.tasks import Task

LOG = logging.getLogger("autocompress.objectives")
SCORE_RUNTIMES = ("torch", "onnxruntime")
SCORE_KEYS = ("accuracy", "accuracy_drop")
"""Constraints judged on the runtime score."""


def _val_choice(artifact: Artifact | None) -> str | None:
    """The form recorded in the artifact's ``metrics.json`` (chosen on validation), if any."""
    path = getattr(artifact, "path", None)
    if path is None or not (path / "metrics.json").is_file():
        return None
    try:
        values = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    values = values.get("metrics", values) if isinstance(values, dict) else {}
    chosen = [k[len("onnx_form_") :] for k, v in values.items() if k.startswith("onnx_form_")]
    chosen = [f for f in chosen if f != "fallback" and values[f"onnx_form_{f}"] == 1]
    return chosen[0] if len(chosen) == 1 else None


def _meets(score: float, constraints: Sequence[Constraint], ref: float | None) -> bool:
    vals = {"accuracy": score}
    if ref is not None:
        vals["accuracy_drop"] = ref - score
    return all(c.value(vals) <= 0 for c in constraints if c.metric in vals)


def choice_setting(metrics: Sequence[Any]) -> tuple[int, int]:
    """``(batch, threads)`` the preferred form is timed at: those of the objective's first
    ONNX Runtime latency metric, else batch 256 and 1 thread (what ``to_onnx`` ships)."""
    from autocompress.objectives._deploy import DEFAULT_BATCH

    for m in metrics:
        st = getattr(getattr(m, "fn", None), "settings", None)
        if st is not None and st.runtime == "onnxruntime":
            return st.batch, st.threads
    return DEFAULT_BATCH, 1


def _candidates(
    entry: Any, model: Any, task: Task, batch: int, threads: int, max_bytes: int | None = None
) -> list[str]:
    """Forms to try, in order: those with int8 activations >5% faster than the exact choice
    (fastest first), the exact choice, then every other form, smallest file first. A form
    with int8 activations over ``max_bytes`` (1.25x the artifact: a 4-bit model is not scored
    as an int8 file twice its size) is never tried, not even when the exact choice breaks a
    constraint."""
    from autocompress.deploy import measure_latency, tile_batch
    from autocompress.deploy._fidelity import is_exact
    from autocompress.deploy._onnx import _MARGIN, as_numpy, runner, small_forms
    from autocompress.objectives._deploy import _chosen, _example, _session

    assert entry.forms is not None
    exact = _chosen(entry, model, task, batch, threads, "accuracy")
    sizes = {f: len(d) for f, d in entry.forms.items()}
    capped = {f for f in entry.forms if max_bytes is not None and sizes[f] > max_bytes}
    rest = sorted(
        (f for f in entry.forms if f != exact and (is_exact(f) or f not in capped)),
        key=sizes.__getitem__,
    )
    approx = [
        f for f in small_forms(entry.forms, max_bytes=max_bytes) if not is_exact(f) and f != exact
    ]
    if not approx:
        return [exact, *rest]
    cands = [exact, *approx]
    x = as_numpy(tile_batch(_example(task), batch))
    runners = {f: runner(_session(entry, f, threads)) for f in cands}
    stats = measure_latency(runners, x, warmup=2, repeats=7, threads=threads)
    bar = _MARGIN * stats[exact].median_ms
    fast = sorted(
        (f for f in approx if stats[f].median_ms <= bar), key=lambda f: stats[f].median_ms
    )
    return [*fast, exact, *(f for f in rest if f not in fast)]


def _close_to_exact(entry: Any, task: Task, form: str, exact: str) -> bool:
    """Without a score constraint: ``form``'s outputs on the task's example rows are within
    the default tolerance of the exact form's."""
    from autocompress.deploy._fidelity import Fidelity
    from autocompress.objectives._deploy import _example, _session

    fid = Fidelity([_example(task)])
    fid.set_reference(_session(entry, exact, 1))
    return fid.accepts(form, _session(entry, form, 1))


def runtime_scores(
    model: Any,
    artifact: Artifact | None,
    task: Task,
    split: str,
    constraints: Sequence[Constraint],
    reference: Reference | None,
    setting: tuple[int, int] | None = None,
) -> dict[str, float]:
    """``accuracy`` of the deployed ONNX form of ``model`` on ``split``, with the form's record
    (see the module docstring); every deployment metric of ``model`` is pinned to that form.
    ``setting``: the ``(batch, threads)`` the forms are timed at (see
    :func:`choice_setting`)."""
    from autocompress.deploy import OnnxModel
    from autocompress.deploy._fidelity import is_exact
    from autocompress.deploy._onnx import SIZE_SLACK
    from autocompress.objectives._deploy import DEFAULT_BATCH, _entry, _forms, _session

    name = task.metric_name
    if isinstance(model, OnnxModel):  # already a deployment form: score it as it is
        score = task.evaluate(model, split)[name]
        return {"accuracy": score, f"onnx_form_{model.form}": 1.0, "onnx_form_fallback": 0.0}
    entry = _entry(model)
    forms = _forms(entry, model, task, "accuracy", approx=True)
    assert entry.forms is not None
    ref = reference.scores.get(split) if reference is not None else None
    judged = [c for c in constraints if c.metric in SCORE_KEYS]
    recorded = _val_choice(artifact) if split != "val" else None
    if recorded in forms:
        order = [recorded]
    else:
        entry.pinned = None
        batch, threads = setting or (DEFAULT_BATCH, 1)
        size = getattr(artifact, "size_bytes", None)
        cap = int(SIZE_SLACK * size) if isinstance(size, int) and size > 0 else None
        order = _candidates(entry, model, task, batch, threads, cap)
    scores: dict[str, float] = {}
    chosen = None
    exact = next((f for f in order if is_exact(f)), order[-1])
    for form in order:
        scores[form] = task.evaluate(_session(entry, form, 1), split)[name]
        if form == recorded:
            ok = True
        elif judged:
            ok = _meets(scores[form], judged, ref)
        else:
            ok = is_exact(form) or _close_to_exact(entry, task, form, exact)
        if ok:
            chosen = form
            break
    if chosen is None:  # none meets the constraints: report the best-scoring form
        chosen = max(scores, key=scores.__getitem__)
    fallback = chosen != order[0]
    if fallback:
        bounds = ", ".join(str(c) for c in judged) or "the output tolerance"
        LOG.info(
            "the %s ONNX form scores %.4g on %s, breaking %s: the %s form (%.4g) is reported",
            order[0],
            scores[order[0]],
            split,
            bounds,
            chosen,
            scores[chosen],
        )
    entry.pinned = chosen
    out = {"accuracy": scores[chosen], f"onnx_form_{chosen}": 1.0}
    out["onnx_form_fallback"] = 1.0 if fallback else 0.0
    out.update({f"onnx_score_{f}": s for f, s in scores.items()})
    return out
