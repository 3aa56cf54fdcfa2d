"""Fan-in of N parts: a Celery chord (Redis result backend) vs celery-unique's fan_in.

Both run in one process against one private redis-server and one real worker
(prefork, 2 processes), one after the other, alternating within each round.
The fan-in runs twice, with parts as users write them: a plain task (its
result would be stored) and one with ``ignore_result=True``; the chord's
parts are plain tasks. Measured: wall time from dispatch until the callback
has run, and Redis commands per part from ``INFO commandstats`` (every
command the server ran, broker traffic and commands inside Lua scripts
included). The floor beside them: plain tasks (results ignored) that each
count themselves in one round trip, the last one marking the run done,
published in batches as fan_in's parts are; no chord, no fan-in.

Then, without a worker, a fan-in of each ``--big`` size: its creation and the
report that completes it, each timed, with the longest single command the
server ran meanwhile (``SLOWLOG``, every command logged).

    python benchmarks/bench_fan_in.py [--parts 100,1000,10000] [--rounds 2] [--big 10000,100000]
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

KINDS = ("chord", "fan_in stored", "fan_in ignored", "floor")


def commands(client: redis.Redis) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def run_once(kind: str, parts: int, client: redis.Redis) -> tuple[float, float]:
    from benchmarks.fan_in_app import callback, part_chord, part_counted, part_ignored, part_stored
    from celery_unique import fan_in
    from celery_unique.aggregate import _batch

    run = uuid.uuid4().hex
    client.config_resetstat()
    before = commands(client)
    started = time.monotonic()
    if kind == "chord":
        chord([part_chord.s(n) for n in range(parts)])(callback.s(run)).forget()
    elif kind == "floor":
        # Published as fan_in() publishes its parts: in kombu's batches where it has them.
        with part_counted.app.producer_or_acquire() as producer, _batch(producer):
            for _ in range(parts):
                part_counted.apply_async((run, parts), producer=producer)
    else:
        part = part_stored if kind == "fan_in stored" else part_ignored
        fan_in([part.s(n) for n in range(parts)], callback.s(run), timeout=3600)
    while not client.exists(f"bench:done:{run}"):
        time.sleep(0.005)
    wall = time.monotonic() - started
    time.sleep(0.5)  # let the worker finish acknowledging before counting
    used = commands(client) - before - 1
    return wall, used / parts


class Slowest:
    """The longest command the server runs within a ``with`` block (every command logged)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.longest_us, self.wall = 0, 0.0

    def __enter__(self) -> Slowest:
        self.client.config_set("slowlog-log-slower-than", 0)
        self.client.config_set("slowlog-max-len", 100_000)
        self.client.slowlog_reset()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.started
        entries = self.client.slowlog_get(100_000)
        self.longest_us = max((int(e["duration"]) for e in entries), default=0)
        self.client.config_set("slowlog-log-slower-than", 10_000)


def big_fan_in(parts: int, client: redis.Redis) -> dict[str, tuple[float, int]]:
    """(wall s, longest command µs) of creating a fan-in of ``parts`` and of its completing report."""
    from benchmarks.fan_in_app import app, callback
    from celery_unique.aggregate import _json, _part_binding, aggregator
    from celery_unique.sealing import PART

    aggregate = aggregator(app)
    token = uuid.uuid4().hex
    names = [str(n) for n in range(parts)]
    with Slowest(client) as created:
        aggregate.create(token, names, callback.s("big"), timeout=3600)
    # Every part but the last reports, in pipelines (not measured: a worker's reports come one by one).
    key, sealer = aggregate.key(token), aggregate.conf.sealer
    for first in range(0, parts - 1, 1000):
        pipe = client.pipeline(transaction=False)
        for name in names[first : min(first + 1000, parts - 1)]:
            payload = sealer.seal(PART, _part_binding(token, name), _json({"ok": True, "value": int(name)}))
            aggregate._report(keys=[key], args=[name, payload, "1", "fail", "bench", 60_000], client=pipe)
        pipe.execute()
    with Slowest(client) as completed:
        aggregate.report(token, names[-1], value=parts - 1, policy="fail")
    assert not client.exists(key), "the completing report left its context behind"
    return {
        "create": (created.wall, created.longest_us),
        "completing report": (completed.wall, completed.longest_us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="100,1000,10000", help="comma-separated Ns")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--big", default="10000,100000", help="parts of the worker-less fan-ins ('': none)")
    options = parser.parse_args()
    sizes = [int(n) for n in options.parts.split(",") if n]

    from celery_unique.testing import RedisServer

    results: dict[int, dict[str, list[tuple[float, float]]]] = {n: {k: [] for k in KINDS} for n in sizes}
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
        client = redis.Redis.from_url(server.url)
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(destination=["bench@localhost"], timeout=0.5):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("the worker did not start")
            for kind in KINDS:
                run_once(kind, 50, client)  # warm up every path
            for n in sizes:
                for _ in range(options.rounds):
                    for kind in KINDS:
                        results[n][kind].append(run_once(kind, n, client))
        finally:
            worker.terminate()
            worker.wait(30)
        big = {int(n): big_fan_in(int(n), client) for n in options.big.split(",") if n}
        client.close()
        app.close()

    print(f"2 worker processes, median of {options.rounds} rounds; ratios to the chord")
    print(f"{'N':>7}  {'':16}{'wall s':>8}{'ms/part':>9}{'cmds/part':>11}{'wall x':>8}{'cmds x':>8}")
    for n in sizes:
        medians = {
            kind: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
            for kind, runs in results[n].items()
        }
        chord_wall, chord_cmds = medians["chord"]
        for kind, (wall, cmds) in medians.items():
            print(
                f"{n:>7}  {kind:16}{wall:>8.2f}{wall / n * 1000:>9.2f}{cmds:>11.1f}"
                f"{wall / chord_wall:>8.2f}{cmds / chord_cmds:>8.2f}"
            )
    for n, steps in big.items():
        for step, (wall, longest) in steps.items():
            print(f"N = {n:,}: {step} {wall * 1000:,.0f} ms, longest command {longest / 1000:.1f} ms")


if __name__ == "__main__":
    main()
