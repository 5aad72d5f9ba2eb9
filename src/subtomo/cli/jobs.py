"""``subtomo jobs``: list the project's jobs, their status and lineage (no torch)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def command(
    project: Path = typer.Option(Path("."), "--project", help="Project directory."),
) -> None:
    """List the jobs of ``default_pipeline.star``: status and input jobs."""
    from subtomo.project import job_lineage, job_status, read_pipeline

    tables = read_pipeline(project)
    if "pipeline_processes" not in tables:
        typer.echo(f"no jobs yet in {project.resolve()}")
        return
    table = Table("job", "type", "status", "inputs from")
    lineage = job_lineage(tables)
    for _, row in tables["pipeline_processes"].iterrows():
        name = row["rlnPipeLineProcessName"]
        table.add_row(
            name,
            row["rlnPipeLineProcessTypeLabel"],
            job_status(project, name, row["rlnPipeLineProcessStatusLabel"]),
            ", ".join(lineage.get(name, [])) or "-",
        )
    Console().print(table)
