"""The trial function Ray Tune runs: plan -> compressed model -> artifact -> metrics.

Every trial writes one JSON record, ``run_dir/records/<trial_id>.json`` (status, failure reason,
plan, the sampler's parameters, metrics, constraint values, timing), atomically, before it
reports to Tune. The record is what the trials table is built from, what a duplicate plan
reuses, and what a trial restarted by a resume finds if it had already finished before the
driver was killed. A finished record that a resumed Tune experiment does not know (the driver
died before Tune saved the trial) is put in ``records/adopt/``; the trial that is given the
same plan again adopts it instead of recomputing it (see :func:`adopt`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autocompress.objectives import Objective, Reference
from autocompress.search._common import CONSTRAINT_PREFIX
from autocompress.search._early import EarlyStop
from autocompress.search._storage import Remote, is_uri, scratch_dir
from autocompress.tasks import Task

FINISHED = ("COMPLETE", "FAILED")
MAX_RECORD_BYTES = 4 << 20
"""A record larger than this is not read (a plan of a 100k-layer model is still far below)."""
ADOPT = "adopt"
HARD_TIMEOUT_FACTOR, HARD_TIMEOUT_GRACE = 2.0, 10.0
"""A trial still running after ``2 x trial_timeout + 10 s`` is recorded FAILED and its worker
process is ended (a hung metric or a deadlock cannot be interrupted any other way)."""


@dataclass(frozen=True)
class TrialSettings:
    """What every trial needs besides the task and objective (all plain data)."""

    run_dir: str
    cpus_per_trial: float = 1.0
    trial_timeout: float | None = None
    reference: Reference = Reference()
    seed: int = 0
    device: str = "cpu"
    early_stop: EarlyStop | None = None


@dataclass(frozen=True)
class Shipment:
    """The task as the driver put it in Ray's object store once per run (a cheap handle).

    ``ref`` is the ``ray.ObjectRef`` of the task (nested in this object, so Ray hands it over
    unresolved); ``token`` names the run, so a worker process reused across trials (or runs)
    knows whether the task it holds is this run's.
    """

    token: str
    ref: Any


@dataclass
class WorkerCache:
    """What a worker process keeps for one run: the task and the teacher's train outputs.

    The teacher's outputs on the in-memory train split are computed on first use and reused by
    every later trial of the run in this process (a streamed train split has none: the
    fine-tune runs the teacher per batch).
    """

    task: Task
    token: str = ""
    _soft: Any = field(default=None, repr=False)
    _soft_done: bool = False

    def train_outputs(self) -> tuple[torch.Tensor | None, float]:
        """The teacher's train outputs (or None when streamed) and the seconds spent now."""
        if self._soft_done:
            return self._soft, 0.0
        from autocompress.compress._finetune import soft_targets

        t0 = time.monotonic()
        self._soft = soft_targets(self.task.teacher(), self.task)
        self._soft_done = True
        release_freed_memory()  # the teacher's forward temporaries
        return self._soft, time.monotonic() - t0


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS, musl...
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return None


FULL_RELEASE_AFTER_S = 10.0
"""A trial this long is followed by a full garbage collection before the trim (a collection
costs ~0.1-0.2 s in a worker that imported torch + transformers: per-trial overhead on quick
trials, noise on long ones, which are the ones that hold big models)."""


