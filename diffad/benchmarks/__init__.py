"""Benchmarks behind `diffad bench`: throughput of the backends, load on the service."""
