"""Benchmarks: throughput, latency, and the Hugging Face baseline. They print tables and write JSON."""
