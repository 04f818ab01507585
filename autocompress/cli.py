"""autocompress: search for the best way to compress a neural network.

Commands: run (search from an experiment file), report, trials and export (a finished run),
compress (one plan), tasks and inspect (what can be compressed). See docs/user-guide.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autocompress.errors import AutocompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)
"""Plain help (``rich_markup_mode=None``): rich's help formatter alone took longer to import
than the rest of ``autocompress --help``."""
out = Console()
err = Console(stderr=True)


def _fail(e: Exception | str) -> None:
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        from autocompress import __version__

        out.print(f"autocompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """autocompress: search for the best way to compress a neural network.

    Commands: run (search from an experiment file), report, trials and export (a finished
    run), compress (one plan), tasks and inspect (what can be compressed). See
    docs/user-guide.md.
    """
    _cwd_importable()


def _cwd_importable() -> None:
    """``module:function`` tasks and metrics in the working directory are importable, as with
    ``python -m`` (the ``autocompress`` script alone would not see them); ``run`` also adds the
    experiment file's directory (``config.importable``)."""
    import os

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in env:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *env])


@app.command()
def tasks(
    train: Annotated[bool, typer.Option(help="Train missing teachers to show accuracy.")] = True,
) -> None:
    """List the built-in tasks (teacher size, test accuracy)."""
    import tempfile

    from autocompress.artifacts import export
    from autocompress.spaces import Plan
    from autocompress.tasks import get_task, task_names

    table = Table("task", "params", "teacher bytes", "test score")
    for name in task_names():
        try:
            task = get_task(name)
            model = task.build_model()
        except AutocompressError as e:  # e.g. minilm without the [hf] extra: say so, go on
            table.add_row(name, "-", "-", f"unavailable: {e}")
            continue
        params = sum(p.numel() for p in model.parameters())
        size, acc = "-", "-"
        if train:
            teacher = task.teacher()
            with tempfile.TemporaryDirectory() as d:
                size = f"{export(teacher, Plan(), Path(d) / 'a', task_spec=task.spec).size_bytes:,}"
            acc = f"{task.evaluate(teacher, 'test')[task.metric_name]:.4f} {task.metric_name}"
        table.add_row(name, f"{params:,}", size, acc)
    out.print(table)


@app.command()
def inspect(task: Annotated[str, typer.Argument(help="Task name or module:function.")]) -> None:
    """Show a task's compressible layers, sizes and knobs."""
    from autocompress.spaces import CompressionSpace
    from autocompress.tasks import get_task

    try:
        space = CompressionSpace.from_model(get_task(task).build_model())
    except AutocompressError as e:
        _fail(e)
    table = Table("layer", "kind", "shape", "params", "knobs", "note")
    for row in space.describe():
        table.add_row(
            row["layer"], row["kind"], row["shape"], f"{row['params']:,}", row["knobs"], row["note"]
        )
    out.print(table)
    for name, why in space.skipped.items():
        out.print(f"not compressed: {name}: {why}", highlight=False, soft_wrap=True)
    out.print(
        f"coverage: {space.coverage:.1%} of {space.total_params:,} parameters are in "
        f"compressible layers ({space.covered_params:,}; tied tensors counted once)",
        soft_wrap=True,
    )


