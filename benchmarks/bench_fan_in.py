"""Fan-in of N parts: a Celery chord (Redis result backend) vs celery-unique's fan_in.

Both run in one process against one private redis-server and one real worker
(prefork, 2 processes), one after the other, alternating. Measured: wall time
from dispatch until the callback has run, and Redis commands per header task
from ``INFO commandstats`` (every command the server ran, broker traffic and
commands inside Lua scripts included).

    python benchmarks/bench_fan_in.py [--parts 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import chord

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: make `benchmarks` importable


def commands(client: redis.Redis) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def run_once(kind: str, parts: int, client: redis.Redis) -> tuple[float, float]:
    from benchmarks.fan_in_app import callback, part_chord, part_fan_in
    from celery_unique import fan_in

    run = uuid.uuid4().hex
    client.config_resetstat()
    before = commands(client)
    started = time.monotonic()
    if kind == "chord":
        chord([part_chord.s(n) for n in range(parts)])(callback.s(run)).forget()
    else:
        fan_in([part_fan_in.s(n) for n in range(parts)], callback.s(run), timeout=600)
    while not client.exists(f"bench:done:{run}"):
        time.sleep(0.005)
    wall = time.monotonic() - started
    time.sleep(0.5)  # let the worker finish acknowledging before counting
    used = commands(client) - before - 1
    return wall, used / parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()

    from celery_unique.testing import RedisServer

    with RedisServer() as server:
        os.environ["REDIS_URL"] = server.url
        from benchmarks.fan_in_app import app

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "--quiet", "-A", "benchmarks.fan_in_app", "worker",
             "--pool", "prefork", "--concurrency", "2", "--hostname", "bench@localhost",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "ERROR"],
            cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(destination=["bench@localhost"], timeout=0.5):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("the worker did not start")
            client = redis.Redis.from_url(server.url)
            results: dict[str, list[tuple[float, float]]] = {"chord": [], "fan_in": []}
            run_once("chord", 50, client)  # warm up both paths
            run_once("fan_in", 50, client)
            for _ in range(options.rounds):
                for kind in results:
                    results[kind].append(run_once(kind, options.parts, client))
            client.close()
            app.close()
        finally:
            worker.terminate()
            worker.wait(30)

    summary: dict[str, Any] = {
        kind: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        for kind, runs in results.items()
    }
    (chord_wall, chord_cmds), (fan_wall, fan_cmds) = summary["chord"], summary["fan_in"]
    print(f"N = {options.parts} parts, 2 worker processes, median of {options.rounds} rounds")
    print(f"{'':10}{'wall s':>9}{'ms/part':>9}{'cmds/part':>11}")
    for kind, (wall, cmds) in summary.items():
        print(f"{kind:10}{wall:>9.2f}{wall / options.parts * 1000:>9.2f}{cmds:>11.1f}")
    print(
        f"fan_in / chord: wall {fan_wall / chord_wall:.2f}x, commands per part {fan_cmds / chord_cmds:.2f}x"
    )


if __name__ == "__main__":
    main()
