"""Measurements of edge-ad on this machine (not tests): run as `python -m benchmarks.<name>`."""