@app.command()
def compress(
    task: Annotated[str, typer.Argument(help="Task name or module:function.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Artifact directory to write.")],
    sparsity: Annotated[
        float, typer.Option(help="Fraction of each layer's weights set to zero, in [0, 1).")
    ] = 0.0,
    bits: Annotated[
        int, typer.Option(help="Weight bit-width: 2-8, 16 (fp16) or 32 (no quantization).")
    ] = 32,
    scheme: Annotated[
        str, typer.Option(help="Quantization scheme: uniform or codebook (k-means).")
    ] = "uniform",
    rank_ratio: Annotated[
        float,
        typer.Option(help="Low-rank factorization: fraction of the break-even rank (1 = off)."),
    ] = 1.0,
    width: Annotated[
        float, typer.Option(help="Fraction of channels kept by structured pruning (1 = all).")
    ] = 1.0,
    epochs: Annotated[int, typer.Option(help="Fine-tuning (distillation) epochs.")] = 20,
    exclude: Annotated[list[str] | None, typer.Option(help="Layers to leave as they are.")] = None,
) -> None:
    """Compress a task's teacher with one uniform plan.

    Fine-tunes, exports the artifact to --out and prints its test accuracy and size.
    """
    import tempfile

    from autocompress.artifacts import export
    from autocompress.compress import apply
    from autocompress.spaces import CompressionSpace, FinetuneSettings, Plan
    from autocompress.tasks import get_task

    try:
        t = get_task(task)
        space = CompressionSpace.from_model(
            t.build_model(), exclude=exclude or (), finetune=FinetuneSettings(epochs=epochs)
        )
        plan = space.validate(
            space.uniform(
                sparsity=sparsity, bits=bits, scheme=scheme, rank_ratio=rank_ratio, width=width
            )
        )
        teacher = t.teacher()
        model = apply(teacher, plan, t)
        acc = t.evaluate(model, "test")[t.metric_name]
        art = export(model, plan, out_dir, task_spec=t.spec, metrics={f"test_{t.metric_name}": acc})
        with tempfile.TemporaryDirectory() as d:
            ref = export(teacher, Plan(), Path(d) / "t", task_spec=t.spec).size_bytes
    except AutocompressError as e:
        _fail(e)
    base = t.evaluate(teacher, "test")[t.metric_name]
    out.print(
        f"{t.name}: test {t.metric_name} {acc:.4f} (teacher {base:.4f}), "
        f"{art.size_bytes:,} bytes (teacher {ref:,}, {ref / art.size_bytes:.1f}x) -> {out_dir}"
    )


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    trials: Annotated[int | None, typer.Option(help="Override search.trials.")] = None,
    workers: Annotated[int | None, typer.Option(help="Parallel trials.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override search.seed.")] = None,
    sampler: Annotated[
        str | None, typer.Option(help="Override search.sampler: tpe, nsga2, gp or random.")
    ] = None,
    time_budget: Annotated[float | None, typer.Option(help="Seconds for the whole search.")] = None,
    refine: Annotated[
        int | None,
        typer.Option(help="Override search.refine: screen cheaply, then fine-tune the K best."),
    ] = None,
    refine_margin: Annotated[
        float | None,
        typer.Option(
            help="Override search.refine_margin: refine first the screened plans that miss the "
            "constraints by at most this summed relative violation (0: feasible first)."
        ),
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address, e.g. auto.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a killed run in --run-dir.")] = False,
    run_dir: Annotated[
        str | None,
        typer.Option(help="Override the run directory: a path or a URI (s3://bucket/prefix)."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Ray and Optuna logs.")] = False,
) -> None:
    """Search compression plans from an experiment file.

    Prints the Pareto front and writes report.html in the run directory.

    The file, the objective, the run directory and --resume are all checked before any task
    code runs (a module:function task may train a teacher).
    """
    from autocompress.config import build, build_objective, load_experiment

    try:
        exp = load_experiment(experiment).with_overrides(
            trials=trials,
            workers=workers,
            seed=seed,
            sampler=sampler,
            time_budget=time_budget,
            refine=refine,
            refine_margin=refine_margin,
            address=address,
            run_dir=str(run_dir) if run_dir else None,
        )
        objective = build_objective(exp, str(experiment))
        from autocompress.search._checks import preflight

        s = exp.search
        preflight(
            exp.run_dir,
            resume,
            exp.task,
            objective,
            {"trials": s.trials, "sampler": s.sampler, "seed": s.seed},
        )
        task, space, objective = build(exp, str(experiment), objective)
        from autocompress.search import EarlyStop
        from autocompress.search import run as search_run

        result = search_run(
            task,
            space,
            objective,
            trials=s.trials,
            workers=s.workers,
            sampler=s.sampler,
            seed=s.seed,
            time_budget=s.time_budget,
            trial_timeout=s.trial_timeout,
            address=s.address,
            resume=resume,
            run_dir=exp.run_dir,
            baselines=None if s.baselines else [],
            keep_artifacts=s.keep_artifacts,
            cpus_per_trial=s.cpus_per_trial,
            gpus_per_trial=s.gpus_per_trial,
            device=s.device,
            max_failures=s.max_failures,
            early_stop=EarlyStop(**s.early_stop.model_dump()) if s.early_stop else False,
            refine=s.refine,
            screen_steps=s.screen_steps,
            refine_margin=s.refine_margin,
            sensitivity=s.sensitivity,
            verbose=verbose,
        )
    except AutocompressError as e:
        _fail(e)
    print(result.summary())
    try:
        from autocompress.report import write_report

        path = write_report(result.run_dir)
        if result.source:  # a run on object storage: the report goes there too
            from autocompress.search._storage import Remote

            Remote(result.source).push(result.run_dir, ["report.html", "plots"])
            out.print(f"report: {result.source.split('?')[0].rstrip('/')}/report.html ({path})")
        else:
            out.print(f"report: {path}")
    except ImportError:
        pass


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory or its URI.")],
) -> None:
    """Write report.html and plots for a run directory (or a run on object storage)."""
    from autocompress.report import write_report
    from autocompress.search._storage import is_uri, open_run

    try:
        local, remote = open_run(run_dir) if is_uri(run_dir) else (Path(run_dir), None)
        path: Any = write_report(local)
        if remote is not None:
            remote.push(local, ["report.html", "plots"])
            path = f"{remote.uri.split('?')[0].rstrip('/')}/report.html ({path})"
    except AutocompressError as e:
        _fail(e)
    out.print(f"report: {path}")


@app.command()
def trials(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory or its URI.")],
    front: Annotated[bool, typer.Option(help="Only the Pareto front.")] = False,
) -> None:
    """List a run's trials (ids for export, status, metrics)."""
    from autocompress.search import SearchResult

    try:
        res = SearchResult.load(run_dir)
    except AutocompressError as e:
        _fail(e)
    on_front = {str(t) for t in res.pareto["trial_id"]} if len(res.pareto) else set()
    cols = [c for c in dict.fromkeys([*res.names, "compression_ratio"]) if c in res.trials]
    table = Table("trial_id", "status", "feasible", "front", *cols)
    for _, row in res.trials.iterrows():
        tid = str(row["trial_id"])
        if front and tid not in on_front:
            continue
        values = [f"{row[c]:.4g}" if isinstance(row[c], int | float) else str(row[c]) for c in cols]
        feasible = "yes" if bool(row.get("feasible", False)) else "no"
        table.add_row(tid, str(row["status"]), feasible, "*" if tid in on_front else "", *values)
    out.print(table)


@app.command("export")
def export_cmd(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory or its URI.")],
    trial: Annotated[
        str, typer.Option(help="Trial id (list them with: autocompress trials RUN_DIR).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to copy the artifact.")],
) -> None:
    """Copy one trial's artifact out of a run, verified.

    Every file's size and sha256 are checked against the artifact's manifest before and after
    the copy; a corrupt artifact is refused and nothing is copied.
    """
    from autocompress.search import SearchResult

    try:
        res = SearchResult.load(run_dir)
        if str(trial) not in set(res.trials["trial_id"].astype(str)):
            _fail(
                f"no trial {trial!r} in {str(run_dir)!r}: list the trial ids with "
                f"`autocompress trials {run_dir}` (front only: --front)"
            )
        path = res.export(trial, out_dir)
    except AutocompressError as e:
        _fail(e)
    out.print(f"exported trial {trial} -> {path}")


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
