"""The data-parallel router's choice, on replicas without processes: prefix first, least-loaded for a
new prefix, the load guard, dead replicas skipped."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from tokenmill.engine.core_proc import EngineDeadError
from tokenmill.server.router import LOAD_SLACK_TOKENS, ReplicaRouter, _Replica


def _router(num_replicas: int = 2, block_size: int = 4) -> ReplicaRouter:
    router = ReplicaRouter.__new__(ReplicaRouter)  # no engine processes: only the choice is under test
    router.replicas = [_Replica(client=None) for _ in range(num_replicas)]
    router._block_size, router._prefix_owner = block_size, OrderedDict()
    router.policy, router._turn = "prefix", 0
    return router


def test_a_shared_first_block_sticks_to_its_replica_while_the_load_allows():
    router = _router()
    router.replicas[1].load = 100  # replica 0 is less loaded
    assert router.choose([1, 2, 3, 4, 9]) == 0  # a new prefix: the least-loaded replica
    router.replicas[0].load = 500
    assert router.choose([1, 2, 3, 4, 7, 7]) == 0  # same first block: same replica, though 1 is lighter now
    assert router.choose([5, 6, 7, 8]) == 1  # another prefix: the lighter one
    router.replicas[0].load = 2 * 100 + LOAD_SLACK_TOKENS + 1  # past the guard
    assert router.choose([1, 2, 3, 4]) == 1  # the prefix moves to the lighter replica
    router.replicas[0].load = 0
    assert router.choose([1, 2, 3, 4, 0]) == 1  # and stays there


def test_dead_replicas_are_skipped_and_none_left_is_an_error():
    router = _router(3)
    assert router.choose([1, 2, 3, 4]) == 0
    router.replicas[0].alive = False
    assert router.choose([1, 2, 3, 4]) == 1
    router.replicas[1].alive = router.replicas[2].alive = False
    with pytest.raises(EngineDeadError, match="every data-parallel replica has failed"):
        router.choose([1, 2, 3, 4])


def test_round_robin_takes_the_live_replicas_in_turn():
    router = _router(3)
    router.policy = "round_robin"
    assert [router.choose([1, 2, 3, 4]) for _ in range(4)] == [1, 2, 0, 1]
