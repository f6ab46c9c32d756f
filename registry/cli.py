"""``qfilters serve``, ``token ...``, ``db ...`` and ``worker``: commands added to the qfilters CLI as a plugin."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
token_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API tokens of the registry.")
db_app = typer.Typer(no_args_is_help=True, help="Registry database schema (Alembic migrations).")


def register(app: typer.Typer) -> None:
    """Entry point of the ``qfilters.commands`` group."""
    app.command(help="Run the registry service (embedded default: SQLite + local artifact store, no services).")(serve)
    app.add_typer(token_app, name="token")
    app.add_typer(db_app, name="db")
    from workers.cli import worker  # typer only: celery and torch load in the worker processes it starts

    app.command(help="Run Celery workers for registry jobs (QFILTERS_EXECUTOR=celery).")(worker)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    run_jobs: Annotated[bool, typer.Option(
        help="Run queued jobs in this process one at a time (executor inline), or sweep for the worker pool (celery)."
    )] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    import uvicorn

    from registry.config import get_settings
    from registry.main import create_app

    settings = get_settings()
    err.print(f"database: [bold]{_redact(settings.database_url)}[/]  artifacts: [bold]{settings.artifact_dir}[/]")
    err.print("create a token to submit jobs: [bold]qfilters token create NAME --scope submit[/]")
    app = create_app(settings, run_jobs=run_jobs, migrate=True)
    from registry.api.wire import ProblemH11Protocol

    uvicorn.run(app, host=host, port=port, log_level=log_level, http=ProblemH11Protocol)  # problem+json even for
    # requests uvicorn refuses before the app (malformed framing)


def _redact(url: str) -> str:
    """Database URLs may carry a password; it never reaches the terminal or the logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part
        return url.split("@")[-1]


def _factory():
    from registry.config import get_settings
    from registry.db import make_engine, make_session_factory
    from registry.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name people recognise, e.g. ci or alice.")],
    scope: Annotated[list[str], typer.Option("--scope", "-s",
                                             help="read, submit, publish or admin; repeat.")] = ["read"],  # noqa: B006
) -> None:
    """Create a token and print it once: it is stored only as a hash."""
    from registry.db import session_scope
    from registry.errors import RegistryError
    from registry.services import tokens

    try:
        with session_scope(_factory()) as session:
            _row, clear = tokens.create_token(session, name, scope)
    except (ValueError, RegistryError) as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    err.print(f"token [bold]{name}[/] with scopes {', '.join(sorted(set(scope)))}; it is shown only now:")
    print(clear)


@token_app.command("list")
def token_list() -> None:
    from registry.services import tokens

    with _factory()() as session:
        table = Table("name", "prefix", "scopes", "created", "last used", "revoked")
        for t in tokens.list_tokens(session):
            table.add_row(t.name, t.prefix + "…", ", ".join(t.scopes), str(t.created_at)[:19],
                          str(t.last_used_at or "")[:19], str(t.revoked_at or "")[:19])
        Console().print(table)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument()]) -> None:
    from registry.db import session_scope
    from registry.errors import RegistryError
    from registry.services import tokens

    try:
        with session_scope(_factory()) as session:
            tokens.revoke_token(session, name)
    except RegistryError as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    err.print(f"token {name} revoked")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    from registry.config import get_settings
    from registry.migrate import upgrade

    upgrade(get_settings().database_url, revision)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[Optional[str], typer.Argument()] = "base") -> None:
    from registry.config import get_settings
    from registry.migrate import downgrade

    downgrade(get_settings().database_url, revision or "base")


@db_app.command("current")
def db_current() -> None:
    from registry.config import get_settings
    from registry.migrate import current

    print(current(get_settings().database_url) or "(empty database)")
