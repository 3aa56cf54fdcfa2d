"""``manage.py unique_locks``: list the held locks, or release one."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from celery_unique.contrib.django.checks import celery_app
from celery_unique.inspect import force_release, iter_locks


class Command(BaseCommand):  # type: ignore[misc]
    help = "List celery-unique locks and stored outcomes (SCAN, never KEYS), or release one by key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--task", help="only the locks of this task name")
        parser.add_argument("--release", metavar="KEY", help="delete this lock, whoever holds it")

    def handle(self, *args: Any, **options: Any) -> None:
        app = celery_app()
        if options["release"]:
            try:
                released = force_release(app, options["release"])
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write("released" if released else "no such lock")
            return
        count = 0
        for lock in iter_locks(app, options["task"]):
            count += 1
            self.stdout.write(lock.line())
        self.stdout.write(f"{count} lock(s) and outcome(s)")
