"""Before/after for a change of ``delay()``: this checkout against another revision.

Each round runs the two in fresh processes, one after the other, on one
private redis-server; each process times a plain task's ``delay()``, then a
duplicate's and a fresh call's of a UniqueTask, by the wall clock and by its
own CPU time. Ratios to the plain task of the same process, medians of the
rounds, so that a noisy shared machine moves both sides alike::

    python benchmarks/ab_delay.py --base dbe6f27 [--rounds 8] [--calls 2000]

The other revision is checked out (``git worktree``) in a temporary folder
and imported from there, with this checkout's installed dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(url: str, calls: int) -> None:
    """One side's figures, printed as JSON (run in a process of its own)."""
    from celery import Celery

    import celery_unique
    from celery_unique import UniqueTask

    app = Celery("ab", broker=url, set_as_current=False)

    @app.task(name="ab.unique", base=UniqueTask)
    def unique(x: str) -> str:
        return x

    @app.task(name="ab.plain")
    def plain(x: str) -> str:
        return x

    tag = uuid.uuid4().hex
    for _ in range(300):  # warm up: connections, the hint that the key is held
        unique.delay(tag)
        plain.delay(tag)

    def timed(call: object, argument: object) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for n in range(calls):
            call(argument(n))  # type: ignore[operator]
        return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6

    figures = {
        "module": celery_unique.__file__,
        "plain": timed(plain.delay, str),
        "duplicate": timed(unique.delay, lambda n: tag),
        "fresh": timed(unique.delay, lambda n: f"{tag}{n}"),
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, a tag)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child's side: a Redis URL
    options = parser.parse_args()
    if options.measure:
        measure(options.measure, options.calls)
        return
    from celery_unique.testing import RedisServer

    with tempfile.TemporaryDirectory() as folder, RedisServer() as server:
        base = Path(folder) / "base"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "-q", "--detach", str(base), options.base], check=True)
        try:
            sides = {"base": base, "this": ROOT}
            rows: dict[str, list[dict[str, list[float]]]] = {name: [] for name in sides}
            for _ in range(options.rounds):
                for name, tree in sides.items():
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    out = subprocess.run(
                        [sys.executable, __file__, "--base", options.base, "--calls", str(options.calls),
                         "--measure", server.url],
                        env=env, capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    figures = json.loads(out.stdout.strip().splitlines()[-1])
                    assert figures["module"].startswith(str(tree)), figures["module"]
                    rows[name].append(figures)
        finally:
            subprocess.run([*git, "remove", "--force", str(base)], check=False)
    print(f"{options.rounds} rounds x {options.calls} calls; ratios to a plain delay() in the same process")
    print(f"{'side':6} {'case':10} {'wall ratio':>10} {'CPU ratio':>10} {'CPU us':>8}")
    for name, figures in rows.items():
        for case in ("duplicate", "fresh"):
            wall = statistics.median(f[case][0] / f["plain"][0] for f in figures)
            cpu = statistics.median(f[case][1] / f["plain"][1] for f in figures)
            us = statistics.median(f[case][1] for f in figures)
            print(f"{name:6} {case:10} {wall:10.3f} {cpu:10.3f} {us:8.1f}")


if __name__ == "__main__":
    main()
