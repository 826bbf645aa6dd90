"""Prometheus metrics, named as vLLM names them (``vllm:`` -> ``tokenmill:``) so dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenmill.engine.core import EngineStats
from tokenmill.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc):
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens, since start.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted for KV cache space.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self._success = Counter("tokenmill:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.healthy = gauge("engine_healthy", "1 while the engine core runs, 0 once it has failed.")
        tier = labels + ["tier"]
        self.tier_blocks = Gauge("tokenmill:kv_offload_blocks", "KV blocks held by each offload tier.", tier,
                                 registry=r)
        self.tier_capacity = Gauge("tokenmill:kv_offload_capacity_blocks", "KV blocks each offload tier can hold.",
                                   tier, registry=r)
        self.tier_counters = {field: Counter(f"tokenmill:kv_offload_{field}", doc, tier, registry=r) for field, doc in (
            ("hits", "KV blocks loaded back from each offload tier instead of recomputed."),
            ("stores", "KV blocks written into each offload tier."),
            ("evictions", "KV blocks each offload tier pushed out (to the next tier, if any) to make room."),
            ("failures", "KV blocks found missing or corrupt in each offload tier (recomputed)."))}
        self.healthy.set(1)
        self._last = EngineStats(0, 0, 0.0, 0, 0, 0, 0)

    def watch_replicas(self, router) -> None:
        """Per-replica series (label ``replica``), read from the router at every scrape."""
        registry, name = self.registry, self.model_name

        def per_replica(metric: str, doc: str, value) -> None:
            gauge = Gauge(f"tokenmill:replica_{metric}", doc, ["model_name", "replica"], registry=registry)
            for index, replica in enumerate(router.replicas):
                gauge.labels(name, str(index)).set_function(lambda r=replica: value(r))

        per_replica("healthy", "1 while this data-parallel replica runs, 0 once it has failed.",
                    lambda r: 1.0 if r.alive else 0.0)
        per_replica("num_requests_routed", "Requests the router has sent to this replica.", lambda r: r.num_routed)
        per_replica("outstanding_tokens", "Prompt + output budget of this replica's requests in flight.",
                    lambda r: r.load)
        per_replica("num_requests_running", "Sequences in this replica's running batch.",
                    lambda r: r.stats.num_running if r.stats and r.alive else 0)
        per_replica("prefix_cache_hits", "Prompt tokens this replica found in its prefix cache, since start.",
                    lambda r: r.stats.prefix_cache_hits if r.stats else 0)
        per_replica("prefix_cache_queries", "Prompt tokens this replica looked up in its prefix cache, since start.",
                    lambda r: r.stats.prefix_cache_queries if r.stats else 0)

    def on_engine_dead(self) -> None:
        """The core is gone, and its requests with it: nothing runs, waits or holds KV blocks."""
        self.healthy.set(0)
        for gauge in (self.running, self.waiting, self.kv_usage):
            gauge.set(0)

    def on_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.hit_rate.set(stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0)
        self.prefix_queries.inc(stats.prefix_cache_queries - self._last.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits - self._last.prefix_cache_hits)
        self.preemptions.inc(stats.num_preemptions - self._last.num_preemptions)
        last_tiers = {t.name: t for t in self._last.kv_tiers}
        for tier in stats.kv_tiers:
            self.tier_blocks.labels(self.model_name, tier.name).set(tier.num_blocks)
            self.tier_capacity.labels(self.model_name, tier.name).set(tier.capacity_blocks)
            last = last_tiers.get(tier.name)
            for field, counter in self.tier_counters.items():
                counter.labels(self.model_name, tier.name).inc(getattr(tier, field) - (getattr(last, field) if last else 0))
        self._last = stats

    def on_finished(self, output: RequestOutput) -> None:
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_generated)
        reason = output.outputs[0].finish_reason if output.outputs else "abort"
        self._success.labels(self.model_name, reason or "abort").inc()
        m = output.metrics
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
            self.e2e.observe(m.last_token_time - m.arrival_time)
        tpot = m.time_per_output_token(len(output.outputs[0].token_ids)) if output.outputs else None
        if tpot is not None:
            self.tpot.observe(tpot)
