"""``celery -A proj unique ...``: look at and release locks from the shell.

Registered through the ``celery.commands`` entry point. SCAN only, never
KEYS, so it is safe on a busy production Redis.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import click

from celery_unique.clients import UNREACHABLE
from celery_unique.exceptions import UniqueError
from celery_unique.inspect import KINDS, force_release, iter_locks, open_fan_ins
from celery_unique.reaper import Reaper


def _app(ctx: click.Context) -> Any:
    """The app, with the task modules a worker would import (``imports``,
    ``include`` and ``autodiscover_tasks()``, as Django projects register
    theirs): the listing names their lifetimes and ages."""
    app = ctx.obj.app
    if not getattr(app, "_celery_unique_modules_imported", False):
        app.loader.import_default_modules()
        app._celery_unique_modules_imported = True
    return app


class _Commands(click.Group):
    """A Redis that fails (down, mid-failover) is reported in one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UniqueError as exc:  # a lock Redis it cannot reach, no Redis configured
            raise click.ClickException(str(exc)) from exc
        except UNREACHABLE as exc:
            raise click.ClickException(f"Redis: {exc}") from exc


@click.group(name="unique", cls=_Commands)
def unique() -> None:
    """celery-unique: locks, stored outcomes, fan-ins."""


@unique.command()
@click.option("--task", "task_name", help="only the locks of this task name")
@click.pass_context
def locks(ctx: click.Context, task_name: str | None) -> None:
    """List held locks and stored outcomes, one per line.

    \b
    KIND      lock: taken at delay() (until_executed holds it through the run);
              run: taken as the run started; result: an idempotent task's outcome
    HOLDER    the task id that holds it (result: the task that stored it)
    TTL       the time it has left
    AGE       the time since the holder's run started, by the Redis server's
              clock: known for a run lock of a task registered in this app with
              lifetime while_executing or until_and_while_executing, else "-"
              (nothing records when a lock was queued or an outcome stored)
    LIFETIME  the task's lock lifetime in this app; "?" when not registered here
    """
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
    """Counts per task name.

    \b
    lock      locks taken at delay() (queued; with until_executed, also running)
    run       running locks
    result    stored outcomes
    fan-ins   open fan-ins whose callback is this task
    """
    app = _app(ctx)
    counts: Counter[tuple[str, str]] = Counter()
    for lock in iter_locks(app):
        counts[(lock.task_name, lock.kind)] += 1
    fan_ins = open_fan_ins(app)
    tasks = sorted({name for name, _ in counts} | set(fan_ins))
    width = max([len("task"), *map(len, tasks)]) + 2
    click.echo(f"{'task':<{width}}{'lock':>8}{'run':>8}{'result':>8}{'fan-ins':>9}")
    for name in tasks:
        held = "".join(f"{counts[(name, kind)]:>8}" for kind in KINDS)
        click.echo(f"{name:<{width}}{held}{fan_ins[name]:>9}")


@unique.command()
@click.option("--dry-run", is_flag=True, help="list what would be freed, free nothing")
@click.pass_context
def reap(ctx: click.Context, dry_run: bool) -> None:
    """Free the locks whose message no longer exists anywhere.

    Two sweeps, unique_reap_interval / 6 seconds apart (at least 0.5 s): a lock
    is freed when neither finds its message in the broker (a Redis broker's
    queues and unacked messages) or in a live worker, and the second still
    finds the same holder. With another broker than Redis, only the locks of
    tasks that were running, acknowledged, on a worker that stopped beating.
    Workers that run the reaper themselves need no such command.
    """
    reaper = Reaper(_app(ctx), dry_run=dry_run)
    try:
        reaper.sweep()
        time.sleep(reaper.timing.sweep_every)
        sweep = reaper.sweep()
    finally:
        reaper.close()
    for orphan in sweep.reaped:
        click.echo(orphan.line())
    if not sweep.judged:
        click.echo("a live worker did not report what it holds in time: nothing was freed; try again")
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"{verb} {len(sweep.reaped)} of {sweep.locks} lock(s) "
        f"({sweep.messages} broker message(s) and {sweep.workers} live worker(s) read)"
    )
