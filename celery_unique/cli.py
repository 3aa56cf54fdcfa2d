"""``celery -A proj unique ...``: look at and release locks from the shell.

Registered through the ``celery.commands`` entry point. SCAN only, never
KEYS, so it is safe on a busy production Redis.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import click

from celery_unique.inspect import force_release, iter_locks


def _app(ctx: click.Context) -> Any:
    return ctx.obj.app


@click.group(name="unique")
def unique() -> None:
    """celery-unique: locks, stored outcomes, fan-ins."""


@unique.command()
@click.option("--task", "task_name", help="only the locks of this task name")
@click.pass_context
def locks(ctx: click.Context, task_name: str | None) -> None:
    """List held locks and stored outcomes: key, kind, holder, TTL."""
    count = 0
    for lock in iter_locks(_app(ctx), task_name):
        count += 1
        click.echo(lock.line())
    click.echo(f"{count} lock(s) and outcome(s)")


@unique.command()
@click.argument("key", required=False)
@click.option("--task", "task_name", help="release every lock of this task")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def release(ctx: click.Context, key: str | None, task_name: str | None, yes: bool) -> None:
    """Release KEY, or every lock of --task NAME, whoever holds them."""
    app = _app(ctx)
    if bool(key) == bool(task_name):
        raise click.UsageError("give a KEY or --task NAME (one of them)")
    keys = [key] if key else [lock.key for lock in iter_locks(app, task_name) if lock.kind != "result"]
    if not keys:
        click.echo("no such lock")
        return
    if not yes:
        click.confirm(f"release {len(keys)} lock(s)?", abort=True)
    released = 0
    for found in keys:
        try:
            released += force_release(app, found)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    click.echo(f"released {released} lock(s)")


@unique.command()
@click.pass_context
def stats(ctx: click.Context) -> None:
    """Counts per task: held locks, running locks, stored outcomes, open fan-ins."""
    from celery_unique.aggregate import aggregator

    app = _app(ctx)
    counts: Counter[tuple[str, str]] = Counter()
    for lock in iter_locks(app):
        counts[(lock.task_name, lock.kind)] += 1
    tasks = sorted({name for name, _ in counts})
    click.echo(f"{'task':<40}{'queued':>8}{'running':>9}{'outcomes':>10}")
    for name in tasks:
        click.echo(
            f"{name:<40}{counts[(name, 'lock')]:>8}{counts[(name, 'run')]:>9}{counts[(name, 'result')]:>10}"
        )
    click.echo(f"open fan-ins: {aggregator(app).count_open()}")
