"""Cost of one reaper sweep at scale: N live locks, each with a queued message.

Two private redis-servers: the Redis broker, holding N queued messages (copies
of a real ``delay()`` message, each with its own task id and owner token), and
the lock Redis, holding their N locks. Nothing is an orphan, so the sweep reads
everything and frees nothing: its worst case.

Reported per sweep: its wall time (and the part spent reading), the Redis CPU
it cost on each server (``INFO cpu``), the commands it sent (``INFO stats``),
and the longest single command on each server (``SLOWLOG``, threshold 1 ms):
how long the sweep can block Redis at a time.

    python benchmarks/bench_reap.py [--locks 100000] [--messages 100000]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack

import redis
from celery import Celery

from celery_unique import UniqueTask
from celery_unique.beats import Timing
from celery_unique.conf import get_conf
from celery_unique.locks import new_owner
from celery_unique.reaper import Reaper
from celery_unique.testing import RedisServer

QUEUE = "bench-reap"


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def slowest(client: redis.Redis) -> tuple[int, float, str]:
    """(commands over 1 ms since the reset, the longest in ms, its name)."""
    entries = client.slowlog_get(100_000)
    if not entries:
        return 0, 0.0, "-"
    worst = max(entries, key=lambda e: e["duration"])
    command = worst["command"]
    name = (command.decode() if isinstance(command, bytes) else str(command)).split(" ")[0]
    return len(entries), worst["duration"] / 1000.0, name


def fill(app: Celery, broker: redis.Redis, locks: redis.Redis, count: int, messages: int) -> None:
    """``count`` locks, ``messages`` of them with a queued message each (a real message's copies)."""
    task = app.tasks["bench.reap"]
    template = None
    probe = task.apply_async((-1,), queue=QUEUE)
    raw = broker.rpop(QUEUE)
    assert raw is not None
    template = raw.decode()
    probe_owner = json.loads(template)["headers"]["celery_unique"]["owner"]
    lock_pipe = locks.pipeline(transaction=False)
    queue_pipe = broker.pipeline(transaction=False)
    for n in range(count):
        task_id = f"bench-{n:08d}-{probe.id[14:]}"
        owner = new_owner(task_id)
        lock_pipe.set(task.unique_lock_key((n,)), owner, px=3_600_000)
        if n < messages:
            queue_pipe.lpush(QUEUE, template.replace(probe_owner, owner).replace(probe.id, task_id))
        if n % 5000 == 4999:
            lock_pipe.execute()
            queue_pipe.execute()
    lock_pipe.execute()
    queue_pipe.execute()
    locks.delete(task.unique_lock_key((-1,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locks", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=100_000)
    options = parser.parse_args()
    with ExitStack() as stack:
        broker_server = stack.enter_context(RedisServer())
        lock_server = stack.enter_context(RedisServer())
        app = Celery("bench", broker=broker_server.url, set_as_current=False)
        app.conf.update(unique_redis_url=lock_server.url, task_ignore_result=True)

        @app.task(base=UniqueTask, name="bench.reap", shared=False)
        def reap(n: int) -> None:
            pass

        broker = stack.enter_context(redis.Redis.from_url(broker_server.url))
        locks = stack.enter_context(redis.Redis.from_url(lock_server.url))
        started = time.monotonic()
        fill(app, broker, locks, options.locks, options.messages)
        took = time.monotonic() - started
        print(f"filled {options.locks} locks and {broker.llen(QUEUE)} messages in {took:.1f} s")
        reaper = Reaper(app, Timing(60.0))
        for sweep_number in (1, 2):
            for client in (broker, locks):
                client.config_set("slowlog-log-slower-than", 1000)
                client.config_set("slowlog-max-len", 100_000)
                client.slowlog_reset()
            before = {name: (cpu(c), commands(c)) for name, c in (("broker", broker), ("locks", locks))}
            sweep = reaper.sweep()
            print(
                f"sweep {sweep_number}: {sweep.seconds:.2f} s for {sweep.locks} locks and {sweep.messages} "
                f"messages; {sweep.suspects} suspects, {len(sweep.reaped)} freed"
            )
            for name, client in (("broker", broker), ("locks", locks)):
                used, sent = before[name]
                over, worst, command = slowest(client)
                sent = commands(client) - sent - 2  # INFO twice
                print(
                    f"    {name:6} Redis CPU {cpu(client) - used:.2f} s, {sent} commands, "
                    f"{over} over 1 ms, the longest {worst:.1f} ms ({command})"
                )
        reaper.close()
        get_conf(app).close()


if __name__ == "__main__":
    main()
