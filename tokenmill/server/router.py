"""ReplicaRouter: data-parallel engine cores (replicas) behind the one front end of a server.

``tokenmill serve --data-parallel-size N`` starts N engine-core processes, each a whole engine with
its own KV cache, and this router in front of them, which the front end uses as its core client.

Each request goes to one replica, chosen prefix-first with a load guard:
- requests whose prompts start with the same first KV block of tokens (a shared system prompt,
  a few-shot preamble) go where the first such request went, so that its prefix is cached there;
- unless that replica's outstanding tokens (prompt + output budget of the requests in flight)
  exceed twice the least-loaded replica's plus ``LOAD_SLACK_TOKENS``: then the least-loaded one
  takes it (and the prefix moves with it);
- a prefix seen for the first time goes to the least-loaded replica.

``policy="round_robin"`` ignores prefixes and load and takes the replicas in turn (the baseline
the prefix policy is measured against).

A replica that dies is taken out: its requests fail at once (``("replica_dead", ids, why)``), the
others keep serving, and the server is unhealthy only when none is left.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineLimits, EngineStats
from tokenmill.engine.core_proc import CoreClient, EngineDeadError
from tokenmill.logger import get_logger
from tokenmill.offload.block_store import merge_tier_stats
from tokenmill.sampling_params import SamplingParams

logger = get_logger(__name__)

LOAD_SLACK_TOKENS = 4096
"""Imbalance (in outstanding tokens) the prefix rule may cause before the load guard overrides it."""
MAX_PREFIXES = 65536
"""Prefixes remembered (least recently used forgotten first)."""


@dataclass
class _Replica:
    client: CoreClient
    alive: bool = True
    load: int = 0
    """Outstanding tokens: prompt + output budget of its requests in flight."""
    stats: EngineStats | None = None
    num_routed: int = 0


class ReplicaRouter:
    """The core-client interface (limits, add/abort/stop, recv, reap, shutdown) over N replicas."""

    POLICIES = ("prefix", "round_robin")

    def __init__(self, config: EngineConfig, tokenizer_eos: tuple[int, ...], num_replicas: int,
                 num_threads: int | None = None, policy: str = "prefix"):
        if num_replicas < 2:
            raise ValueError(f"a router needs at least 2 replicas, got {num_replicas}")
        if policy not in self.POLICIES:
            raise ValueError(f"router policy {policy!r} is not supported; choose one of {', '.join(self.POLICIES)}")
        self.policy, self._turn = policy, 0
        self.replicas: list[_Replica] = []
        try:
            for _ in range(num_replicas):
                self.replicas.append(_Replica(CoreClient(config, tokenizer_eos, num_threads=num_threads)))
        except BaseException:
            for replica in self.replicas:
                replica.client.shutdown()
            raise
        self.limits: EngineLimits = self.replicas[0].client.limits
        self._block_size = config.cache.block_size
        self._lock = threading.Lock()
        self._owner: dict[str, tuple[int, int]] = {}  # core request id -> (replica, tokens it counts for)
        self._prefix_owner: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._messages: queue.Queue = queue.Queue()
        for index, replica in enumerate(self.replicas):
            threading.Thread(target=self._pump, args=(index, replica.client), daemon=True,
                             name=f"tokenmill-replica{index}-reader").start()

    def _pump(self, index: int, client: CoreClient) -> None:
        while True:
            message = client.recv()
            self._messages.put((index, message))
            if message[0] == "dead":
                return

    def choose(self, prompt_token_ids: list[int]) -> int:
        """The replica for a new request (see the module docstring); EngineDeadError when none is alive."""
        alive = [i for i, r in enumerate(self.replicas) if r.alive]
        if not alive:
            raise EngineDeadError("every data-parallel replica has failed")
        if self.policy == "round_robin":
            self._turn += 1
            return alive[self._turn % len(alive)]
        least = min(alive, key=lambda i: self.replicas[i].load)
        key = tuple(prompt_token_ids[:self._block_size])
        chosen = self._prefix_owner.get(key)
        if chosen is None or not self.replicas[chosen].alive or (
                self.replicas[chosen].load > 2 * self.replicas[least].load + LOAD_SLACK_TOKENS):
            chosen = least
        self._prefix_owner[key] = chosen
        self._prefix_owner.move_to_end(key)
        if len(self._prefix_owner) > MAX_PREFIXES:
            self._prefix_owner.popitem(last=False)
        return chosen

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            index = self.choose(prompt_token_ids)
            budget = params.max_tokens or self.limits.max_model_len - len(prompt_token_ids)
            tokens = (len(prompt_token_ids) + budget) * params.beam_width
            replica = self.replicas[index]
            replica.client.add_request(request_id, prompt_token_ids, params)
            self._owner[request_id] = (index, tokens)
            replica.load += tokens
            replica.num_routed += 1

    def _by_replica(self, request_ids) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        with self._lock:
            for request_id in request_ids:
                owner = self._owner.get(request_id)
                if owner is not None and self.replicas[owner[0]].alive:
                    groups.setdefault(owner[0], []).append(request_id)
        return groups

    def abort_requests(self, request_ids) -> None:
        for index, ids in self._by_replica(request_ids).items():
            self.replicas[index].client.abort_requests(ids)

    def stop_requests(self, request_ids) -> None:
        for index, ids in self._by_replica(request_ids).items():
            self.replicas[index].client.stop_requests(ids)

    def recv(self) -> tuple:
        """The next message for the front end: ("outputs", outputs, summed stats), ("replica_dead",
        its request ids, why) when one replica fails, ("dead", why) once none is left."""
        index, message = self._messages.get()
        replica = self.replicas[index]
        if message[0] == "outputs":
            _, outputs, stats = message
            with self._lock:
                replica.stats = stats
                for output in outputs:
                    if output.finish_reason is not None and output.request_id in self._owner:
                        owner, tokens = self._owner.pop(output.request_id)
                        self.replicas[owner].load -= tokens
            return "outputs", outputs, self.stats()
        with self._lock:  # "dead"
            replica.alive = False
            replica.client.reap()
            lost = [rid for rid, (owner, _) in self._owner.items() if owner == index]
            for request_id in lost:
                del self._owner[request_id]
            replica.load = 0
            remaining = sum(r.alive for r in self.replicas)
        logger.error("data-parallel replica %d failed (%s); %d left", index, message[1], remaining)
        if remaining == 0:
            return "dead", f"every data-parallel replica has failed (the last: {message[1]})"
        return "replica_dead", lost, f"data-parallel replica {index} failed: {message[1]}"

    def stats(self) -> EngineStats:
        """The replicas' stats summed (cumulative counters include replicas that died; gauges only live ones)."""
        seen = [(r.alive, r.stats) for r in self.replicas if r.stats is not None]
        live = [s for alive, s in seen if alive]
        return EngineStats(
            num_running=sum(s.num_running for s in live), num_waiting=sum(s.num_waiting for s in live),
            kv_cache_usage=sum(s.kv_cache_usage for s in live) / max(1, len(live)),
            num_free_blocks=sum(s.num_free_blocks for s in live),
            prefix_cache_queries=sum(s.prefix_cache_queries for _, s in seen),
            prefix_cache_hits=sum(s.prefix_cache_hits for _, s in seen),
            num_preemptions=sum(s.num_preemptions for _, s in seen),
            kv_tiers=merge_tier_stats([s.kv_tiers for _, s in seen]))

    def reap(self, timeout: float = 5.0) -> None:
        for replica in self.replicas:
            replica.client.reap(timeout)

    def shutdown(self, timeout: float = 3.0) -> None:
        for replica in self.replicas:
            replica.client.shutdown(timeout)
