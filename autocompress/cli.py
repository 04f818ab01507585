"""Command line: ``autocompress run | report | export | compress | tasks | inspect``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autocompress.errors import AutocompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out = Console()
err = Console(stderr=True)


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def tasks(
    train: Annotated[bool, typer.Option(help="Train missing teachers to show accuracy.")] = True,
) -> None:
    """List built-in tasks with teacher artifact size and test accuracy."""
    import tempfile

    from autocompress.artifacts import export
    from autocompress.spaces import Plan
    from autocompress.tasks import get_task, task_names

    table = Table("task", "params", "teacher bytes", "test accuracy")
    for name in task_names():
        task = get_task(name)
        model = task.build_model()
        params = sum(p.numel() for p in model.parameters())
        size, acc = "-", "-"
        if train:
            teacher = task.teacher()
            with tempfile.TemporaryDirectory() as d:
                size = f"{export(teacher, Plan(), Path(d) / 'a', task_spec=task.spec).size_bytes:,}"
            acc = f"{task.evaluate(teacher, 'test')[task.metric_name]:.4f}"
        table.add_row(name, f"{params:,}", size, acc)
    out.print(table)


@app.command()
def inspect(task: Annotated[str, typer.Argument(help="Task name or module:function.")]) -> None:
    """Print the compressible layers of a task's model, their sizes and knobs."""
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
    sparsity: float = 0.0,
    bits: int = 32,
    scheme: str = "uniform",
    rank_ratio: float = 1.0,
    width: float = 1.0,
    epochs: int = 20,
    exclude: Annotated[list[str] | None, typer.Option(help="Layers to leave as they are.")] = None,
) -> None:
    """Apply one uniform plan to a task's teacher, fine-tune, export and report accuracy/size."""
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
    time_budget: Annotated[float | None, typer.Option(help="Seconds for the whole search.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address, e.g. auto.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a killed run in --run-dir.")] = False,
    run_dir: Annotated[Path | None, typer.Option(help="Override the run directory.")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Ray and Optuna logs.")] = False,
) -> None:
    """Run a compression search from an experiment file and print the Pareto front."""
    from autocompress.config import build, load_experiment

    try:
        exp = load_experiment(experiment).with_overrides(
            trials=trials,
            workers=workers,
            time_budget=time_budget,
            address=address,
            run_dir=str(run_dir) if run_dir else None,
        )
        task, space, objective = build(exp, str(experiment))
        from autocompress.search import EarlyStop
        from autocompress.search import run as search_run

        s = exp.search
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
            verbose=verbose,
        )
    except AutocompressError as e:
        _fail(e)
    print(result.summary())
    try:
        from autocompress.report import write_report

        path = write_report(result.run_dir)
        out.print(f"report: {path}")
    except ImportError:
        pass


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")]) -> None:
    """Write report.html and plots for a run directory."""
    from autocompress.report import write_report

    try:
        path = write_report(run_dir)
    except AutocompressError as e:
        _fail(e)
    out.print(f"report: {path}")


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    trial: Annotated[str, typer.Option(help="Trial id (see trials.csv / pareto.csv).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to copy the artifact.")],
) -> None:
    """Copy one trial's artifact out of a run directory (verified on the way)."""
    from autocompress.search import SearchResult

    try:
        path = SearchResult.load(run_dir).export(trial, out_dir)
    except AutocompressError as e:
        _fail(e)
    out.print(f"exported trial {trial} -> {path}")


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
