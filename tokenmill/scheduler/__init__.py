"""Pure-Python scheduling: continuous batching over a paged KV cache (no torch here)."""
