"""The server's Prometheus metrics, in a registry of its own (several engines may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge(
            "groklm_requests_running", "sequences holding a KV row (prefilling or decoding)", registry=r
        )
        self.waiting = Gauge("groklm_requests_waiting", "sequences waiting for a KV row", registry=r)
        self.kv_rows_used = Gauge("groklm_kv_rows_used", "KV cache rows held by running sequences", registry=r)
        self.kv_rows_total = Gauge("groklm_kv_rows_total", "KV cache rows (--max-batch)", registry=r)
        self.kv_rows_cached = Gauge("groklm_kv_rows_cached", "free KV rows still holding a reusable prefix", registry=r)
        self.prefix_hits = Counter("groklm_prefix_cache_hits", "sequences that reused a cached prefix", registry=r)
        self.prefix_hit_tokens = Counter(
            "groklm_prefix_cache_hit_tokens", "prompt tokens not prefilled again", registry=r
        )
        self.prompt_tokens = Counter("groklm_prompt_tokens", "prompt tokens of admitted sequences", registry=r)
        self.generation_tokens = Counter("groklm_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("groklm_requests_finished", "sequences finished, by reason", ["reason"], registry=r)
        self.steps = Counter("groklm_engine_steps", "engine steps run", registry=r)
        self.lora_mixed_steps = Counter("groklm_lora_mixed_steps", "decode steps whose rows used several adapters "
                                        "(the base counts as one)", registry=r)  # fmt: skip
        self.ttft = Histogram(
            "groklm_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram("groklm_inter_token_latency_seconds", "between two tokens of a sequence",
                             buckets=_LATENCY, registry=r)  # fmt: skip
        self.abort_steps = Histogram("groklm_abort_release_steps", "engine steps between a client leaving and its row's release",
                                     buckets=(0, 1, 2, 4, 8, 16), registry=r)  # fmt: skip
        self.e2e = Histogram(
            "groklm_e2e_request_latency_seconds", "arrival to last token", buckets=_LATENCY, registry=r
        )
