"""Attention over the paged KV cache, behind a small backend interface."""
