"""``grpo``: run the service. ``grpo serve --embedded`` is the no-services setup."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="GRPO fine-tuning service.", no_args_is_help=True)

Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="Port to listen on.")]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def migrate() -> None:
    """Bring the database (GRPO_DATABASE_URL) to the newest schema."""
    from jobs.migrate import upgrade
    from jobs.settings import get_settings

    _logging()
    upgrade(get_settings().database_url)


@app.command()
def serve(
    host: Host = "127.0.0.1", port: Port = 8000,
    embedded: Annotated[bool, typer.Option(help=(
        "Run a worker beside the API, with a SQLite database, a file-based broker and the artifacts "
        "all under --data-dir: no PostgreSQL, no Redis."))] = False,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded setup keeps everything.")] = Path("var"),
) -> None:
    """Serve the HTTP API (and, with --embedded, a worker too)."""
    _logging()
    if embedded:
        from api.embedded import run_embedded

        raise typer.Exit(run_embedded(data_dir, host=host, port=port))
    import uvicorn

    uvicorn.run("api.main:app", host=host, port=port)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run a GPU worker on the configured queue; extra options go to `celery worker`."""
    from worker.__main__ import main

    main(list(ctx.args))


if __name__ == "__main__":
    app()
