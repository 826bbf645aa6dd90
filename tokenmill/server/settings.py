"""ServerSettings: what the HTTP layer enforces (name, key, queue, timeout, body size)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queued_requests: int = 1024
    """Requests beyond max_num_seqs that may wait; past that, 503."""
    request_timeout: float | None = 600.0
    max_body_bytes: int = 4 * 2**20
