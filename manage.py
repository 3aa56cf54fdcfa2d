#!/usr/bin/env python
"""The example project's ``manage.py``, run from the repository root (where
``example_project`` is importable): ``python manage.py check``,
``python manage.py unique_locks``. Redis from ``REDIS_URL``, as for the demo."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
