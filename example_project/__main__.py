"""``python -m example_project demo``: run the demo (see example_project/demo.py)."""

from __future__ import annotations

import argparse

from example_project import demo

parser = argparse.ArgumentParser(prog="python -m example_project")
commands = parser.add_subparsers(dest="command", required=True)
run = commands.add_parser("demo", help="concurrent payments, on-commit unique recomputes, a real worker")
run.add_argument("--loans", type=int, default=5)
run.add_argument("--payments", type=int, default=25, help="payments per thread")
run.add_argument("--threads", type=int, default=8)
run.add_argument(
    "--without-worker",
    action="store_true",
    help="start no worker: the recomputes stay queued, holding their locks, for `celery unique locks` "
    "(needs REDIS_URL)",
)
run.add_argument(
    "--admin",
    nargs="?",
    type=int,
    const=8000,
    metavar="PORT",
    help="then serve the Django admin on 127.0.0.1:PORT (8000), with a superuser made for the demo",
)
options = parser.parse_args()
raise SystemExit(
    demo.main(options.loans, options.payments, options.threads, options.without_worker, options.admin)
)
