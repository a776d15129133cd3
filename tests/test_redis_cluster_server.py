"""The throw-away local Redis Cluster of ``zae_celery.testing.servers.redis_cluster``.

The session's cluster (the ``redis_cluster`` fixture) is shared with other tests, so every
key here starts with a prefix of its own test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, MovedError

from zae_celery.testing import servers
from zae_celery.testing.servers import CLUSTER_SLOTS, LocalCluster, LocalServer

# Writes both keys and reads them back: a script that touches two keys in one call.
SET_BOTH = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""


@pytest.fixture
def client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A cluster client that knows the nodes only from the cluster's startup nodes."""
    nodes = [
        ClusterNode(host, port)  # type: ignore[no-untyped-call]
        for host, port in redis_cluster.startup_nodes
    ]
    cluster = RedisCluster(startup_nodes=nodes, decode_responses=True)
    yield cluster
    cluster.close()


@pytest.fixture
def prefix() -> str:
    """Keys of this test only."""
    return f"zae-test-{uuid.uuid4().hex[:12]}"


def slot(key: str) -> int:
    """The hash slot of ``key`` (of its hash tag, if it has one)."""
    return key_slot(key.encode())


def node_of(client: RedisCluster, key: str) -> int:
    """The port of the node that owns ``key``'s slot, as the cluster told the client."""
    return int(client.nodes_manager.get_node_from_slot(slot(key)).port)


def keys_per_node(client: RedisCluster, prefix: str, nodes: int) -> dict[int, str]:
    """One key for each node, each with its own hash tag: port of the owner -> key."""
    found: dict[int, str] = {}
    for index in range(1000):
        key = f"{{{prefix}-{index}}}:value"
        found.setdefault(node_of(client, key), key)
        if len(found) == nodes:
            return found
    raise AssertionError(f"1000 hash tags all fell on the nodes {sorted(found)}")


def direct(node: LocalServer) -> redis.Redis:
    """A plain (non-cluster) client of one node."""
    return redis.Redis(host=node.host, port=node.port, decode_responses=True)


def test_every_node_serves_an_even_share_of_the_slots(redis_cluster: LocalCluster) -> None:
    assert len(redis_cluster.nodes) == 3
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.nodes[0].port}"
    assert redis_cluster.startup_nodes == [("127.0.0.1", n.port) for n in redis_cluster.nodes]
    ports = {node.port for node in redis_cluster.nodes}
    for node in redis_cluster.nodes:
        with direct(node) as one:
            info = one.cluster("INFO")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_known_nodes"]) == 3
            assert int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
            # Every node sees the same map: node i owns the i-th third of the slots.
            ranges = sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in one.cluster("SLOTS"))
        assert {port for _, _, port in ranges} == ports
        for index, (first, last, port) in enumerate(ranges):
            assert (first, last) == (
                index * CLUSTER_SLOTS // 3,
                (index + 1) * CLUSTER_SLOTS // 3 - 1,
            )
            assert port == redis_cluster.nodes[index].port


def test_keys_of_different_hash_tags_live_on_different_nodes(
    redis_cluster: LocalCluster, client: RedisCluster, prefix: str
) -> None:
    keys = keys_per_node(client, prefix, nodes=3)
    for port, key in keys.items():
        assert client.set(key, f"on {port}")
    for port, key in keys.items():
        assert client.get(key) == f"on {port}"
    # Each key is stored on the node that owns its slot, and on no other.
    for node in redis_cluster.nodes:
        with direct(node) as one:
            assert one.get(keys[node.port]) == f"on {node.port}"
            for port, key in keys.items():
                if port != node.port:
                    with pytest.raises(MovedError) as moved:
                        one.get(key)
                    assert (moved.value.slot_id, moved.value.port) == (slot(key), port)
    client.delete(*keys.values())


def test_a_script_may_touch_two_keys_of_one_hash_tag(client: RedisCluster, prefix: str) -> None:
    first, second = f"{{{prefix}:t}}:a", f"{{{prefix}:t}}:b"
    assert slot(first) == slot(second)
    result: Any = client.eval(SET_BOTH, 2, first, second, "1", "2")
    assert result == ["1", "2"]
    assert client.mget(first, second) == ["1", "2"]
    client.delete(first, second)


def test_a_script_touching_keys_of_two_slots_fails_with_crossslot(
    redis_cluster: LocalCluster, client: RedisCluster, prefix: str
) -> None:
    keys = keys_per_node(client, prefix, nodes=3)
    (owner, first), (_, second) = list(keys.items())[:2]
    assert slot(first) != slot(second)
    # Sent to the node that owns the first key: the server itself refuses the script
    # (a cluster client would refuse it before sending it).
    node = next(n for n in redis_cluster.nodes if n.port == owner)
    with direct(node) as one, pytest.raises(ClusterCrossSlotError) as refused:
        one.eval(SET_BOTH, 2, first, second, "1", "2")
    # redis-py maps the server's "CROSSSLOT ..." error to this class and drops the code.
    assert "same slot" in str(refused.value)
    assert client.exists(first, second) == 0  # nothing was written


def gone(pid: int) -> bool:
    """Is there no process with this PID any more?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_leaving_the_context_stops_every_node_and_deletes_its_folder(tmp_path: Path) -> None:
    with servers.redis_cluster(log_dir=tmp_path, nodes=3) as cluster:
        pids = [node.pid for node in cluster.nodes]
        folders = [Path(node.extra["dir"]) for node in cluster.nodes]
        assert all(not gone(pid) for pid in pids)
        assert all((folder / "nodes.conf").exists() for folder in folders)
    assert all(node.process.poll() is not None for node in cluster.nodes)
    assert all(gone(pid) for pid in pids)
    assert not any(folder.exists() for folder in folders)


def test_a_failed_start_stops_the_nodes_already_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[LocalServer] = []
    start = servers._start

    def recording_start(*args: Any, **kwargs: Any) -> LocalServer:
        server = start(*args, **kwargs)
        started.append(server)
        return server

    def failing_form(cluster: LocalCluster) -> None:
        raise servers.ServerUnavailable("the cluster did not form")

    monkeypatch.setattr(servers, "_start", recording_start)
    monkeypatch.setattr(servers, "_form_cluster", failing_form)
    with (
        pytest.raises(servers.ServerUnavailable, match="did not form"),
        servers.redis_cluster(log_dir=tmp_path, nodes=2),
    ):
        pytest.fail("the context must not be entered")
    assert len(started) == 2
    assert all(gone(server.pid) for server in started)
    assert not any(Path(server.extra["dir"]).exists() for server in started)
