"""``grpo``: run the service (``grpo serve --embedded`` is the no-services setup) and manage its
API keys (``grpo keys create NAME``)."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from grpo_client.cli import COMMANDS as client_commands
from grpo_client.cli import chat as chat_command

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(help="GRPO fine-tuning service.", no_args_is_help=True)
keys = typer.Typer(help="API keys: each reaches its owner's datasets and jobs.", no_args_is_help=True)
app.add_typer(keys, name="keys")
for _name, _group in client_commands.items():  # datasets, jobs, rewards: over the HTTP API
    app.add_typer(_group, name=_name)
app.command("chat")(chat_command)  # grpo chat JOB "prompt": over the HTTP API too

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
    host: Host = "127.0.0.1",
    port: Port = 8000,
    embedded: Annotated[
        bool,
        typer.Option(
            help=(
                "Run a worker beside the API, with a SQLite database, a file-based broker and the artifacts "
                "all under --data-dir: no PostgreSQL, no Redis."
            )
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Where the embedded setup keeps everything; defaults to GRPO_DATA_DIR (as `grpo keys create` "
                "reads it), else ./var."
            ),
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help=("API processes (uvicorn workers): one per core the API may use. Not with --embedded."),
        ),
    ] = 1,
) -> None:
    """Serve the HTTP API (and, with --embedded, a worker too)."""
    from jobs.settings import get_settings

    _logging()
    refuse_open_unauthenticated(host, get_settings().auth)
    if embedded:
        if workers != 1:
            raise typer.BadParameter(
                "the embedded setup runs one API process (SQLite, one writer)", param_hint="--workers"
            )
        from api.embedded import run_embedded

        raise typer.Exit(run_embedded(data_dir or get_settings().data_dir, host=host, port=port))
    import uvicorn

    from api.main import KEEP_ALIVE_S

    uvicorn.run("api.main:app", host=host, port=port, workers=workers, timeout_keep_alive=KEEP_ALIVE_S)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def refuse_open_unauthenticated(host: str, auth: str) -> None:
    """With authentication disabled, anyone who reaches the port owns every job: loopback only."""
    if auth == "disabled" and not is_loopback(host):
        typer.echo(
            f"refusing to listen on {host} with GRPO_AUTH=disabled: anyone who can reach it could use "
            f"the API. Listen on 127.0.0.1, or leave GRPO_AUTH=required and create keys with "
            f"`grpo keys create NAME`.",
            err=True,
        )
        raise typer.Exit(2)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    inference: Annotated[
        bool,
        typer.Option(
            "--inference",
            help="Answer chat completions from checkpoints (GRPO_INFERENCE_QUEUE) instead of running jobs.",
        ),
    ] = False,
) -> None:
    """Run a GPU worker on the configured queue; extra options go to `celery worker`."""
    # The worker is its own program (``python -m worker``), as in the embedded setup: this
    # process becomes it (same pid, so signals reach it), and the API package never imports it.
    argv = [sys.executable, "-m", "worker", *(["--inference"] if inference else []), *ctx.args]
    os.execv(sys.executable, argv)


@contextmanager
def _key_store() -> Iterator[Session]:
    """A unit of work on GRPO_DATABASE_URL, with a readable failure if that is not migrated."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from jobs.db import transaction
    from jobs.settings import get_settings

    url = get_settings().database_url
    try:
        with transaction(url) as session:
            yield session
    except DBAPIError as exc:
        typer.echo(
            f"could not use the database {make_url(url).render_as_string(hide_password=True)}: "
            f"{exc.orig}; is it migrated (`grpo migrate`)?",
            err=True,
        )
        raise typer.Exit(1) from None


@keys.command("create")
def create_key(
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. ci or alice-laptop.")],
    owner: Annotated[
        str | None,
        typer.Option(
            help=(
                "Whose datasets and jobs the key reaches; defaults to NAME. Give an existing owner to add a "
                "key for them (e.g. to rotate one)."
            )
        ),
    ] = None,
) -> None:
    """Create a key. Its secret goes to stdout, once: only a hash of it is stored."""
    from jobs.errors import InvalidRequest
    from jobs.keys import check_label, issue_key

    try:  # before the database is opened: a bad name is the first thing to hear about
        name = check_label(name, param="name")
        owner = owner if owner is None else check_label(owner, param="owner")
    except InvalidRequest as exc:
        raise typer.BadParameter(
            exc.message, param_hint="NAME" if exc.param == "name" else "--owner"
        ) from None
    with _key_store() as session:
        key, secret = issue_key(session=session, name=name, owner=owner)
    typer.echo(
        f"created {key.id} ({key.name!r}, owner {key.owner!r}); the secret below is shown only "
        f"this once; send it as 'Authorization: Bearer <secret>':",
        err=True,
    )
    typer.echo(secret)


@keys.command("list")
def list_keys() -> None:
    """Every key: id, name, owner, the secret's first characters, when made, when revoked. A
    character of a name or owner that would print as something else (a control, a line separator,
    a bidi override: a key stored before they were refused) is shown as ``\\uXXXX``."""
    from jobs.keys import shown_label
    from jobs.queries import list_api_keys

    with _key_store() as session:
        rows = [
            (
                k.id,
                shown_label(k.name),
                shown_label(k.owner),
                f"{k.prefix}…",
                f"{k.created_at:%Y-%m-%d %H:%M}",
                f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active",
            )
            for k in list_api_keys(session=session)
        ]
    header = ("ID", "NAME", "OWNER", "SECRET", "CREATED", "STATUS")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@keys.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id, from `grpo keys list`.")],
) -> None:
    """Revoke a key: its next request is a 401."""
    from jobs.errors import ApiKeyNotFound
    from jobs.queries import revoke_api_key

    try:
        with _key_store() as session:
            key = revoke_api_key(session=session, key_id=key_id)
    except ApiKeyNotFound as exc:
        typer.echo(exc.message, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key.id} ({key.name!r}, owner {key.owner!r})")


if __name__ == "__main__":
    app()