def release_freed_memory(collect: bool = True) -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``, microseconds),
    after a full garbage collection when ``collect``; False where there is no ``malloc_trim``.

    glibc keeps freed chunks in its arenas: a worker's resident memory otherwise holds the
    high-water mark of every earlier phase (task deserialization, teacher outputs, the last
    trial's student, optimizer state and export buffers) on top of the current trial. Measured
    on a 22.7M BERT (benchmarks/scale_search.py, 2 workers): after one trial a worker's arenas
    held 510 MB free against 263 MB in use and its next trial started at 1176 MB resident;
    with these trims it starts at 720 MB (the peak inside one fine-tune is not changed). A trim
    costs milliseconds; it runs after the task arrives, after the teacher's outputs and after
    every trial.

    Example:
        >>> release_freed_memory() in (True, False)
        True
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_CACHE: dict[str, WorkerCache] = {}
"""This process's cache, ``{run token: WorkerCache}``; holds the current run only."""


def worker_cache(shipment: Shipment) -> tuple[WorkerCache, float]:
    """The cached task of ``shipment``'s run, fetched and deserialized on first use in this
    process; returns it and the seconds that fetching took now (0.0 when cached).

    Only one run is kept: a worker that moves to another run drops the previous task.
    """
    hit = _CACHE.get(shipment.token)
    if hit is not None:
        return hit, 0.0
    import ray

    t0 = time.monotonic()
    task = ray.get(shipment.ref)
    _CACHE.clear()
    _CACHE[shipment.token] = hit = WorkerCache(task, shipment.token)
    return hit, time.monotonic() - t0


@contextmanager
def _step_clock(marks: dict[str, float]) -> Iterator[None]:
    """Record the time of the first optimizer step (``marks["first_step"]``) while active."""

    def hook(*_: Any) -> None:
        marks.setdefault("first_step", time.monotonic())

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TrialFailure(RuntimeError):
    """A candidate that cannot be scored (non-finite metric, timeout)."""


def record_path(run_dir: str | Path, trial_id: str) -> Path:
    """Where trial ``trial_id``'s record lives."""
    return Path(run_dir) / "records" / f"{trial_id}.json"


def _load(path: Path) -> dict[str, Any] | None:
    """A record file, or None if it is missing, oversized, not JSON or not a record.

    Records are plain JSON written by the trials themselves; a file that does not look like one
    (tampered, or written by something else) is ignored, never trusted.
    """
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(data: bytes | None) -> dict[str, Any] | None:
    """The record in ``data``, or None if it is not JSON or not a record."""
    try:
        rec = json.loads(data) if data is not None else None
    except ValueError:
        return None
    ok = isinstance(rec, dict) and rec.get("status") in FINISHED
    ok = ok and isinstance(rec.get("trial_id"), str) and isinstance(rec.get("plan_json"), str)
    ok = ok and isinstance(rec.get("values", {}), dict)
    return rec if ok else None


def read_record(run_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The record of ``trial_id``, or None if there is none (or it is unreadable).

    ``run_dir`` may be a URI (a run on object storage, see ``search/_storage.py``).
    """
    if is_uri(run_dir):
        data = Remote(str(run_dir)).read_bytes(f"records/{trial_id}.json", MAX_RECORD_BYTES)
        rec = _parse(data)
    else:
        rec = _load(record_path(run_dir, trial_id))
    return rec if rec is not None and rec["trial_id"] == trial_id else None


def read_records(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every valid record in ``run_dir/records``, by trial id."""
    out = {}
    for p in sorted((Path(run_dir) / "records").glob("*.json")):
        rec = _load(p)
        if rec is not None and rec["trial_id"] == p.stem:
            out[p.stem] = rec
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically and durably: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, sort_keys=True, allow_nan=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Atomically write a record (temp file + fsync + rename; one object on object storage)."""
    if is_uri(run_dir):
        data = json.dumps(record, sort_keys=True, allow_nan=True).encode()
        Remote(str(run_dir)).write_bytes(f"records/{record['trial_id']}.json", data)
        return
    _write_json(record_path(run_dir, record["trial_id"]), record)


def plan_key(plan_json: str) -> str:
    """File name of the adoption slot of a plan (of its :meth:`Plan.canonical` JSON, so a
    version that writes more default knobs into a plan's JSON finds the same slot)."""
    from autocompress.spaces import Plan

    return hashlib.sha256(Plan.canonical(plan_json).encode()).hexdigest()[:32]


def adopt(run_dir: str | Path, trial_id: str, plan_json: str) -> dict[str, Any] | None:
    """Take over the orphaned finished record of the same plan, if there is one.

    The slot ``records/adopt/<plan_key>.json`` is claimed by an atomic rename, so two trials
    never adopt the same record. The adopted record keeps its values, times and artifact
    directory; it gets this trial's id and ``adopted_from``.
    """
    if is_uri(run_dir):
        return _adopt_remote(Remote(str(run_dir)), trial_id, plan_json)
    pool = Path(run_dir) / "records" / ADOPT
    slot = pool / f"{plan_key(plan_json)}.json"
    claim = pool / f".claim-{trial_id}.json"
    if not slot.is_file():
        return None
    try:
        os.rename(slot, claim)
    except OSError:  # another trial claimed it first
        return None
    old = _load(claim)
    if old is None:  # unreadable: nothing to adopt
        claim.unlink(missing_ok=True)
        return None
    if not same_plan(old["plan_json"], plan_json):  # not this plan: back to the pool
        os.replace(claim, slot)
        return None
    rec = _adopted(old, trial_id, plan_json)
    write_record(run_dir, rec)
    claim.unlink(missing_ok=True)
    return rec


def same_plan(a: str, b: str) -> bool:
    """Whether two plan JSON strings describe the same plan (by :meth:`Plan.canonical`: a
    version that writes more default knobs into a plan's JSON still matches).

    Example:
        >>> old = '{"layers":{"fc1":{"bits":4,"hot_rows":0.0}}}'
        >>> same_plan(old, '{"layers":{"fc1":{"bits":4}}}')
        True
    """
    from autocompress.spaces import Plan

    return a == b or Plan.canonical(a) == Plan.canonical(b)


def _adopted(old: dict[str, Any], trial_id: str, plan_json: str) -> dict[str, Any]:
    """The orphan record ``old`` taken over by ``trial_id`` (with this version's plan JSON)."""
    adopted_from = old.get("adopted_from") or old["trial_id"]
    return {**old, "trial_id": trial_id, "plan_json": plan_json, "adopted_from": adopted_from}


def _adopt_remote(remote: Remote, trial_id: str, plan_json: str) -> dict[str, Any] | None:
    """:func:`adopt` on object storage: the claim is a copy-then-delete rename (not atomic
    there); the searcher never gives one plan to two running trials, so no two claim it."""
    slot = f"records/{ADOPT}/{plan_key(plan_json)}.json"
    claim = f"records/{ADOPT}/.claim-{trial_id}.json"
    if not remote.exists(slot) or not remote.move(slot, claim):
        return None
    old = _parse(remote.read_bytes(claim, MAX_RECORD_BYTES))
    if old is None:
        remote.delete(claim)
        return None
    if not same_plan(old["plan_json"], plan_json):  # not this plan: back to the pool
        remote.move(claim, slot)
        return None
    rec = _adopted(old, trial_id, plan_json)
    write_record(remote.uri, rec)
    remote.delete(claim)
    return rec


def report_of(record: dict[str, Any], search_metrics: list[str]) -> dict[str, Any]:
    """The flat dict reported to Tune: metrics only for COMPLETE trials, never NaN.

    A failed trial reports the searcher's metrics as None: Tune insists on the keys, and
    :class:`ConstrainedOptunaSearch` tells Optuna FAIL from ``status``.
    """
    out: dict[str, Any] = {
        "status": record["status"],
        "reason": record.get("reason") or "",
        "plan_json": record["plan_json"],
        "duplicate_of": record.get("duplicate_of") or "",
        "duration_s": float(record.get("duration_s") or 0.0),
    }
    if record["status"] == "COMPLETE":
        out.update({k: float(v) for k, v in record["values"].items()})
        for i, v in enumerate(record["constraints"]):
            out[f"{CONSTRAINT_PREFIX}{i}"] = float(v)
        out["feasible"] = bool(record["feasible"])
        out["violation"] = float(record["violation"])
    else:
        out.update({name: None for name in search_metrics})
    return out


_WARM = False


def _warm_up() -> None:
    """Pay torch's one-off lazy initialization (about 1 s) before a trial's clock starts."""
    global _WARM
    if _WARM:
        return
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    lin(torch.zeros(1, 2)).sum().backward()
    opt.step()
    _WARM = True


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"[:500]


def evaluate_plan(
    plan_json: str,
    trial_id: str,
    task: Task,
    objective: Objective,
    settings: TrialSettings,
    cache: WorkerCache | None = None,
    ship_s: float = 0.0,
) -> dict[str, Any]:
    """Compress, export and score one plan; always returns a record, COMPLETE or FAILED.

    ``trial_timeout`` is the fine-tune deadline (the best epoch so far is kept); a trial that
    still takes more than 1.5 x ``trial_timeout`` + 1 s in total is recorded as FAILED.
    ``cache`` (a :class:`WorkerCache` of ``task``) reuses the teacher's train outputs across
    trials. The record's ``timing`` splits the trial's seconds: ``ship_s`` (fetching the task,
    given by the caller), ``teacher_outputs_s``, ``compress_s`` (to the first optimizer step,
    or all of the compression without fine-tune), ``finetune_s``, ``export_s``,
    ``evaluate_s`` and, for a run on object storage, ``upload_s``.
    """
    from autocompress import compress
    from autocompress.artifacts import export, write_metrics
    from autocompress.spaces import Plan

    _warm_up()
    start, started_at = time.monotonic(), time.time()
    timeout = settings.trial_timeout
    remote = Remote(settings.run_dir) if is_uri(settings.run_dir) else None
    if remote is None:
        art_dir = Path(settings.run_dir) / "trials" / trial_id
    else:  # exported here, then uploaded to <uri>/trials/<id> before the record is written
        art_dir = scratch_dir() / trial_id
    rec: dict[str, Any] = {
        **stub_record(trial_id, plan_json),
        "started_at": started_at,
        "pid": os.getpid(),
    }

    def check_time(step: str) -> None:
        if timeout is not None and time.monotonic() - start > 1.5 * timeout + 1.0:
            took = time.monotonic() - start
            raise TrialFailure(f"{step} ended after {took:.1f}s, over trial_timeout={timeout}s")

    timing = rec["timing"] = {"ship_s": ship_s}
    cache = cache if cache is not None else WorkerCache(task)
    try:
        plan = Plan.from_json(plan_json)
        deadline = start + timeout if timeout is not None else None
        soft = None
        if plan.finetune.epochs > 0:
            soft, timing["teacher_outputs_s"] = cache.train_outputs()
        marks: dict[str, float] = {}
        t0 = time.monotonic()
        with _step_clock(marks):
            model = compress.apply(
                task.teacher(),
                plan,
                task,
                seed=settings.seed,
                deadline=deadline,
                device=settings.device,
                stop=_stopper(settings, objective, plan.finetune.epochs, rec),
                teacher_outputs=soft,
            )
        t1 = time.monotonic()
        first = marks.get("first_step", t1)
        timing.update(compress_s=first - t0, finetune_s=t1 - first)
        check_time("compression")
        shutil.rmtree(art_dir, ignore_errors=True)  # left by an attempt before a restart
        art = export(model, plan, art_dir, task_spec=task.spec)
        t2 = time.monotonic()
        timing["export_s"] = t2 - t1
        values = objective.evaluate(model, art, task, "val", settings.reference)
        timing["evaluate_s"] = time.monotonic() - t2
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            name = next(iter(bad))
            raise TrialFailure(f"metric {name!r} is {bad[name]}: the candidate cannot be scored")
        check_time("evaluation")
        cv = objective.constraint_values(values)
        write_metrics(art_dir, values)
        if remote is not None:
            t3 = time.monotonic()
            remote.delete(f"trials/{trial_id}")  # left by an attempt before a restart
            remote.upload(art_dir, f"trials/{trial_id}")
            timing["upload_s"] = time.monotonic() - t3
        rec.update(
            status="COMPLETE",
            values=values,
            constraints=cv,
            feasible=all(v <= 0 for v in cv),
            violation=float(sum(max(v, 0.0) for v in cv)),
            artifact=f"trials/{trial_id}",
        )
    except Exception as exc:  # recorded, never raised: a broken candidate is a result
        rec["reason"] = _reason(exc)
        shutil.rmtree(art_dir, ignore_errors=True)
    finally:
        if remote is not None:
            shutil.rmtree(art_dir.parent, ignore_errors=True)
    rec["duration_s"] = time.monotonic() - start
    rec["finished_at"] = time.time()
    return rec


def _stopper(
    settings: TrialSettings, objective: Objective, epochs: int, rec: dict[str, Any]
) -> Any:
    """The early-stopping rule of this trial (None when off or without a score constraint);
    when it fires, ``rec["early_stopped"]`` gets the epoch."""
    es = settings.early_stop
    floor = objective.score_floor(settings.reference.scores.get("val"))
    if es is None or floor is None:
        return None
    rule = es.rule(floor, epochs)

    def stop(done: int, best: float) -> bool:
        if rule(done, best):
            rec["early_stopped"] = done
            return True
        return False

    return stop


class _Watchdog:
    """Ends a hung trial: after ``limit`` seconds, record it FAILED and exit its worker process.

    Python cannot interrupt a thread stuck in C code or an endless user metric, so the only
    reliable stop is the process: the record is written first (Tune then sees the worker die,
    and a retry or a resume finds the FAILED record instead of running the plan again).
    """

    def __init__(self, limit: float, record: dict[str, Any], run_dir: str, timeout: float):
        self.done = threading.Event()
        self.args = (limit, record, run_dir, timeout)
        threading.Thread(target=self._watch, daemon=True, name="trial-watchdog").start()

    def _watch(self) -> None:
        limit, record, run_dir, timeout = self.args
        if self.done.wait(limit):
            return
        now = time.time()
        rec = {
            **record,
            "status": "FAILED",
            "reason": f"TrialFailure: still running after {limit:.0f}s, over "
            f"trial_timeout={timeout}s: the trial's worker process was stopped",
            "duration_s": limit,
            "finished_at": now,
        }
        try:
            write_record(run_dir, rec)
        finally:
            os._exit(3)


def stub_record(trial_id: str, plan_json: str) -> dict[str, Any]:
    """A FAILED record of ``plan_json`` with no values yet (filled in by the caller)."""
    return {
        "trial_id": trial_id,
        "plan_json": plan_json,
        "status": "FAILED",
        "reason": "",
        "values": {},
        "constraints": [],
        "feasible": False,
        "violation": math.inf,
        "artifact": None,
        "duplicate_of": None,
        "started_at": time.time(),
        "host": socket.gethostname(),
    }


def _finished_before(run_dir: str, trial_id: str, plan_json: str) -> dict[str, Any] | None:
    """This trial's own record, or an orphan of the same plan to adopt (both from a resume)."""
    old = read_record(run_dir, trial_id)
    if old is not None and same_plan(old["plan_json"], plan_json):
        return old
    return adopt(run_dir, trial_id, plan_json)


def guarded_evaluate(
    trial_id: str,
    plan_json: str,
    shipment: Shipment,
    objective: Objective,
    settings: TrialSettings,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_plan` with the task from :func:`worker_cache` under the hard-timeout
    watchdog; ``extra`` fields go into the watchdog's FAILED record too."""
    extra = dict(extra or {})
    watchdog = None
    if settings.trial_timeout is not None:
        limit = HARD_TIMEOUT_FACTOR * settings.trial_timeout + HARD_TIMEOUT_GRACE
        stub = {**stub_record(trial_id, plan_json), **extra}
        stub.pop("status")
        stub.pop("reason")
        watchdog = _Watchdog(limit, stub, settings.run_dir, settings.trial_timeout)
    try:
        t0 = time.monotonic()
        try:
            cache, ship_s = worker_cache(shipment)
        except Exception as exc:  # the task could not be fetched: this trial fails
            rec = {**stub_record(trial_id, plan_json), "reason": _reason(exc)}
            rec.update(duration_s=time.monotonic() - t0, finished_at=time.time())
        else:
            if ship_s:
                release_freed_memory()  # the deserialization's temporaries
            rec = evaluate_plan(plan_json, trial_id, cache.task, objective, settings, cache, ship_s)
    finally:
        if watchdog is not None:
            watchdog.done.set()
        # this trial's model, optimizer state and export buffers
        release_freed_memory(collect=time.monotonic() - t0 >= FULL_RELEASE_AFTER_S)
    return {**rec, **extra}


def run_trial(
    config: dict[str, Any],
    *,
    shipment: Shipment,
    objective: Objective,
    settings: TrialSettings,
) -> None:
    """Ray Tune function trainable: one plan, one record, one report.

    The task comes from ``shipment`` through this process's :func:`worker_cache`: a reused
    worker deserializes it once per run, not once per trial.
    """
    from ray import tune

    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id()
    names = objective.search_metrics[0]
    plan_json = config["plan_json"]
    old = _finished_before(settings.run_dir, trial_id, plan_json)
    if old is not None:
        tune.report(report_of(old, names))  # finished before the driver was killed: keep it
        return
    params = {k: v for k, v in config.items() if k not in ("plan_json", "duplicate_of")}
    dup = config.get("duplicate_of")
    orig = read_record(settings.run_dir, dup) if dup else None
    if orig and same_plan(orig["plan_json"], plan_json):  # read_record checked it is a str
        now = time.time()
        rec = {**orig, "trial_id": trial_id, "duplicate_of": dup, "duration_s": 0.0}
        rec.update(started_at=now, finished_at=now, host=socket.gethostname())
        rec.pop("adopted_from", None)
    else:
        rec = guarded_evaluate(
            trial_id, plan_json, shipment, objective, settings, {"params": params}
        )
    rec["params"] = params
    write_record(settings.run_dir, rec)
    tune.report(report_of(rec, names))
